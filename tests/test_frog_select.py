"""FROG selection against brute-force numpy on small models; targets, α blend, streaming."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from frogwatch.frog import relevance, resolve_targets
from frogwatch.frog import select as select_default


def select(*args, **kwargs):
    """The selection these brute-force tests check: FROG relevance unless a score is named."""
    kwargs.setdefault("score", "relevance")
    return select_default(*args, **kwargs)
from frogwatch.frog.budget import topk_flat


# ---- brute force -----------------------------------------------------------------------------


def np_relevance(W: np.ndarray) -> np.ndarray:
    U, s, Vt = np.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
    return (np.abs(U) * s) @ np.abs(Vt)


def np_top(values: np.ndarray, k: int) -> np.ndarray:
    """k largest, ties to the lower flat index, returned sorted."""
    return np.sort(np.argsort(-values.reshape(-1), kind="stable")[:k])


def np_budgets(norms, sizes, total, mult=None):
    """k_i = largest-remainder rounding of total · R_i m_i / Σ R m (no cap binds in these tests)."""
    w = np.asarray(norms) / np.sum(norms) * (1.0 if mult is None else np.asarray(mult))
    q = total * w / w.sum()
    k = np.floor(q).astype(int)
    for i in np.argsort(-(q - k), kind="stable")[: total - k.sum()]:
        k[i] += 1
    assert np.all(k <= sizes)
    return k


def weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: m.weight.detach().double().numpy() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def expected_per_matrix(model, budget, mult=None):
    Ws = weights(model)
    sizes = np.array([W.size for W in Ws.values()])
    total = budget if isinstance(budget, int) else int(math.floor(budget * sizes.sum() + 0.5))
    k = np_budgets([np.linalg.norm(W) for W in Ws.values()], sizes, total, mult)
    return {n: np_top(np_relevance(W), int(ki)) for (n, W), ki in zip(Ws.items(), k)}


def expected_global(model, total, mult=None):
    Ws = weights(model)
    mult = np.ones(len(Ws)) if mult is None else np.asarray(mult)
    scored = [np_relevance(W).reshape(-1) * m for W, m in zip(Ws.values(), mult)]
    order = np_top(np.concatenate(scored), total)
    out, start = {}, 0
    for n, s in zip(Ws, scored):
        out[n] = order[(order >= start) & (order < start + s.size)] - start
        start += s.size
    return out


def assert_selection(masks, expected, model=None):
    assert list(masks) == list(expected)
    Ws = weights(model) if model is not None else {}
    for name, idx in expected.items():
        np.testing.assert_array_equal(masks.indices(name).numpy(), idx, err_msg=name)
        assert int(masks[name].sum()) == len(idx)
        if name in Ws:
            S = np_relevance(Ws[name]).reshape(-1)
            np.testing.assert_allclose(masks.scores(name).numpy(), S[idx].astype(np.float32), rtol=1e-6)


def mlp(seed=0, dims=(12, 9, 7, 5)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def equal_norm_mlp(n=3, d=10, seed=0):
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(n)])
    torch.manual_seed(seed)
    with torch.no_grad():
        for lin in model:
            lin.weight.normal_()
            lin.weight /= lin.weight.norm()
    return model


# ---- selections equal brute force ------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.1, 0.37, 17])
def test_per_matrix_equals_brute_force(budget):
    model = mlp()
    masks = select(model, budget, progress=False)
    assert_selection(masks, expected_per_matrix(model, budget), model)
    total = budget if isinstance(budget, int) else round(budget * (12 * 9 + 9 * 7 + 7 * 5))
    assert masks.n_selected == total


@pytest.mark.parametrize("budget", [0.1, 0.6, 1])
def test_global_equals_numpy_topk_over_concatenation(budget):
    model = mlp(seed=1)
    masks = select(model, budget, strategy="global", progress=False)
    total = budget if isinstance(budget, int) else int(math.floor(budget * 206 + 0.5))
    assert_selection(masks, expected_global(model, total), model)
    df = masks.summary()
    assert df["k"].sum() == total
    for name in masks:  # §10 layer importance: Σ S of the selected weights
        S = np_relevance(weights(model)[name]).reshape(-1)
        expect = S[masks.indices(name).numpy()].sum()
        assert df.set_index("name").loc[name, "selected_score_sum"] == pytest.approx(expect, rel=1e-12)


def test_ties_between_identical_matrices_follow_model_order():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(6, 5))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight)
    g = select(model, 7, strategy="global", progress=False)
    assert_selection(g, expected_global(model, 7))
    assert g.counts() == {"0": 4, "1": 3}  # pairs of equal scores: the first matrix wins each tie
    p = select(model, 7, progress=False)
    assert p.counts() == {"0": 4, "1": 3}  # equal shares 3.5 : 3.5, the remainder to the first
    assert set(p.indices("1").tolist()) < set(p.indices("0").tolist())  # top-3 inside top-4


def test_exact_ties_within_a_matrix_go_to_lower_flat_index():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    assert torch.equal(relevance(model[0].weight), model[0].weight.double())  # S = |W| for a diagonal W
    masks = select(model, 6, progress=False)
    assert masks.indices("0").tolist() == [0, 1, 2, 5, 10, 15]


def test_budget_share_above_matrix_size_is_capped_and_redistributed():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(30, 30))
    with torch.no_grad():
        model[0].weight.mul_(1000.0)
    masks = select(model, 0.5, progress=False)
    assert masks.counts() == {"0": 4, "1": 448}  # round(0.5 · 904) = 452
    assert masks.indices("0").tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(masks.indices("1").numpy(), np_top(np_relevance(weights(model)["1"]), 448))


def test_full_budget_selects_everything():
    model = mlp()
    for strategy in ("per_matrix", "global"):
        masks = select(model, 1.0, strategy=strategy, progress=False)
        assert all(bool(m.all()) for m in masks.values())


# ---- targets ---------------------------------------------------------------------------------


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 9)
        self.conv = nn.Conv2d(2, 3, 2)
        self.b = nn.Linear(9, 5, bias=False)
        self.head = nn.Linear(5, 11)

    def get_output_embeddings(self):
        return self.head


def test_all_linear_skips_output_head_embeddings_and_convs():
    assert [lm.name for lm in resolve_targets(WithHead())] == ["a", "b"]
    plain = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.Linear(3, 5))
    assert [lm.name for lm in resolve_targets(plain)] == ["1", "2"]  # a plain module: every Linear


def test_all_linear_skips_lm_head_in_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"body.weight": torch.randn(5, 4), "lm_head.weight": torch.randn(7, 5)}, str(path))
    assert [lm.name for lm in resolve_targets(path)] == ["body"]


def test_regex_and_callable_targets():
    model = WithHead()
    assert [lm.name for lm in resolve_targets(model, ["^conv$", "head"])] == ["conv", "head"]
    assert [lm.name for lm in resolve_targets(model, "emb")] == ["emb"]
    assert [lm.name for lm in resolve_targets(model, lambda n, lm: lm.kind == "dense" and n != "a")] == ["b", "head"]
    masks = select(model, 0.2, targets=["conv"], progress=False)
    assert masks["conv"].shape == (3, 2, 2, 2)
    K = model.conv.weight.detach().double().numpy()
    np.testing.assert_array_equal(masks.indices("conv").numpy(), np_top(np_relevance(K), 5))


# ---- α blend ---------------------------------------------------------------------------------

ALPHA = {"0": 2.0, "1": math.nan, "2": 6.0}  # m = 0.5, 1 (failed fit: neutral), 1.5 at λ = 0.5


def test_blend_zero_is_plain_frog():
    model = mlp()
    plain = select(model, 0.2, progress=False)
    table = {"0": 2.0, "2": 9.0, "4": 4.0}
    for strategy in ("per_matrix", "global"):
        a = select(model, 0.2, strategy=strategy, progress=False)
        b = select(model, 0.2, strategy=strategy, blend=0.0, alpha=table, progress=False)
        for n in a:
            assert torch.equal(a.indices(n), b.indices(n))
        assert b.summary()["multiplier"].tolist() == [1.0, 1.0, 1.0]
        assert b.summary()["alpha"].tolist() == [2.0, 9.0, 4.0]
    assert plain.counts() == select(model, 0.2, alpha=table, progress=False).counts()


@pytest.mark.parametrize(
    "direction, counts",
    [("undertrained-first", {"0": 10, "1": 20, "2": 30}), ("overtrained-first", {"0": 30, "1": 20, "2": 10})],
)
def test_blend_moves_budget_by_alpha(direction, counts):
    model = equal_norm_mlp()
    assert select(model, 60, progress=False).counts() == {"0": 20, "1": 20, "2": 20}
    masks = select(model, 60, blend=0.5, alpha=ALPHA, direction=direction, progress=False)
    assert masks.counts() == counts  # the failed-fit layer keeps its plain share
    df = masks.summary().set_index("name")
    assert df.loc["1", "multiplier"] == 1.0 and math.isnan(df.loc["1", "alpha"])
    assert df["importance"].sum() == pytest.approx(1.0)
    mult = df["multiplier"].to_numpy()
    assert_selection(masks, expected_per_matrix(model, 60, mult), model)


def test_blend_accepts_analyze_dataframe_with_failed_status():
    model = equal_norm_mlp()
    df = pd.DataFrame(
        {"name": ["0", "1", "2"], "alpha": [2.0, 3.3, 6.0], "status": ["success", "failed", "success"]}
    )
    assert select(model, 60, blend=0.5, alpha=df, progress=False).counts() == {"0": 10, "1": 20, "2": 30}


def test_global_blend_scales_scores_by_multiplier():
    model = equal_norm_mlp(seed=3)
    masks = select(model, 45, strategy="global", blend=0.5, alpha=ALPHA, progress=False)
    assert_selection(masks, expected_global(model, 45, [0.5, 1.0, 1.5]), model)
    plain = select(model, 45, strategy="global", progress=False)
    assert masks.counts()["2"] > plain.counts()["2"] and masks.counts()["0"] < plain.counts()["0"]


def test_blend_without_alpha_runs_analyze(monkeypatch):
    analyze_module = pytest.importorskip("frogwatch.analyze")
    calls = []

    def fake_analyze(model, **kwargs):
        calls.append(kwargs)
        return pd.DataFrame({"name": list(ALPHA), "alpha": list(ALPHA.values()), "status": "success"})

    monkeypatch.setattr(analyze_module, "analyze", fake_analyze)
    masks = select(equal_norm_mlp(), 60, blend=0.5, progress=False)
    assert len(calls) == 1 and masks.counts() == {"0": 10, "1": 20, "2": 30}


# ---- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["per_matrix", "global"])
def test_streamed_file_equals_in_memory(tmp_path, strategy):
    model = mlp(seed=4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    a = select(model, 0.15, strategy=strategy, progress=False)
    b = select(path, 0.15, strategy=strategy, progress=False)
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a.indices(n), b.indices(n)) and torch.equal(a.scores(n), b.scores(n))
    pd.testing.assert_frame_equal(a.summary().drop(columns="kind"), b.summary().drop(columns="kind"))


def test_streamed_gpt2_equals_in_memory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path)
    a = select(model, 0.05, strategy="global", progress=False)
    b = select(tmp_path, 0.05, strategy="global", progress=False)
    assert list(a) == list(b) and len(a) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block; no wte/wpe/lm_head
    assert all(".h." in n for n in a)
    for n in a:
        assert a[n].shape == b[n].shape and torch.equal(a.indices(n), b.indices(n))


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"strategy": "layerwise"}, "strategy"),
        ({"direction": "up"}, "direction"),
        ({"blend": 1.5}, "blend"),
        ({"blend": -0.1}, "blend"),
        ({"targets": ["nomatch"]}, "matched none"),
        ({"targets": []}, "targets"),
        ({"targets": ["("]}, "regex"),
        ({"method": "qr"}, "method"),
        ({"budget": 0}, "budget"),
        ({"budget": 2.0}, "budget"),
        ({"blend": 0.5, "alpha": {"x": 1.0}}, "none of"),
    ],
)
def test_select_validation(kwargs, msg):
    kwargs = {"budget": 0.1, **kwargs}
    with pytest.raises(ValueError, match=msg):
        select(mlp(), kwargs.pop("budget"), progress=False, **kwargs)


def test_nan_weights_are_an_error():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    for strategy in ("per_matrix", "global"):
        with pytest.raises(ValueError, match="2: weights contain NaN"):
            select(model, 0.1, strategy=strategy, progress=False)


# ---- the real model --------------------------------------------------------------------------


def test_real_minilm_block_selection(minilm_session):
    model = minilm_session
    names = [lm.name for lm in resolve_targets(model)]
    assert len(names) == 37 and names[-1] == "pooler.dense" and not any("embeddings" in n for n in names)
    masks = select(model, 0.01, targets=[r"^encoder\.layer\.0\.attention\.self\.(query|value)$"], progress=False)
    assert list(masks) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    sizes = masks.summary()["size"].sum()
    assert masks.n_selected == round(0.01 * sizes)
    q = model.encoder.layer[0].attention.self.query.weight.detach().double().numpy()
    k = masks.counts()["encoder.layer.0.attention.self.query"]
    np.testing.assert_array_equal(
        masks.indices("encoder.layer.0.attention.self.query").numpy(), np_top(np_relevance(q), k)
    )
    # A randomized S of half the spectrum recovers most of the exact 1 % selection.
    S = relevance(q)
    S_r, energy = relevance(q, method="randomized", rank=192, return_energy=True)
    a, b = set(topk_flat(S, k).tolist()), set(topk_flat(S_r, k).tolist())
    assert 0.9 < energy < 1.0 and len(a & b) / len(a | b) > 0.7


# ---- score variants, mixture, floor (issue: selection must earn its place) ----------------------

from frogwatch.frog import scorers as _scorers  # noqa: E402


def _np_counts(model, budget):
    Ws = weights(model)
    sizes = np.array([W.size for W in Ws.values()])
    total = budget if isinstance(budget, int) else int(math.floor(budget * sizes.sum() + 0.5))
    return Ws, np_budgets([np.linalg.norm(W) for W in Ws.values()], sizes, total)


def _np_score(W, score):
    S = np_relevance(W)
    if score == "normalized":
        return S / np.outer(S.mean(1), S.mean(0))
    if score == "magnitude":
        return np.abs(W)
    return S


@pytest.mark.parametrize("score", ["relevance", "normalized", "magnitude", "balanced"])
def test_per_matrix_scores_equal_brute_force(score):
    model = mlp(seed=2)
    Ws, k = _np_counts(model, 0.2)
    masks = select(model, 0.2, score=score, progress=False)
    assert masks.meta["score"] == score
    for (name, W), ki in zip(Ws.items(), k):
        V = _np_score(W, score)
        want = np_balanced_sel(V, int(ki)) if score == "balanced" else np_top(V, int(ki))
        np.testing.assert_array_equal(masks.indices(name).numpy(), want, err_msg=name)
        np.testing.assert_allclose(masks.scores(name).numpy(), V.reshape(-1)[want].astype(np.float32), rtol=1e-5)


def np_balanced_sel(V, k):
    m, n = V.shape
    rows, cols, taken = np.zeros(m, int), np.zeros(n, int), []
    order = np.argsort(-V.reshape(-1), kind="stable")
    for idx in order:
        i, j = divmod(int(idx), n)
        if len(taken) < k and rows[i] < -(-k // m) and cols[j] < -(-k // n):
            rows[i], cols[j] = rows[i] + 1, cols[j] + 1
            taken.append(int(idx))
    taken += [int(i) for i in order if int(i) not in taken][: k - len(taken)]
    return np.sort(taken)


def test_random_score_is_seeded_with_frobenius_counts():
    model = mlp(seed=3)
    a = select(model, 0.1, score="random", seed=5, progress=False)
    b = select(model, 0.1, score="random", seed=5, progress=False)
    c = select(model, 0.1, score="random", seed=6, progress=False)
    assert a == b and a != c
    assert a.counts() == select(model, 0.1, progress=False).counts()
    assert all(math.isnan(a.info(n).energy) for n in a)


def test_random_share_one_is_a_random_mask_and_half_keeps_top_scores():
    model = mlp(seed=4)
    full = select(model, 0.3, random_share=1.0, seed=1, progress=False)
    rel = select(model, 0.3, progress=False)
    assert full.counts() == rel.counts() and full != rel
    half = select(model, 0.3, random_share=0.5, seed=1, progress=False)
    for name, W in weights(model).items():
        k = rel.counts()[name]
        idx = set(half.indices(name).tolist())
        assert len(idx) == k
        S = np_relevance(W).reshape(-1)
        gen = _scorers.matrix_generator(1 + 1_000_003, name)
        rand = set(torch.randperm(W.size, generator=gen)[: int(math.floor(0.5 * k + 0.5))].tolist())
        rest = np_top(np.where(np.isin(np.arange(S.size), list(rand)), -np.inf, S), k - len(rand))
        assert idx == rand | set(rest.tolist())


def test_global_floor_gives_every_matrix_its_top_entries_and_warns_without_it():
    model = mlp(seed=1, dims=(40, 30, 4, 3))  # the small matrices lose the global ranking
    with pytest.warns(UserWarning, match=r"1 of 3 targeted matrices got no weights"):
        plain = select(model, 0.05, strategy="global", progress=False)
    assert min(plain.counts().values()) == 0
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        floored = select(model, 0.05, strategy="global", min_per_matrix=2, progress=False)
    total = int(math.floor(0.05 * (40 * 30 + 30 * 4 + 4 * 3) + 0.5))
    assert floored.n_selected == total
    Ws = weights(model)
    scored = {n: np_relevance(W).reshape(-1) for n, W in Ws.items()}
    floor_idx = {n: np_top(s, 2) for n, s in scored.items()}
    rest = np.concatenate([np.where(np.isin(np.arange(s.size), floor_idx[n]), -np.inf, s) for n, s in scored.items()])
    pool = np_top(rest, total - 6)
    start = 0
    for n, s in scored.items():
        want = np.union1d(floor_idx[n], pool[(pool >= start) & (pool < start + s.size)] - start)
        np.testing.assert_array_equal(floored.indices(n).numpy(), want, err_msg=n)
        start += s.size


def test_per_matrix_floor_and_bad_options():
    model = mlp(seed=1, dims=(40, 30, 4, 3))
    m = select(model, 10, min_per_matrix=3, progress=False)
    norms = [np.linalg.norm(W) for W in weights(model).values()]
    assert list(m.counts().values()) == [4, 3, 3] and norms[0] == max(norms)  # 3 each, the last to the largest R
    assert min(select(model, 10, progress=False).counts().values()) < 3
    with pytest.raises(ValueError, match="min_per_matrix"):
        select(model, 10, min_per_matrix=4, progress=False)
    with pytest.raises(ValueError, match="balanced"):
        select(model, 0.1, strategy="global", score="balanced", progress=False)
    with pytest.raises(ValueError, match="score"):
        select(model, 0.1, score="svd", progress=False)
    with pytest.raises(ValueError, match="random_share"):
        select(model, 0.1, random_share=1.5, progress=False)
    with pytest.raises(TypeError, match="seed"):
        select(model, 0.1, seed=1.5, progress=False)
    for bad in ({"rank": 2}, {"method": "randomized"}):  # S settings with a score that computes no S
        with pytest.raises(ValueError, match="score 'random'"):
            select_default(model, 0.1, progress=False, **bad)
        with pytest.raises(ValueError, match="score 'magnitude'"):
            select(model, 0.1, score="magnitude", progress=False, **bad)


def test_global_random_share_spreads_random_entries_by_size():
    model = mlp(seed=1, dims=(40, 30, 4, 3))
    m = select(model, 0.1, strategy="global", random_share=1.0, seed=0, progress=False)
    sizes = np.array([1200, 120, 12])
    from frogwatch.frog.budget import allocate

    assert list(m.counts().values()) == allocate(sizes.astype(float), sizes, m.n_selected).tolist()


def test_default_score_is_the_seeded_random_mask_for_both_strategies():
    """Issue 10's decision (benchmarks/results_finetune.md): Frobenius k_i, random entries, seed 0."""
    model = mlp(seed=5)
    d = select_default(model, 0.2, progress=False)
    assert d == select(model, 0.2, score="random", seed=0) and d.meta["score"] == "random"
    assert d != select(model, 0.2, score="random", seed=1) and d != select(model, 0.2, score="balanced")
    assert select_default(model, 0.2, score=None, progress=False) == d
    # per matrix: the Frobenius counts of FROG, uniformly random entries from the (seed, name) generator
    from frogwatch.frog.scorers import matrix_generator

    Ws = weights(model)
    k = np_budgets([np.linalg.norm(W) for W in Ws.values()], [W.size for W in Ws.values()], d.n_selected)
    for (name, W), ki in zip(Ws.items(), k):
        u = torch.rand(W.shape, generator=matrix_generator(0, name), dtype=torch.float64).numpy()
        np.testing.assert_array_equal(d.indices(name).numpy(), np_top(u, int(ki)), err_msg=name)
    g = select_default(model, 0.2, strategy="global", progress=False)
    assert g == select(model, 0.2, strategy="global", score="random", seed=0) and g.meta["score"] == "random"


