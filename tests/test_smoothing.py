"""SVD smoothing against brute-force numpy truncated SVDs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import frogwatch
from frogwatch.cli import main
from frogwatch.smoothing import low_rank, smoothing_plan


def numpy_rank_k(W, k):
    U, S, Vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


def test_low_rank_matches_numpy_and_conv_slices():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 20, generator=g)
    np.testing.assert_allclose(low_rank(W, 4).numpy(), numpy_rank_k(W.numpy(), 4), atol=1e-5)
    assert np.linalg.matrix_rank(low_rank(W, 4).double().numpy(), tol=1e-4) == 4
    C = torch.randn(8, 6, 3, 3, generator=g)
    R = low_rank(C, 2)
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(R[:, :, i, j].numpy(), numpy_rank_k(C[:, :, i, j].numpy(), 2), atol=1e-5)


def test_module_default_smooths_overparameterized_layers_with_their_tail(minilm_session, minilm_df):
    sm = frogwatch.svd_smoothing(minilm_session, progress=False)
    plan = sm.smoothing_plan
    flagged = minilm_df[minilm_df["overparameterized"]]
    assert list(plan["name"]) == list(flagged["name"]) and len(plan) >= 1
    assert list(plan["k"]) == list(flagged["num_pl_spikes"])
    orig = dict(minilm_session.named_modules())
    new = dict(sm.named_modules())
    for name, k in zip(plan["name"], plan["k"]):
        W = orig[name].weight.detach().numpy()
        np.testing.assert_allclose(new[name].weight.detach().numpy(), numpy_rank_k(W, k), atol=1e-5)
    untouched = [n for n in minilm_df["name"] if n not in set(plan["name"])]
    for n in untouched[:10]:
        assert torch.equal(orig[n].weight, new[n].weight)
    # the original is not modified; the smoothed layers now have exactly k non-zero singular values
    s = torch.linalg.svdvals(new[plan["name"][0]].weight.double())
    assert int((s > s[0] * 1e-6).sum()) == plan["k"][0]


def test_keep_int_and_fraction(mlp):
    p = smoothing_plan(mlp, layers=["0", "2"], keep=5)
    assert list(p["k"]) == [5, 5]
    p = smoothing_plan(mlp, layers=["0", "2"], keep=0.25)
    assert list(p["k"]) == [10, 12]  # ceil(0.25 * 40), ceil(0.25 * 48)
    with pytest.raises(ValueError, match="svd_smoothing: keep must be"):
        smoothing_plan(mlp, keep="bulk")
    with pytest.raises(TypeError, match="svd_smoothing: keep must be"):
        smoothing_plan(mlp, keep=[1])


def _sharded(mlp, root):
    sd = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    root.mkdir()
    save_file({k: sd[k] for k in ("0.weight", "0.bias")}, str(root / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in sd if not k.startswith("0.")}, str(root / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" if k.startswith("0.") else "model-00002-of-00002.safetensors" for k in sd}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (root / "config.json").write_text('{"x": 1}')
    return sd


def test_streams_a_sharded_directory(mlp, tmp_path):
    src, dst = tmp_path / "ckpt", tmp_path / "smoothed"
    sd = _sharded(mlp, src)
    assert main(["smooth", str(src), str(dst), "--layers", "0", "4", "--keep", "3", "--quiet"]) == 0
    got = {**load_file(str(dst / "model-00001-of-00002.safetensors")),
           **load_file(str(dst / "model-00002-of-00002.safetensors"))}  # fmt: skip
    for key in ("0.weight", "4.weight"):
        np.testing.assert_allclose(got[key].numpy(), numpy_rank_k(sd[key].numpy(), 3), atol=1e-5)
    for key in ("2.weight", "0.bias", "2.bias"):
        assert torch.equal(got[key], sd[key])
    assert (dst / "config.json").read_text() == '{"x": 1}'
    assert (dst / "model.safetensors.index.json").exists() and (dst / "smoothing_plan.csv").exists()
    # the smoothed checkpoint reads back as a model, and distances sees only the two layers
    d = frogwatch.distances(str(src), str(dst), progress=False)
    assert list(d.loc[d["fro"] > 0, "name"]) == ["0", "4"]


def test_nothing_written_on_failure(mlp, tmp_path, monkeypatch):
    src, dst = tmp_path / "ckpt", tmp_path / "smoothed"
    _sharded(mlp, src)

    def boom(W, k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("frogwatch.smoothing.low_rank", boom)
    with pytest.raises(RuntimeError):
        frogwatch.svd_smoothing(str(src), layers=["2"], keep=2, out=dst, progress=False)
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(FileExistsError):
        frogwatch.svd_smoothing(str(src), layers=["2"], keep=2, out=src, progress=False)
