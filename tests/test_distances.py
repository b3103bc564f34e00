"""frogwatch.distances against brute-force numpy (and scipy's subspace angles)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch

import frogwatch
from frogwatch.cli import main


def brute(A, B, k):
    A = A if A.shape[0] >= A.shape[1] else A.T
    B = B if B.shape[0] >= B.shape[1] else B.T
    fro = np.sqrt(((A - B) ** 2).sum())
    cka = np.trace(A.T @ B @ B.T @ A) / np.sqrt(np.trace(A.T @ A @ A.T @ A) * np.trace(B.T @ B @ B.T @ B))
    Ua, _, Vat = np.linalg.svd(A)
    Ub, _, Vbt = np.linalg.svd(B)
    out_ang = np.degrees(scipy.linalg.subspace_angles(Ua[:, :k], Ub[:, :k]))
    in_ang = np.degrees(scipy.linalg.subspace_angles(Vat[:k].T, Vbt[:k].T))
    return fro, fro / np.sqrt((A**2).sum()), cka, out_ang, in_ang


def test_distances_match_brute_force(convnet):
    other = copy.deepcopy(convnet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    df = frogwatch.distances(convnet, other, k=4, progress=False)
    assert len(df) == 5
    mods = dict(convnet.named_modules())
    omods = dict(other.named_modules())
    for _, row in df.iterrows():
        A = mods[row["name"]].weight.detach().double().reshape(mods[row["name"]].weight.shape[0], -1).numpy()
        B = omods[row["name"]].weight.detach().double().reshape(A.shape[0], -1).numpy()
        fro, rel, cka, oa, ia = brute(A, B, 4)
        assert row["fro"] == pytest.approx(fro, rel=1e-10)
        assert row["rel"] == pytest.approx(rel, rel=1e-10)
        assert row["cka"] == pytest.approx(cka, rel=1e-10)
        assert row["angle_out_max"] == pytest.approx(oa.max(), abs=1e-6)
        assert row["angle_out_mean"] == pytest.approx(oa.mean(), abs=1e-6)
        assert row["angle_in_max"] == pytest.approx(ia.max(), abs=1e-6)
        assert row["angle_in_mean"] == pytest.approx(ia.mean(), abs=1e-6)
        assert 0 < row["cka"] < 1 and row["angle_in_max"] > 1


def test_distances_to_itself_and_rotation(mlp):
    df = frogwatch.distances(mlp, mlp, progress=False)
    assert (df["fro"] == 0).all() and np.allclose(df["cka"], 1) and np.allclose(df["angle_in_max"], 0, atol=1e-4)
    rot = copy.deepcopy(mlp)
    with torch.no_grad():
        W = rot[0].weight  # 64 x 40 (N x M): rotate the input (feature) side; outputs unchanged
        R, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(1)))
        W.copy_(3 * W @ R)
    d = frogwatch.distances(mlp, rot, k=5, progress=False).iloc[0]
    assert d["rel"] > 0.5 and d["cka"] == pytest.approx(1.0) and d["angle_out_max"] < 1e-4
    assert d["angle_in_max"] > 10


def test_distances_lists_mismatched_and_cli(mlp, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    a = tmp_path / "a.safetensors"
    save_file(sd, str(a))
    sd2 = dict(sd)
    sd2["2.weight"] = torch.zeros(10, 64)
    b = tmp_path / "b.safetensors"
    save_file(sd2, str(b))
    df = frogwatch.distances(str(a), str(b), progress=False)
    assert df.attrs["mismatched"] == ["2"] and len(df) == 2
    out = tmp_path / "d.csv"
    assert main(["distances", str(a), str(b), "--quiet", "--out", str(out)]) == 0
    assert out.exists()
    with pytest.raises(TypeError, match="distances: k must be an int"):
        frogwatch.distances(mlp, mlp, k=2.5)


def test_package_attribute_stays_the_function_after_the_cli_imports_its_module(convnet):
    # a submodule named like a public function would replace it on the package once imported
    import frogwatch.commands.distances as cmd

    cmd.add_parser  # the CLI's module is loaded, and it imports the function's module
    from frogwatch.model_distances import distances as fn

    assert frogwatch.distances is fn and callable(frogwatch.distances)
    for name in ("report", "distances", "select", "prepare", "merge", "compare", "analyze"):
        assert callable(getattr(frogwatch, name)), name