# ---- zero-budget matrices, meta, global random share with floors (found by benchmarks/mutation.py)


def test_per_matrix_zero_budget_matrix_in_the_middle():
    model = mlp(seed=2, dims=(8, 6, 5, 4))
    with torch.no_grad():
        model[2].weight.zero_()  # R = 0: no budget
    with pytest.warns(UserWarning, match=r"1 of 3 targeted matrices got no weights"):
        m = select(model, 12, progress=False)
    assert m.counts()["2"] == 0 and m.indices("2").dtype == torch.int64 and m.scores("2").numel() == 0
    assert math.isnan(m.info("2").energy) and m.info("2").score_sum == 0.0
    Ws = weights(model)
    norms = [np.linalg.norm(Ws["0"]), np.linalg.norm(Ws["4"])]
    k = np_budgets(norms, [48, 20], 12)
    for name, ki in zip(["0", "4"], k):  # the matrix after the empty one is still selected
        S = np_relevance(Ws[name]).reshape(-1)
        idx = np_top(S, int(ki))
        np.testing.assert_array_equal(m.indices(name).numpy(), idx)
        assert m.info(name).score_sum == pytest.approx(S[idx].sum(), rel=1e-12)
        assert m.info(name).energy == 1.0


@pytest.mark.parametrize("budget, stored", [(12, 12), (np.int64(12), 12), (0.25, 0.25), (np.float32(0.5), 0.5)])
def test_meta_keeps_a_count_as_int_and_a_fraction_as_float(budget, stored):
    meta = select(mlp(), budget, progress=False).meta
    assert meta["budget"] == stored and type(meta["budget"]) is type(stored)


