"""One test per public behaviour that a mutation run showed unguarded (issue 13), through the
public API only: frogwatch.analyze / describe / select / prepare / merge / save_delta /
load_delta / Masks, the Trainer callback and the CLI (``frogwatch.cli.main``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import frogwatch
from frogwatch.cli import main as cli

import _brute  # tests/_brute.py (pytest puts tests/ on sys.path)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TwoSame(nn.Module):
    """Two same-shaped Linear layers with identical weights: only the layer may tell them apart."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12, bias=False)
        self.b = nn.Linear(12, 12, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(_rand(12, 12))
            self.b.weight.copy_(self.a.weight)

    def forward(self, x):
        return torch.stack([self.a(x), self.b(x)])


def _same_masks(model):
    m = torch.zeros(12, 12, dtype=torch.bool)
    m[::3, ::2] = True
    return {"a": m, "b": m.clone()}


# ---- FROG: per-layer random streams ----------------------------------------------------------


def test_init_streams_differ_between_same_shaped_layers():
    model = prepare_two(init_scale=1.0)
    frogwatch.merge(model)
    wa, wb = model.a.weight, model.b.weight
    assert not torch.equal(wa, wb)  # each layer draws its own init
    m = _same_masks(model)["a"]
    assert torch.equal(wa[~m], wb[~m])  # and only inside the masks


def prepare_two(**kw):
    model = TwoSame()
    return frogwatch.prepare(model, _same_masks(model), seed=3, **kw)


def test_noise_streams_differ_between_same_shaped_layers():
    model = prepare_two(noise_scale=0.1)
    x = _rand(5, 12, seed=1)
    model.train()
    ya, yb = model(x)
    assert not torch.allclose(ya, yb)  # different noise per layer in train mode
    model.eval()
    ya, yb = model(x)
    assert torch.equal(ya, yb)  # and none in eval mode


# ---- sources ---------------------------------------------------------------------------------


def test_tied_weights_in_a_state_dict_are_analysed_once():
    w = _rand(40, 30)
    sd = {"enc.weight": w, "dec.weight": w, "other.weight": _rand(40, 30, seed=1)}
    df = frogwatch.analyze(sd, progress=False)
    assert list(df["name"]) == ["enc", "other"]
    # a copy with equal values is not a tie
    sd["dec.weight"] = w.clone()
    assert len(frogwatch.analyze(sd, progress=False)) == 3


def test_unindexed_safetensors_directory_read_in_natural_order(tmp_path):
    # file order (a, b) is the reverse of the natural order of the names inside
    save_file({"layer.10.weight": _rand(30, 20)}, str(tmp_path / "a.safetensors"))
    save_file({"layer.2.weight": _rand(30, 20, seed=1), "layer.9.weight": _rand(30, 20, seed=2)},
              str(tmp_path / "b.safetensors"))
    df = frogwatch.analyze(tmp_path, progress=False)
    assert list(df["name"]) == ["layer.2", "layer.9", "layer.10"]
    assert list(frogwatch.describe(tmp_path)["name"]) == ["layer.2", "layer.9", "layer.10"]


def test_nested_module_prefixes_are_stripped():
    inner = {"fc.weight": _rand(30, 20)}
    for prefix in ("module.", "module.module."):
        sd = {prefix + k: v for k, v in inner.items()}
        assert list(frogwatch.describe(sd)["name"]) == ["fc"], prefix


# ---- analyze options -------------------------------------------------------------------------


def _planted_finger(n=200, m=100, seed=0):
    """Gaussian noise with three huge singular directions: a finger that inflates alpha."""
    W = _rand(n, m, seed=seed).double() / math.sqrt(n)
    U = torch.linalg.qr(_rand(n, 3, seed=seed + 1).double()).Q
    V = torch.linalg.qr(_rand(m, 3, seed=seed + 2).double()).Q
    return W + U @ torch.diag(torch.tensor([40.0, 30.0, 25.0], dtype=torch.float64)) @ V.T


def test_fit_tpl_is_honoured():
    sd = {"w.weight": _rand(300, 120)}
    pl = frogwatch.analyze(sd, progress=False).iloc[0]
    tpl = frogwatch.analyze(sd, fit="TPL", progress=False).iloc[0]
    assert math.isnan(pl["Lambda"]) and math.isfinite(tpl["Lambda"])
    assert tpl["alpha"] != pl["alpha"]


def test_xmax_is_honoured():
    sd = {"w.weight": _planted_finger()}
    full = frogwatch.analyze(sd, progress=False).iloc[0]
    ev = _brute.evals(sd["w.weight"].numpy())
    cut = float(ev[-4]) * 1.0001  # leave out the top three
    r = frogwatch.analyze(sd, xmax=cut, progress=False).iloc[0]
    assert r["xmax"] <= cut < full["xmax"]
    assert r["alpha"] == pytest.approx(_brute.clauset_fit(ev[ev <= cut])[0], rel=1e-9)
    assert r["alpha"] != full["alpha"]


def test_layers_by_kind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(40, 30), nn.Embedding(50, 20))
    assert set(frogwatch.analyze(model, layers=["conv2d"], progress=False)["layer_type"]) == {"conv2d"}
    df = frogwatch.analyze(model, layers=["dense", "embedding"], progress=False)
    assert list(df["layer_type"]) == ["dense", "embedding"]
    assert list(frogwatch.describe(model, layers=["embedding"])["name"]) == ["3"]


