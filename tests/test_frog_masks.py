"""Masks: mapping behaviour, summary, save/load round trip, compatibility, PEFT SHiRA export."""

import json
import math
import warnings

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


# ---- Masks.from_indices, constructor and file errors (edges found by benchmarks/mutation.py) -----


def test_from_indices_builds_masks_in_the_order_of_shapes():
    idx = {"b": torch.tensor([0, 5]), "a": torch.tensor([1, 2, 7])}
    shapes = {"a": [2, 4], "b": (3, 2)}  # shapes' order is the masks' order
    m = Masks.from_indices(idx, shapes, scores={"a": torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64)},
                           kinds={"b": "conv1d"}, budget=5)  # fmt: skip
    assert list(m) == ["a", "b"] and m.counts() == {"a": 3, "b": 2}
    assert m["a"].shape == (2, 4) and torch.equal(torch.nonzero(m["a"].reshape(-1)).reshape(-1), idx["a"])
    assert m["b"].tolist() == [[True, False], [False, False], [False, True]]
    a, b = m.info("a"), m.info("b")
    assert (a.kind, b.kind) == ("dense", "conv1d") and (a.shape, b.shape) == ((2, 4), (3, 2))
    assert all(type(s) is int for s in a.shape)
    for info in (a, b):
        for field in ("R", "importance", "alpha", "energy", "score_sum"):
            assert math.isnan(getattr(info, field)), field
        assert info.multiplier == 1.0
    assert torch.equal(m.scores("a"), torch.tensor([0.5, 0.25, 2.0]))  # stored as float32
    assert m.scores("b").shape == (2,) and torch.isnan(m.scores("b")).all()  # unknown: NaN
    assert m.meta["strategy"] == "from_indices" and m.meta["budget"] == 5
    assert Masks.from_indices(idx, shapes, strategy="delta").meta["strategy"] == "delta"
    assert torch.isnan(Masks.from_indices(idx, shapes).scores("a")).all()
    with pytest.raises(ValueError) as e:
        Masks.from_indices({"a": idx["a"]}, shapes)
    assert str(e.value) == "Masks.from_indices: indices and shapes must name the same matrices"