def _global_reference(model, total, rho, floor, seed):
    """Random entries spread by size (seeded per matrix), then each matrix's top `floor`, then the
    global top of what is left."""
    from frogwatch.frog.budget import allocate

    Ws = weights(model)
    S = {n: np_relevance(W).reshape(-1) for n, W in Ws.items()}
    sizes = np.array([s.size for s in S.values()])
    n_rand = int(math.floor(rho * total + 0.5))
    k_rand = allocate(sizes.astype(float), sizes, n_rand)
    fixed = {}
    for (n, s), kr in zip(S.items(), k_rand):
        gen = _scorers.matrix_generator(seed + 1_000_003, n)
        rand = torch.randperm(s.size, generator=gen)[: int(kr)].numpy()
        f = min(floor, s.size - int(kr))
        rest = np_top(np.where(np.isin(np.arange(s.size), rand), -np.inf, s), f)
        fixed[n] = np.union1d(rand, rest)
    pool_n = total - sum(len(v) for v in fixed.values())
    left = np.concatenate([np.where(np.isin(np.arange(s.size), fixed[n]), -np.inf, s) for n, s in S.items()])
    pool = np_top(left, pool_n)
    out, start = {}, 0
    for n, s in S.items():
        out[n] = np.union1d(fixed[n], pool[(pool >= start) & (pool < start + s.size)] - start)
        start += s.size
    return out