def test_entropy_is_divided_by_log_rank():
    W = _rand(60, 25, seed=4) * torch.linspace(0.1, 3, 25)
    row = frogwatch.analyze({"w.weight": W}, progress=False).iloc[0]
    ev = _brute.evals(W.numpy())
    p = ev / ev.sum()
    expect = -(p * np.log(p)).sum() / np.log(np.linalg.matrix_rank(W.double().numpy()))
    assert row["entropy"] == pytest.approx(expect, rel=1e-10)


def test_torch_eigenvalue_path_matches_numpy():
    """The code path analyze(device="cuda") runs, exercised on the CPU through torch."""
    from frogwatch.spectra import eigenvalues

    W = _rand(70, 30, seed=5)
    ref = _brute.evals(W.numpy())
    for method in ("gram", "svd"):
        ev = eigenvalues(W, method=method, device=torch.device("cpu"))
        assert isinstance(ev, np.ndarray) and ev.dtype == np.float64
        np.testing.assert_allclose(ev, ref, rtol=1e-10, atol=1e-10 * ref[-1])


@pytest.mark.cuda
def test_analyze_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sd = {"a.weight": _rand(200, 80), "b.weight": _rand(90, 90, seed=1)}
    cpu = frogwatch.analyze(sd, progress=False)
    gpu = frogwatch.analyze(sd, device="cuda", progress=False)
    for col in ("alpha", "lambda_max", "log_norm", "entropy", "matrix_rank"):
        np.testing.assert_allclose(gpu[col], cpu[col], rtol=1e-9)


def test_scale_collapse_never_flags_embeddings():
    mats = {f"m{i}.weight": _rand(64, 32, seed=i) for i in range(5)}
    mats["m4.weight"] = mats["m4.weight"] * 1e-3  # a low outlier of log_spectral_norm
    dense = frogwatch.analyze(mats, progress=False)
    assert list(dense["scale_collapse"]) == [False] * 4 + [True]  # the detector works on dense
    emb = {k.replace("m", "embed_tokens"): v for k, v in mats.items()}
    df = frogwatch.analyze(emb, progress=False)
    assert set(df["layer_type"]) == {"embedding"}
    assert not df["scale_collapse"].any()


# ---- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def finger_file(tmp_path):
    p = tmp_path / "m.safetensors"
    W = _brute.matrix_with_evals(_brute.finger_spectrum(), 200)
    save_file({"f.weight": torch.from_numpy(W).contiguous(),
               "g.weight": _rand(200, 80, seed=9).contiguous()}, str(p))
    return p


def test_cli_fit_and_fix_fingers_reach_analyze(finger_file, tmp_path, capsys):
    runs = {}
    for tag, extra in (("plain", []), ("tpl", ["--fit", "TPL"]), ("ff", ["--fix-fingers", "clip_xmax"])):
        out = tmp_path / tag
        assert cli(["analyze", str(finger_file), "--quiet", "--out", str(out), *extra]) == 0
        runs[tag] = pd.read_csv(out / "analyze.csv").set_index("name")
    assert runs["plain"]["Lambda"].isna().all() and runs["tpl"]["Lambda"].notna().all()
    assert (runs["plain"]["num_fingers"] == 0).all()
    assert runs["ff"].loc["f", "num_fingers"] > 0
    assert runs["ff"].loc["f", "alpha"] < runs["plain"].loc["f", "alpha"] - 1