def test_constructor_messages():
    from frogwatch.frog.masks import MaskInfo

    info = MaskInfo("a", "dense", (2, 3), R=1.0, importance=1.0)
    cases = [
        (([info], [], []), "infos, indices and scores must have one entry per matrix"),
        (([info, info], [torch.tensor([1])] * 2, [torch.ones(1)] * 2), "duplicate matrix name 'a'"),
        (([info], [torch.tensor([1])], [torch.ones(2)]), "a: 1 indices but 2 scores"),
        (([info], [torch.tensor([-1, 2])], [torch.ones(2)]), "a: indices must be sorted, unique and in [0, 6)"),
        (([info], [torch.tensor([2, 2])], [torch.ones(2)]), "a: indices must be sorted, unique and in [0, 6)"),
        (([info], [torch.tensor([0, 6])], [torch.ones(2)]), "a: indices must be sorted, unique and in [0, 6)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            Masks(*args)
        assert str(e.value) == message
    huge = MaskInfo("h", "dense", (2**16, 2**15), R=1.0, importance=1.0)  # 2**31 entries
    with pytest.raises(ValueError) as e:
        Masks([huge], [torch.tensor([0])], [torch.ones(1)])
    assert str(e.value) == "h: 2147483648 entries exceed int32 flat indices"
    # edge indices 0 and size - 1 are valid; no selection at all is valid
    m = Masks([info, MaskInfo("e", "dense", (1, 1), 0.0, 0.0)], [torch.tensor([0, 5]), torch.tensor([], dtype=torch.long)],
              [torch.ones(2), torch.ones(0)])  # fmt: skip
    assert m.counts() == {"a": 2, "e": 0} and m.n_selected == 2 and m.n_total == 7
    assert not m["e"].any()


def _two_masks(**meta):
    from frogwatch.frog.masks import MaskInfo

    infos = [MaskInfo("a", "dense", (2, 3), R=np.float32(0.75), importance=0.75),  # numpy floats too
             MaskInfo("e", "dense", (1, 1), R=0.25, importance=0.25)]  # fmt: skip
    return Masks(infos, [torch.tensor([0, 5]), torch.tensor([0])], [torch.tensor([2.0, 1.0]), torch.ones(1)],
                 **{"strategy": "global", **meta})  # fmt: skip


def test_equality_needs_equal_meta_records_indices_and_scores():
    from dataclasses import replace

    m = _two_masks()
    assert m == _two_masks() and m != "masks"
    assert m != _two_masks(budget=3)  # meta
    infos = [replace(m.info("a"), R=0.5), m.info("e")]
    idx = [m.indices("a"), m.indices("e")]
    sc = [m.scores("a"), m.scores("e")]
    assert m != Masks(infos, idx, sc, strategy="global")  # records
    assert m != Masks([m.info("a"), m.info("e")], [torch.tensor([0, 4]), idx[1]], sc, strategy="global")
    assert m != Masks([m.info("a"), m.info("e")], idx, [torch.tensor([2.0, 0.5]), sc[1]], strategy="global")


def test_repr_counts_and_share():
    assert repr(_two_masks()) == "Masks(2 matrices, 3 of 7 weights (42.86%), strategy='global')"
    from frogwatch.frog.masks import MaskInfo

    one = Masks([MaskInfo("x", "dense", (1, 1), 1.0, 1.0)], [torch.tensor([0])], [torch.ones(1)], strategy="s")
    assert repr(one) == "Masks(1 matrices, 1 of 1 weights (100.00%), strategy='s')"


def test_numpy_float_records_survive_save_and_load(tmp_path):
    m = _two_masks()
    loaded = Masks.load(m.save(tmp_path / "m.safetensors"))
    assert loaded == m and loaded.info("a").R == 0.75


def _rewrite(path, out, **metadata):
    with safe_open(str(path), framework="pt") as f:
        md = {**f.metadata(), **metadata}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={k: v for k, v in md.items() if v is not None})
    return out


def test_load_errors_name_the_file_and_the_cause(tmp_path):
    good = _two_masks().save(tmp_path / "good.safetensors")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        Masks.load(missing)
    assert str(e.value) == f"{missing}: no such masks file"
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(ValueError) as e:
        Masks.load(plain)
    assert str(e.value) == f"{plain}: not a frogwatch masks file (format=None)"
    v2 = _rewrite(good, tmp_path / "v2.safetensors", format_version="2")
    with pytest.raises(ValueError) as e:
        Masks.load(v2)
    assert str(e.value) == f"{v2}: masks format version '2' is not supported (this frogwatch reads 1)"
    no_layers = _rewrite(good, tmp_path / "nolayers.safetensors", layers=None)
    with pytest.raises(ValueError) as e:
        Masks.load(no_layers)
    assert str(e.value) == f"{no_layers}: corrupt frogwatch masks file (KeyError: 'layers')"
    meta = json.loads(safe_open(str(good), framework="pt").metadata()["meta"])
    forged = _rewrite(good, tmp_path / "forged.safetensors", meta=json.dumps({**meta, "fingerprint": "0" * 16}))
    with pytest.raises(ValueError) as e:
        Masks.load(forged)
    assert str(e.value) == f"{forged}: fingerprint mismatch; the file is corrupt"
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError) as e:
        Masks.load(damaged)
    assert str(e.value).startswith(f"{damaged}: could not read masks (") and "NoneType" not in str(e.value)


def test_summary_kind_energy_and_empty_matrix():
    from frogwatch.frog.masks import MaskInfo

    infos = [MaskInfo("z", "conv1d", (0, 3), 0.0, 0.0, energy=0.5), MaskInfo("w", "dense", (2, 2), 1.0, 1.0)]
    df = Masks(infos, [torch.tensor([], dtype=torch.long), torch.tensor([3])], [torch.ones(0), torch.ones(1)]).summary()
    assert df["kind"].tolist() == ["conv1d", "dense"] and df["energy"].tolist() == [0.5, 1.0]
    assert df["fraction"].tolist() == [0.0, 0.25] and df["size"].tolist() == [0, 4]