@pytest.mark.parametrize("budget, rho, floor", [(0.1, 1.0, 0), (0.1, 0.5, 0), (0.1, 0.3, 2), (0.9, 0.5, 8)])
def test_global_random_share_and_floor_against_brute_force(budget, rho, floor):
    model = mlp(seed=1, dims=(40, 30, 4, 3))
    total = int(math.floor(budget * (1200 + 120 + 12) + 0.5))
    m = select(model, budget, strategy="global", random_share=rho, min_per_matrix=floor, seed=3, progress=False)
    assert m.n_selected == total
    for name, idx in _global_reference(model, total, rho, floor, seed=3).items():
        np.testing.assert_array_equal(m.indices(name).numpy(), idx, err_msg=name)
    assert m == select(model, budget, strategy="global", random_share=rho, min_per_matrix=floor, seed=3,
                       progress=False)  # fmt: skip


def test_global_floor_plus_random_share_beyond_the_budget_is_an_error():
    with pytest.raises(ValueError) as e:
        select(mlp(seed=1, dims=(40, 30, 4, 3)), 10, strategy="global", random_share=1.0, min_per_matrix=1,
               progress=False)  # fmt: skip
    assert str(e.value) == (
        "select: min_per_matrix 1 plus random_share 1.0 need more than the 10 weights of the budget"
    )


