"""Masks: mapping behaviour, summary, save/load round trip, compatibility, PEFT SHiRA export."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from frogwatch.frog import MaskMismatchError, Masks, relevance, select


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.fixture(scope="module")
def masks():
    return select(mlp(), 0.2, score="balanced", blend=0.5, alpha={"0": 2.5, "2": math.nan, "4": 5.0}, progress=False)


def test_mapping_of_bool_masks_shaped_like_weights(masks):
    model = mlp()
    assert list(masks) == ["0", "2", "4"] and len(masks) == 3 and "2" in masks
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert mask.dtype == torch.bool and mask.shape == w.shape
        idx = masks.indices(name)
        assert int(mask.sum()) == idx.numel()
        assert torch.equal(torch.nonzero(mask.reshape(-1)).reshape(-1), idx)
        S = relevance(w).reshape(-1)
        assert torch.equal(masks.scores(name), S[idx].float())
    with pytest.raises(TypeError):
        masks["0"] = torch.ones(8, 10, dtype=torch.bool)  # read-only
    masks["0"][0, 0] = True  # a fresh tensor each time: the masks do not change
    masks.scores("0")[:] = -1
    assert (masks.scores("0") >= 0).all()


def test_summary_columns_and_values(masks):
    df = masks.summary()
    for col in ["name", "shape", "size", "k", "fraction", "R", "importance", "selected_score_sum", "alpha", "multiplier"]:
        assert col in df.columns
    assert df["k"].sum() == masks.n_selected == round(0.2 * (80 + 48 + 18))
    np.testing.assert_allclose(df["fraction"], df["k"] / df["size"])
    assert df["R"].sum() == pytest.approx(1.0) and df["importance"].sum() == pytest.approx(1.0)
    model = mlp()
    norms = np.array([model.get_submodule(n).weight.detach().double().norm().item() for n in masks])
    np.testing.assert_allclose(df["R"], norms / norms.sum(), rtol=1e-12)
    np.testing.assert_allclose(df["multiplier"], [0.5, 1.0, 1.5])
    w = df["R"] * df["multiplier"]
    np.testing.assert_allclose(df["importance"], w / w.sum(), rtol=1e-12)
    for name, row in df.set_index("name").iterrows():
        S = relevance(model.get_submodule(name).weight).reshape(-1)
        assert row["selected_score_sum"] == pytest.approx(float(S[masks.indices(name)].sum()), rel=1e-12)
    assert masks.meta["strategy"] == "per_matrix" and masks.meta["blend"] == 0.5
    assert "Masks(3 matrices" in repr(masks)


def test_save_load_round_trip_is_bit_exact(masks, tmp_path):
    path = masks.save(tmp_path / "sub" / "masks.safetensors")
    loaded = Masks.load(path)
    assert loaded == masks
    for n in masks:
        assert torch.equal(loaded.indices(n), masks.indices(n))
        assert torch.equal(loaded.scores(n).view(torch.int32), masks.scores(n).view(torch.int32))
        assert loaded.info(n).shape == masks.info(n).shape
    pd.testing.assert_frame_equal(loaded.summary(), masks.summary(), check_exact=True)
    assert loaded.meta == masks.meta and loaded.fingerprint == masks.fingerprint
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        assert f.get_tensor("0.indices").dtype == torch.int32
        assert f.get_tensor("0.scores").dtype == torch.float32
    meta = json.loads(md["meta"])
    for key in ("strategy", "budget", "blend", "direction", "frogwatch_version", "fingerprint"):
        assert key in meta
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


def test_load_rejects_other_files(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(ValueError, match="not a frogwatch masks file"):
        Masks.load(other)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError):
        Masks.load(bad)
    with pytest.raises(FileNotFoundError):
        Masks.load(tmp_path / "missing.safetensors")


def test_check_compatible(masks, tmp_path):
    masks.check_compatible(mlp(seed=5))  # same architecture, other values: fine
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, str(path))
    masks.check_compatible(path)
    wider = nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(MaskMismatchError, match=r"other shapes .*0: mask \(8, 10\), model \(9, 10\)"):
        masks.check_compatible(wider)
    with pytest.raises(MaskMismatchError, match="not in the model"):
        masks.check_compatible(nn.Sequential(nn.Linear(10, 8)))
    with pytest.raises(ValueError):  # MaskMismatchError is a ValueError, for the CLI
        masks.to_shira_mask_fn(wider)


def test_constructor_validation():
    from frogwatch.frog.masks import MaskInfo

    info = MaskInfo("a", "dense", (2, 3), R=1.0, importance=1.0)
    with pytest.raises(ValueError, match="sorted"):
        Masks([info], [torch.tensor([3, 1])], [torch.ones(2)])
    with pytest.raises(ValueError, match="sorted"):
        Masks([info], [torch.tensor([6])], [torch.ones(1)])
    with pytest.raises(ValueError, match="scores"):
        Masks([info], [torch.tensor([1])], [torch.ones(2)])


# ---- PEFT SHiRA ------------------------------------------------------------------------------


class TwoLinear(nn.Module):
    """Two 8x8 layers with the same Frobenius norm, so FROG splits an even budget evenly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight[torch.randperm(8)][:, torch.randperm(8)] * 1.0)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _train_and_merge(model, config, steps=3):
    peft = pytest.importorskip("peft")
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("a", "b")}
    pm = peft.get_peft_model(model, config)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(pm(x), y)
        loss.backward()
        opt.step()
    merged = pm.merge_and_unload()
    return before, {n: merged.get_submodule(n).weight.detach() for n in ("a", "b")}, params