def test_check_compatible_message_lists_three_of_each():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    shapes = {**{str(i): (5, 4) for i in range(5)}, **{f"x{i}": (4, 4) for i in range(5)}}
    m = Masks.from_indices({n: torch.tensor([0]) for n in shapes}, shapes)
    with pytest.raises(MaskMismatchError) as e:
        m.check_compatible(model)
    assert str(e.value) == (
        f"these masks (fingerprint {m.fingerprint}) do not fit the model: "
        "5 masked matrices are not in the model (e.g. ['x0', 'x1', 'x2']); "
        "5 have other shapes (0: mask (5, 4), model (4, 4); 1: mask (5, 4), model (4, 4); "
        "2: mask (5, 4), model (4, 4)). Select masks on this model with frogwatch.select."
    )


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_shira_mask_fn_resize_edges_and_messages():
    model = TwoLinear()
    masks = select(model, 40, score="relevance", progress=False)
    fn = masks.to_shira_mask_fn(model, resize=True)
    assert fn(model.a, 4).bool().all()  # r·(in+out) = 64 = every weight of the layer
    with pytest.raises(ValueError) as e:
        fn(model.a, 5)
    assert str(e.value) == "a: SHiRA asks for 80 weights, the layer has 64"
    k = masks.counts()["a"]
    with pytest.raises(ValueError) as e:
        masks.to_shira_mask_fn(model)(model.a, 1)
    assert str(e.value) == (
        f"a: FROG selected {k} weights but PEFT's SHiRA trains exactly r·(in+out) = 16 per layer; "
        "pick r so that they agree, or pass resize=True to take SHiRA's count from FROG's ranking"
    )
    stranger = nn.Linear(8, 8)
    with pytest.raises(MaskMismatchError) as e:
        fn(stranger, 1)
    assert str(e.value) == (
        f"SHiRA asked for a mask of a layer FROG did not select ({stranger!r}); "
        "set ShiraConfig(target_modules=list(masks))"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shira_resize_up_takes_the_top_of_s_of_a_non_square_layer(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).to(dtype)  # weight (4, 6)
    masks = select(model, 3, score="relevance", progress=False)
    mask = masks.to_shira_mask_fn(model, resize=True)(model[0], 1)  # 1·(6+4) = 10 weights
    assert mask.dtype == dtype and mask.shape == (4, 6)
    S = relevance(model[0].weight.detach().double()).reshape(-1)  # float64 S of the stored weights
    top = torch.argsort(S, descending=True, stable=True)[:10]
    assert sorted(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()) == sorted(top.tolist())


def test_shira_config_options_and_errors():
    pytest.importorskip("peft")
    model = TwoLinear()
    masks = select(model, 32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's warning about an unknown mask_type is expected and hidden
        config = masks.shira_config(model, modules_to_save=["extra"])
    assert config.r == 1 and config.mask_type == "frogwatch" and config.modules_to_save == ["extra"]
    assert sorted(config.target_modules) == ["a", "b"]
    with pytest.raises(ValueError) as e:
        select(model, 40, score="relevance", progress=False).shira_config(model)
    assert str(e.value) == (
        "no single SHiRA r gives every layer its FROG count k_i = r·(in+out); pass r=... and resize=True"
    )
    convs = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(4)])
    with pytest.raises(ValueError) as e:
        Masks.from_indices({n: torch.tensor([0]) for n in "0123"}, {n: (2, 2, 1, 1) for n in "0123"}).shira_config(convs)
    assert str(e.value) == "PEFT's SHiRA adapts nn.Linear layers only; not nn.Linear: ['0', '1', '2']"


def test_meta_records_version_and_the_shape_fingerprint():
    import hashlib

    import frogwatch

    m = _two_masks()
    assert m.meta["frogwatch_version"] == frogwatch.__version__
    assert m.fingerprint == m.meta["fingerprint"] == hashlib.sha256(b"a:2x3;e:1x1;").hexdigest()[:16]


def test_constructor_rejects_unsorted_and_accepts_the_int32_limit():
    from frogwatch.frog.masks import MaskInfo

    info = MaskInfo("a", "dense", (2, 3), R=1.0, importance=1.0)
    with pytest.raises(ValueError, match="sorted, unique"):
        Masks([info], [torch.tensor([0, 5, 3])], [torch.ones(3)])
    edge = MaskInfo("big", "dense", (2**31 - 1, 1), 1.0, 1.0)  # the largest int32 flat index space
    assert Masks([edge], [torch.tensor([0, 2**31 - 2])], [torch.ones(2)]).counts() == {"big": 2}