def test_init_scale_uses_relevance_whatever_the_selection_score():
    """prepare's relevance-scaled init multiplies by S, not by the score that picked the entries."""
    from frogwatch.frog.masks import Masks
    from frogwatch.frog.model import prepare

    model = mlp(seed=2)
    for score in ("random", "magnitude", "normalized"):
        masks = select(model, 0.3, score=score, progress=False)
        plain = Masks.from_indices({n: masks.indices(n) for n in masks}, {n: masks.info(n).shape for n in masks})
        a = prepare(copy.deepcopy(model), masks, init_scale=0.1, seed=4)
        b = prepare(copy.deepcopy(model), plain, init_scale=0.1, seed=4)  # no scores: prepare computes S
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=0, msg=f"{score}: {na}")


# ---- behaviours pinned after reading the mutation survivors (BENCHMARKS.md §6) -------------------


@pytest.mark.parametrize("strategy, bars", [("per_matrix", ["frog norms", "frog select"]),
                                            ("global", ["frog select"])])  # fmt: skip
def test_progress_bars_only_when_asked_and_cleared_after(capsys, strategy, bars):
    select(mlp(), 0.2, strategy=strategy, progress=False)
    assert capsys.readouterr().err == ""
    select(mlp(), 0.2, strategy=strategy, progress=True)
    err = capsys.readouterr().err
    for desc in bars:
        assert f"\r{desc}:   0%|" in err and "| 0/3 [" in err and "matrix/s]" in err
    assert "frog norms" in err if strategy == "per_matrix" else "frog norms" not in err
    assert "\n" not in err  # leave=False: the bars are wiped, no line is left behind