@pytest.mark.filterwarnings("ignore:Argument self.mask_type:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_shira_export_trains_exactly_the_masked_weights():
    peft = pytest.importorskip("peft")
    model = TwoLinear()
    masks = select(model, 32, progress=False)  # 16 per layer = r·(in+out) with r = 1
    assert masks.counts() == {"a": 16, "b": 16}
    config = peft.ShiraConfig(r=1, target_modules=["a", "b"], mask_type="frogwatch")
    config.mask_fn = masks.to_shira_mask_fn(model)
    before, after, params = _train_and_merge(model, config)
    assert sum(p.numel() for p in params) == 32
    for n in ("a", "b"):
        changed = after[n] != before[n]
        assert changed.any()
        assert not (changed & ~masks[n]).any(), f"{n}: weights outside the FROG mask changed"


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_shira_config_helper_and_resize():
    pytest.importorskip("peft")
    model = TwoLinear()
    masks = select(model, 32, progress=False)
    assert masks.shira_config(model).r == 1
    uneven = select(model, 40, score="relevance", progress=False)  # resize re-ranks by S: nested for top-S
    with pytest.raises(ValueError, match="single SHiRA r"):
        uneven.shira_config(model)
    fn = uneven.to_shira_mask_fn(model)
    with pytest.raises(ValueError, match="resize=True"):
        fn(model.a, 1)
    # resize: SHiRA's count taken from FROG's ranking, nested with the FROG selection
    fn = uneven.to_shira_mask_fn(model, resize=True)
    small, large = fn(model.a, 1), fn(model.a, 2)
    assert int(small.sum()) == 16 and int(large.sum()) == 32 and small.dtype == model.a.weight.dtype
    assert not (small.bool() & ~uneven["a"]).any() and not (uneven["a"] & ~large.bool()).any()
    config = uneven.shira_config(model, r=1, resize=True)
    before, after, _ = _train_and_merge(model, config)
    for n in ("a", "b"):
        assert not ((after[n] != before[n]) & ~uneven[n]).any()
    with pytest.raises(MaskMismatchError, match="did not select"):
        masks.to_shira_mask_fn(model)(nn.Linear(8, 8), 1)