def test_cli_describe(finger_file, tmp_path, capsys):
    save_file({"tiny.weight": torch.ones(3, 3)}, str(tmp_path / "tiny.safetensors"))
    assert cli(["describe", str(finger_file)]) == 0
    out = capsys.readouterr().out
    assert "f" in out and "g" in out and "2 of 2 matrices would be analysed" in out
    assert cli(["describe", str(tmp_path / "tiny.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "0 of 1 matrices would be analysed" in out and "min_evals" in out
    assert cli(["describe", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file" in err


# ---- select ----------------------------------------------------------------------------------


def _rank_q_relevance(W: np.ndarray, q: int) -> np.ndarray:
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return sum(s[k] * np.outer(np.abs(U[:, k]), np.abs(Vt[k])) for k in range(q))


def _topk(S: np.ndarray, k: int) -> np.ndarray:
    flat = S.reshape(-1)
    return np.sort(np.lexsort((np.arange(flat.size), -flat))[:k])


def test_select_rank_and_method_are_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16))
    W = model[0].weight.detach().double().numpy()
    k = 30
    # score="relevance": the plain top-k of S, which the brute-force reference computes
    full = frogwatch.select(model, k, targets=["0"], score="relevance", progress=False)
    r2 = frogwatch.select(model, k, targets=["0"], rank=2, score="relevance", progress=False)
    np.testing.assert_array_equal(full.indices("0").numpy(), _topk(_rank_q_relevance(W, 16), k))
    np.testing.assert_array_equal(r2.indices("0").numpy(), _topk(_rank_q_relevance(W, 2), k))
    assert not torch.equal(full.indices("0"), r2.indices("0"))
    s = np.linalg.svd(W, compute_uv=False) ** 2
    assert r2.info("0").energy == pytest.approx(s[:2].sum() / s.sum(), rel=1e-10)
    assert full.meta["method"] == "exact" and r2.meta["rank"] == 2


def test_select_method_randomized_is_honoured():
    # a flat spectrum: a rank-5 randomized sketch misses part of the top-5 subspace, so it captures
    # strictly less energy than the exact rank-5 truncation (Eckart-Young), and selects otherwise
    model = nn.Sequential(nn.Linear(200, 200, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(_rand(200, 200, seed=7))
    k = 400
    exact = frogwatch.select(model, k, rank=5, score="relevance", progress=False)
    rnd = frogwatch.select(model, k, rank=5, method="randomized", score="relevance", progress=False)
    assert rnd.meta["method"] == "randomized"
    assert rnd.info("0").energy < exact.info("0").energy - 1e-3
    assert not torch.equal(rnd.indices("0"), exact.indices("0"))


def test_shira_counts_in_plus_out_on_non_square_layers():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = frogwatch.select(model, 0.3, progress=False)
    fn = masks.to_shira_mask_fn(model, resize=True)
    for r in (1, 2):
        assert int(fn(model[0], r).sum()) == r * (24 + 8)
        assert int(fn(model[2], r).sum()) == r * (8 + 4)
    exact = frogwatch.select(model, 2 * (24 + 8) + 2 * (8 + 4), progress=False)
    if exact.counts() == {"0": 64, "2": 24}:
        assert exact.shira_config(model).r == 2


# ---- select -> prepare -> train -> merge / save_delta / load_delta ---------------------------


def test_real_masks_from_select_drive_prepare_train_merge_and_delta(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    base = copy.deepcopy(model)
    masks = frogwatch.select(model, 0.1, progress=False)
    assert isinstance(masks, frogwatch.Masks)
    frogwatch.prepare(model, masks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == masks.n_selected
    opt = torch.optim.SGD(trainable, lr=0.5)
    x, y = _rand(64, 16, seed=1), _rand(64, 8, seed=2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    out_prepared = model(x).detach()
    frogwatch.save_delta(model, tmp_path / "d.safetensors")
    reloaded = frogwatch.load_delta(copy.deepcopy(base), tmp_path / "d.safetensors")
    torch.testing.assert_close(reloaded(x), out_prepared, rtol=0, atol=0)
    frogwatch.merge(model)
    torch.testing.assert_close(model(x), out_prepared, rtol=1e-6, atol=1e-6)
    for name in masks:
        changed = model.get_submodule(name).weight != base.get_submodule(name).weight
        assert changed.any()
        assert torch.equal(changed & ~masks[name], torch.zeros_like(changed)), name


def test_multi_chunk_sparse_gradient_matches_dense_autograd():
    """A sparse selection on a long batch: the gradient of delta is gathered in several chunks."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 256, bias=False)
    W0 = lin.weight.detach().clone()
    mask = torch.zeros(256 * 256, dtype=torch.bool)
    mask[torch.randperm(256 * 256, generator=torch.Generator().manual_seed(1))[:120]] = True
    model = nn.Sequential(lin)
    frogwatch.prepare(model, {"0": mask.view(256, 256)})
    x = _rand(65536, 256, seed=2)  # 65536 tokens: more entries than one gathered chunk holds
    g = _rand(65536, 256, seed=3)
    (model(x) * g).sum().backward()
    (delta,) = [p for p in model.parameters() if p.requires_grad]
    W = W0.clone().requires_grad_(True)
    (nn.functional.linear(x, W) * g).sum().backward()
    idx = torch.nonzero(mask).reshape(-1)
    torch.testing.assert_close(delta.grad, W.grad.reshape(-1)[idx], rtol=1e-4, atol=1e-3)


# ---- Trainer callback ------------------------------------------------------------------------


def test_trainer_callback_records_every_n_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    from frogwatch import FrogwatchCallback

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x = _rand(6, seed=i)
            return {"x": x, "labels": x.sum().reshape(1)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 12)
            self.out = nn.Linear(12, 1)

        def forward(self, x, labels=None):
            pred = self.out(torch.tanh(self.fc(x)))
            return {"loss": nn.functional.mse_loss(pred, labels), "logits": pred}

    torch.manual_seed(0)
    model = Net()
    frogwatch.prepare(model, frogwatch.select(model, 0.2, progress=False))
    cb = FrogwatchCallback(every_n_steps=3, compare_at_end=False, alpha=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb]).train()
    assert sorted(cb.history["step"].unique()) == [0, 3, 6, 7]