def test_global_keeps_exact_flat_indices_beyond_float32_precision():
    # 4097 x 4096 > 2**24 entries: an index above 2**24 must stay an integer all the way (a float32
    # pool would round 2**24 + 1 to 2**24)
    lin = nn.Linear(4096, 4097, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight.view(-1)[2**24 + 1] = 1.0
    masks = select_default(nn.Sequential(lin), 1, strategy="global", score="magnitude", progress=False)
    assert masks.indices("0").tolist() == [2**24 + 1]


@pytest.mark.parametrize("floor", [0, 1])
def test_global_single_random_entry_and_a_floor_equal_to_it_against_brute_force(floor):
    # 20 weights, half random: the 4x30 matrix gets exactly 1 random entry (k_rand = 1), and with
    # floor 1 its floor equals its random count
    model = mlp(seed=1, dims=(40, 30, 4, 3))
    m = select(model, 20, strategy="global", random_share=0.5, min_per_matrix=floor, seed=3, progress=False)
    assert m.n_selected == 20
    for name, idx in _global_reference(model, 20, 0.5, floor, seed=3).items():
        np.testing.assert_array_equal(m.indices(name).numpy(), idx, err_msg=name)


def test_rank_truncates_the_relevance_used_for_the_selection():
    model = mlp()
    m = select(model, 0.2, rank=2, method="exact", progress=False)
    Ws = weights(model)
    k = {n: int(m[n].sum()) for n in Ws}
    for n, W in Ws.items():
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        S2 = ((np.abs(U[:, :2]) * s[:2]) @ np.abs(Vt[:2])).reshape(-1)
        idx = np_top(S2, k[n])
        np.testing.assert_array_equal(m.indices(n).numpy(), idx, err_msg=n)
        np.testing.assert_allclose(m.scores(n).numpy(), S2[idx], rtol=1e-5)
    assert m.meta["rank"] == 2


def test_select_returns_freed_heap_memory_to_the_os(monkeypatch):
    import ctypes
    import sys

    calls = []

    class FakeLibc:
        def __init__(self, name):
            self.name = name

        def malloc_trim(self, pad):
            calls.append((self.name, pad))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", FakeLibc)
    monkeypatch.setattr(sys, "platform", "linux")
    select(mlp(), 0.2, progress=False)
    assert calls and set(calls) == {("libc.so.6", 0)}  # glibc's malloc_trim(0), once per scored matrix
    assert len(calls) == 3


def test_recurrent_gate_matrices_are_never_targets():
    model = nn.Sequential(nn.LSTM(4, 3), nn.Linear(3, 2))
    assert [lm.name for lm in resolve_targets(model, ".*")] == ["1"]


def test_all_linear_skips_a_nested_lm_head_in_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"base.model.body.weight": torch.randn(5, 4), "base.model.lm_head.weight": torch.randn(7, 5),
               "base.model.embed_out.weight": torch.randn(7, 5)}, str(path))  # fmt: skip
    assert [lm.name for lm in resolve_targets(path)] == ["base.model.body"]


def test_all_linear_matching_nothing_says_so():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError) as e:
        resolve_targets(model)
    assert str(e.value) == "'all-linear' matched none of the model's 2 weight matrices (e.g. ['0', '1'])"


def test_blend_without_alpha_analyzes_this_model_with_the_progress_setting(monkeypatch):
    analyze_module = pytest.importorskip("frogwatch.analyze")
    calls = []

    def fake_analyze(model, **kwargs):
        calls.append((model, kwargs))
        return pd.DataFrame({"name": list(ALPHA), "alpha": list(ALPHA.values()), "status": "success"})

    monkeypatch.setattr(analyze_module, "analyze", fake_analyze)
    model = equal_norm_mlp()
    select(model, 60, blend=0.5, progress=False)
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] == {"progress": False}


def test_random_score_follows_the_seed():
    model = mlp()
    a, b = (select(model, 0.2, score="random", seed=s, progress=False) for s in (0, 1))
    assert a.counts() == b.counts()
    assert any(not torch.equal(a.indices(n), b.indices(n)) for n in a)
    assert select(model, 0.2, score="random", seed=1, progress=False) == b


def test_method_sets_how_the_truncated_relevance_is_computed():
    model = mlp(dims=(40, 30))
    W = model[0].weight.detach()
    m = select(model, 0.1, method="randomized", rank=2, progress=False)
    S_rand = relevance(W, method="randomized", rank=2).reshape(-1)
    S_exact = relevance(W, method="exact", rank=2).reshape(-1)
    assert not torch.allclose(S_rand, S_exact, rtol=1e-9, atol=0)  # the two methods differ here
    torch.testing.assert_close(m.scores("0"), S_rand[m.indices("0").long()].to(m.scores("0").dtype))


def test_targets_that_match_nothing_or_are_malformed_say_so():
    six = nn.Sequential(*[nn.Linear(3, 3) for _ in range(6)])
    cases = [
        (lambda name, lm: False, "the targets callable matched none of the model's 6 weight matrices "
                                 "(e.g. ['0', '1', '2', '3'])"),
        ("nomatch", "targets ['nomatch'] matched none of the model's 6 weight matrices (e.g. ['0', '1', '2', '3'])"),
        (3, "targets must be 'all-linear', a regex or list of regexes over module names, or a "
            "callable(name, LayerMatrix) -> bool; got 3"),
        (["0", 3], "targets must be 'all-linear', a regex or list of regexes over module names, or a "
                   "callable(name, LayerMatrix) -> bool; got ['0', 3]"),
    ]  # fmt: skip
    for targets, message in cases:
        with pytest.raises(ValueError) as e:
            resolve_targets(six, targets)
        assert str(e.value) == message


def test_select_defaults_one_percent_with_progress_bars(capsys):
    model = mlp()  # 108 + 63 + 35 = 206 weights: round(0.01 * 206) = 2
    with pytest.warns(UserWarning, match="1 of 3 targeted matrices got no weights"):
        m = select_default(model)
    assert m.meta["budget"] == 0.01 and m.n_selected == 2 and m.meta["score"] == "random"
    assert "frog select" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, err, message", [
    ({"strategy": "x"}, ValueError, "select: strategy must be one of 'per_matrix', 'global', got 'x'"),
    ({"method": "x"}, ValueError, "select: method must be one of 'exact', 'randomized', 'auto', got 'x'"),
    ({"strategy": 1}, TypeError, "select: strategy must be one of 'per_matrix', 'global', got 1"),
    ({"score": "x"}, ValueError,
     "select: score must be one of 'relevance', 'balanced', 'normalized', 'bulk', 'magnitude', 'random', got 'x'"),
    ({"random_share": -0.1}, ValueError, "select: random_share must be a number >= 0 and <= 1, got -0.1"),
    ({"random_share": 1.5}, ValueError, "select: random_share must be a number >= 0 and <= 1, got 1.5"),
    ({"seed": "x"}, TypeError, "select: seed must be an int, got 'x'"),
    ({"min_per_matrix": -1}, ValueError, "select: min_per_matrix must be an int >= 0, got -1"),
    ({"min_per_matrix": "x"}, TypeError, "select: min_per_matrix must be an int, got 'x'"),
])  # fmt: skip
def test_select_argument_errors_word_for_word(kwargs, err, message):
    with pytest.raises(err) as e:
        select(mlp(), 0.5, progress=False, **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("score", ["relevance", "balanced", "normalized"])
def test_rank_and_method_are_taken_by_the_svd_scores(score):
    m = select(mlp(), 0.2, score=score, rank=2, method="randomized", progress=False)
    assert m.meta["rank"] == 2 and m.meta["method"] == "randomized" and m.n_selected == 41


def test_rank_or_method_with_another_score_and_balanced_global_are_refused():
    with pytest.raises(ValueError) as e:
        select(mlp(), 0.2, score="magnitude", rank=2, progress=False)
    assert str(e.value) == ("select: method and rank set how S is computed; score 'magnitude' uses no truncated S "
                            "(pass score='relevance', 'balanced' or 'normalized')")  # fmt: skip
    with pytest.raises(ValueError) as e:
        select(mlp(), 0.2, score="balanced", strategy="global", progress=False)
    assert str(e.value) == "select: score 'balanced' needs strategy='per_matrix' (its caps are per matrix)"


def test_floors_may_use_the_whole_budget_but_not_more():
    m = select(mlp(), 30, min_per_matrix=10, progress=False)  # 3 matrices x 10 = the budget
    assert m.counts() == {"0": 10, "2": 10, "4": 10}
    with pytest.raises(ValueError) as e:
        select(mlp(), 30, min_per_matrix=11, progress=False)
    assert str(e.value) == "select: min_per_matrix must be at most 10 for a budget of 30 weights over 3 matrices, got 11"


@pytest.mark.parametrize("alpha, norms", [(ALPHA, (1.0, 2.0, 3.0)), ({"0": 2.0, "1": 6.0, "2": 6.0}, (1.0, 2.0, 3.0)),
                                          (ALPHA, (3.0, 2.0, 1.0))])  # Σ R m above and below 1
def test_mask_info_and_meta_record_the_selection(alpha, norms):
    model = equal_norm_mlp()
    with torch.no_grad():
        for c, lin in zip(norms, model):
            lin.weight *= c  # Frobenius norms as given
    m = select(model, 60, blend=0.5, alpha=alpha, direction="undertrained-first", rank=3, progress=False)
    R = np.array(norms) / 6.0
    mult = np.array([m.info(n).multiplier for n in ("0", "1", "2")])
    assert not np.allclose(mult, 1.0)
    w = R * mult
    for i, n in enumerate(("0", "1", "2")):
        info = m.info(n)
        assert info.kind == "dense" and info.shape == (10, 10)
        assert info.R == pytest.approx(R[i], rel=1e-6)  # float32 norms
        assert info.importance == pytest.approx(w[i] / w.sum(), rel=1e-6)
    meta = m.meta
    assert {k: meta[k] for k in ("strategy", "budget", "n_trainable", "blend", "direction", "method", "rank",
                                 "score", "random_share", "seed", "min_per_matrix")} == {  # fmt: skip
        "strategy": "per_matrix", "budget": 60, "n_trainable": 60, "blend": 0.5,
        "direction": "undertrained-first", "method": "exact", "rank": 3, "score": "relevance",
        "random_share": 0.0, "seed": 0, "min_per_matrix": 0}


def test_starved_matrices_warning_lists_three_and_points_at_the_caller():
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)])
    with pytest.warns(UserWarning) as rec:
        select(model, 1, progress=False)
    msg = str(rec[0].message)
    assert msg.startswith("select: 4 of 5 targeted matrices got no weights (per_matrix, e.g. [") and msg.count("'") == 6
    assert rec[0].filename == __file__ or rec[0].filename.endswith("mutmut/mutation/trampoline.py")


def test_importance_falls_back_to_the_norm_shares_when_every_blended_weight_is_zero():
    # blend 1: the zero matrix is favoured (m = 2), the other disfavoured (m = 0), so every R·m is 0
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.zero_()
    m = select(model, 4, blend=1.0, alpha={"0": 6.0, "1": 2.0}, progress=False)
    assert [(m.info(n).R, m.info(n).multiplier, m.info(n).importance) for n in ("0", "1")] == [
        (0.0, 2.0, 0.0), (1.0, 0.0, 1.0)]
