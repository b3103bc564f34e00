"""FROG scores: relevance S against brute-force numpy, R, and the α multiplier."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from frogwatch.frog import scores
from frogwatch.frog.scores import alpha_lookup, alpha_multipliers, matrix_importance, relevance_2d
from frogwatch.frog.select import relevance


def brute_relevance(W: np.ndarray) -> np.ndarray:
    """S_ij = Σ_k σ_k |u_ik| |v_jk| with explicit loops over i, j, k (numpy SVD)."""
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    S = np.zeros(W.shape)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            S[i, j] = sum(s[k] * abs(U[i, k]) * abs(Vt[k, j]) for k in range(len(s)))
    return S


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (1, 4)])
def test_relevance_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    W = rng.standard_normal(shape)
    S = relevance(torch.from_numpy(W))
    assert S.dtype == torch.float64 and S.shape == W.shape
    np.testing.assert_allclose(S.numpy(), brute_relevance(W), rtol=1e-12, atol=1e-12)


def test_relevance_accepts_float32_numpy_and_conv():
    rng = np.random.default_rng(0)
    W32 = rng.standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_allclose(relevance(W32).numpy(), brute_relevance(W32.astype(np.float64)), atol=1e-12)
    K = rng.standard_normal((4, 3, 2, 2))  # conv2d (out, in, kh, kw) -> (out, in*kh*kw)
    S = relevance(torch.from_numpy(K))
    assert S.shape == K.shape
    np.testing.assert_allclose(S.reshape(4, 12).numpy(), brute_relevance(K.reshape(4, 12)), atol=1e-12)


def test_relevance_of_transpose_is_transpose():
    W = torch.randn(9, 4, dtype=torch.float64)
    torch.testing.assert_close(relevance(W.T), relevance(W).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_relevance_dominates_abs_weights(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(12, 8, generator=g, dtype=torch.float64)
    if seed % 2:  # rank-deficient and with exact zeros
        W = W[:, :3] @ torch.randn(3, 8, generator=g, dtype=torch.float64)
        W[0] = 0.0
    S = relevance(W)
    assert bool((S >= W.abs() - 1e-12).all())


def test_zero_matrix_has_zero_relevance_and_full_energy():
    S, e = relevance(torch.zeros(3, 4), return_energy=True)
    assert torch.equal(S, torch.zeros(3, 4, dtype=torch.float64)) and e == 1.0


def test_truncated_exact_energy_and_low_rank_randomized():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    S_full, e_full = relevance(W, return_energy=True)
    assert e_full == 1.0
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    _, e5 = relevance(W, rank=5, return_energy=True)
    assert e5 == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-12)
    # An exactly rank-4 matrix: a rank-6 randomized SVD captures all of it and reproduces S.
    L = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g, dtype=torch.float64)
    S_r, e_r = relevance(L, rank=6, method="randomized", return_energy=True)
    assert e_r == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(S_r.numpy(), brute_relevance(L.numpy()), atol=1e-9)
    # Randomized is deterministic and full-rank randomized agrees with exact.
    S_a = relevance(W, rank=30, method="randomized")
    torch.testing.assert_close(S_a, relevance(W, rank=30, method="randomized"), rtol=0, atol=0)
    torch.testing.assert_close(S_a, S_full, rtol=1e-8, atol=1e-8)


def test_auto_method_switches_at_threshold(monkeypatch):
    W = torch.randn(60, 50, dtype=torch.float64)
    exact, _ = relevance_2d(W, method="exact", rank=5)
    rand, _ = relevance_2d(W, method="randomized", rank=5)
    assert not torch.equal(exact, rand)
    assert torch.equal(relevance_2d(W, method="auto", rank=5)[0], exact)  # below the threshold
    monkeypatch.setattr(scores, "AUTO_RANDOMIZED_MIN_DIM", 50)
    assert torch.equal(relevance_2d(W, method="auto", rank=5)[0], rand)
    assert scores.default_rank(20, 16) == 16 and scores.default_rank(1000, 768) == 384 and scores.default_rank(10, 100) == 10


@pytest.mark.parametrize(
    "W, kwargs, msg",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), {}, "NaN or Inf"),
        (torch.ones(3), {}, "2-D"),
        (torch.ones(2, 2, 2), {}, "2-D"),
        (torch.ones(3, 3), {"method": "svd"}, "method"),
        (torch.ones(3, 3), {"rank": 0}, "rank"),
        (torch.ones(3, 3), {"rank": 1.5}, "rank"),
    ],
)
def test_relevance_validation(W, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        relevance(W, **kwargs)


def test_matrix_importance():
    np.testing.assert_allclose(matrix_importance([1.0, 3.0]), [0.25, 0.75])
    np.testing.assert_allclose(matrix_importance([0.0, 0.0]), [0.5, 0.5])
    with pytest.raises(ValueError):
        matrix_importance([1.0, -1.0])


def test_alpha_multiplier_map():
    a = [2.0, 4.0, 6.0, math.nan]
    np.testing.assert_allclose(alpha_multipliers(a, 0.0), [1, 1, 1, 1])
    np.testing.assert_allclose(alpha_multipliers(a, 0.5), [0.5, 1.0, 1.5, 1.0])
    np.testing.assert_allclose(alpha_multipliers(a, 0.5, "overtrained-first"), [1.5, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(alpha_multipliers(a, 1.0), [0.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(alpha_multipliers([3.0, 3.0, math.nan], 0.7), [1, 1, 1])
    np.testing.assert_allclose(alpha_multipliers([3.0, math.inf], 0.7), [1, 1])
    for bad in (-0.1, 1.5, math.nan, "0.5", True):
        with pytest.raises(ValueError, match="blend"):
            alpha_multipliers(a, bad)
    with pytest.raises(ValueError, match="direction"):
        alpha_multipliers(a, 0.5, "sideways")


def test_alpha_lookup_forms():
    df = pd.DataFrame(
        {"name": ["a", "b", "c"], "alpha": [2.0, 5.0, 9.0], "status": ["success", "failed", "success"]}
    )
    np.testing.assert_array_equal(alpha_lookup(df, ["c", "b", "z"]), [9.0, np.nan, np.nan])
    np.testing.assert_array_equal(alpha_lookup({"a": 3, "b": None}, ["a", "b"]), [3.0, np.nan])
    with pytest.raises(ValueError, match="none of"):
        alpha_lookup({"x": 1.0}, ["a"])
    with pytest.raises(ValueError, match="columns"):
        alpha_lookup(pd.DataFrame({"layer": ["a"]}), ["a"])
    with pytest.raises(ValueError, match="DataFrame"):
        alpha_lookup([1.0], ["a"])


# ---- selection scores (frogwatch.frog.scorers) against brute-force numpy ------------------------

from frogwatch.diagnostics.mp import fit_mp  # noqa: E402
from frogwatch.frog import scorers  # noqa: E402


def np_balanced(values: np.ndarray, k: int, exclude=()) -> np.ndarray:
    """Greedy scan in decreasing value with row cap ceil(k/m) and column cap ceil(k/n), then top fill."""
    m, n = values.shape
    order = np.argsort(-values.reshape(-1), kind="stable")
    rows, cols, taken = np.zeros(m, int), np.zeros(n, int), []
    for idx in order:
        if idx in exclude or len(taken) == k:
            continue
        i, j = divmod(int(idx), n)
        if rows[i] < -(-k // m) and cols[j] < -(-k // n):
            rows[i] += 1
            cols[j] += 1
            taken.append(int(idx))
    for idx in order:
        if len(taken) < k and idx not in exclude and idx not in taken:
            taken.append(int(idx))
    return np.sort(np.array(taken, dtype=int))


@pytest.mark.parametrize("shape,k", [((7, 5), 6), ((5, 9), 12), ((8, 8), 1), ((6, 4), 24), ((3, 10), 29)])
def test_balanced_topk_matches_brute_force_and_respects_caps(shape, k):
    rng = np.random.default_rng(k)
    # rank-one-dominated values, like S: a plain top-k would fill a block
    V = np.outer(rng.random(shape[0]) ** 4, rng.random(shape[1]) ** 4) + 1e-3 * rng.random(shape)
    got = scorers.balanced_topk(torch.from_numpy(V), k).numpy()
    np.testing.assert_array_equal(got, np_balanced(V, k))
    mask = np.zeros(V.size, bool)
    mask[got] = True
    mask = mask.reshape(shape)
    if k <= min(shape):  # the caps never block each other here
        assert mask.sum(1).max() <= -(-k // shape[0]) and mask.sum(0).max() <= -(-k // shape[1])


def test_balanced_topk_with_exclusions_and_ties():
    V = np.zeros((4, 4))  # all ties: lowest flat index first, within the caps
    ex = torch.tensor([0, 5])
    got = scorers.balanced_topk(torch.from_numpy(V), 4, exclude=ex).numpy()
    np.testing.assert_array_equal(got, np_balanced(V, 4, exclude={0, 5}))
    assert not set(got) & {0, 5}
    with pytest.raises(ValueError):
        scorers.balanced_topk(torch.from_numpy(V), 15, exclude=ex)


def test_normalized_relevance_brute_force():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((9, 6))
    S = brute_relevance(W)
    expected = np.array([[S[i, j] / (S[i].mean() * S[:, j].mean()) for j in range(6)] for i in range(9)])
    got, energy = scorers.score_matrix(torch.from_numpy(W), "normalized")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert energy == pytest.approx(1.0)
    Z = np.zeros((3, 3))
    Z[0, 0] = 1.0  # zero rows and columns stay 0, no NaN
    out = scorers.normalized_relevance(torch.from_numpy(Z)).numpy()
    assert np.isfinite(out).all() and out[1:, :].sum() == 0


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
def test_bulk_relevance_drops_mp_spikes(shape):
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape) / np.sqrt(max(shape))
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    s[:3] *= 8.0  # three spikes far above the MP edge
    W = (U * s) @ Vt
    fit = fit_mp(s**2, max(shape), min(shape))
    bulk = s**2 <= fit.threshold
    assert (~bulk).sum() == 3
    expected = (np.abs(U[:, bulk]) * s[bulk]) @ np.abs(Vt[bulk])
    got, energy, n_spikes = scorers.bulk_relevance(torch.from_numpy(W))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert n_spikes == 3
    assert energy == pytest.approx((s[bulk] ** 2).sum() / (s**2).sum())


def test_magnitude_and_random_scores():
    W = torch.randn(5, 4, dtype=torch.float64)
    got, energy = scorers.score_matrix(W, "magnitude")
    torch.testing.assert_close(got, W.abs())
    assert math.isnan(energy)
    a, _ = scorers.score_matrix(W, "random", name="x", seed=1)
    b, _ = scorers.score_matrix(W * 5, "random", name="x", seed=1)
    c, _ = scorers.score_matrix(W, "random", name="y", seed=1)
    torch.testing.assert_close(a, b)  # depends on seed and name only
    assert not torch.equal(a, c)
    with pytest.raises(ValueError):
        scorers.score_matrix(W, "nope")


def test_pick_mixture_draws_the_random_share_then_top_scores():
    V = torch.arange(100, dtype=torch.float64).reshape(10, 10)
    g = torch.Generator().manual_seed(0)
    got = scorers.pick(V, 10, random_share=0.3, generator=g)
    rand = torch.randperm(100, generator=torch.Generator().manual_seed(0))[:3]
    rest = [i for i in range(99, -1, -1) if i not in set(rand.tolist())][:7]
    np.testing.assert_array_equal(got.numpy(), np.sort(np.r_[rand.numpy(), rest]))
    np.testing.assert_array_equal(scorers.pick(V, 10).numpy(), np.arange(90, 100))


# ---- edge cases of the scores API (found by mutation testing, benchmarks/mutation.py) -----------


def np_relevance(W: np.ndarray, q: int | None = None) -> tuple[np.ndarray, float]:
    """Rank-q S = |U_q| diag(σ_q) |V_q|ᵀ and its energy Σ_{k≤q} σ_k² / Σ σ_k², from numpy's SVD."""
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    q = len(s) if q is None else q
    return (np.abs(U[:, :q]) * s[:q]) @ np.abs(Vt[:q]), float((s[:q] ** 2).sum() / (s**2).sum())


def decaying(rows: int, cols: int, seed: int = 0, rate: float = 0.8) -> np.ndarray:
    """A matrix with singular values rate**k: a randomized SVD resolves its top triplets exactly."""
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    U = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    V = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    return (U * rate ** np.arange(k)) @ V.T


def test_exact_relevance_without_rank_keeps_every_triplet_of_a_large_matrix():
    # default_rank(140, 130) = 65 < 130: a rank-less exact S must still use all 130 triplets
    W = np.random.default_rng(7).standard_normal((140, 130))
    S, energy = relevance_2d(torch.from_numpy(W))  # method="exact" is the default
    np.testing.assert_allclose(S.numpy(), np_relevance(W)[0], rtol=1e-9, atol=1e-12)
    assert energy == 1.0


def test_randomized_relevance_without_rank_uses_default_rank():
    W = decaying(150, 130)
    q = scores.default_rank(150, 130)
    assert q == 65
    S, energy = relevance_2d(torch.from_numpy(W), method="randomized")
    S_ref, e_ref = np_relevance(W, q)
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-8, atol=1e-12)
    assert energy == pytest.approx(e_ref, rel=1e-10) and energy < 1.0


def test_randomized_relevance_is_the_rank_q_formula_of_randomized_svd_with_its_seed():
    W = torch.from_numpy(np.random.default_rng(2).standard_normal((30, 20)))
    for seed in (0, 3):
        U, s, V = scores.randomized_svd(W, 6, seed=seed)
        S, energy = relevance_2d(W, rank=6, method="randomized", seed=seed)
        torch.testing.assert_close(S, (U.abs() * s) @ V.abs().mT, rtol=1e-12, atol=0)
        assert energy == pytest.approx(float((s * s).sum() / (W * W).sum()), rel=1e-12)
    assert not torch.equal(relevance_2d(W, rank=6, method="randomized", seed=3)[0],
                           relevance_2d(W, rank=6, method="randomized")[0])  # fmt: skip


def test_randomized_energy_is_the_captured_share_below_one():
    W = decaying(40, 30, seed=1)
    _, e = relevance_2d(torch.from_numpy(W), rank=5, method="randomized")
    assert e == pytest.approx(np_relevance(W, 5)[1], rel=1e-10) and e < 1.0


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_rank_one_relevance_is_the_top_triplet(method):
    W = decaying(12, 9, seed=4)
    S, e = relevance_2d(torch.from_numpy(W), rank=1, method=method)
    S_ref, e_ref = np_relevance(W, 1)
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-8, atol=1e-12)
    assert e == pytest.approx(e_ref, rel=1e-10)
    U, s, V = scores.randomized_svd(torch.from_numpy(W), 1)
    assert s.shape == (1,) and float(s[0]) == pytest.approx(1.0, rel=1e-10)


def test_energy_is_exactly_one_for_every_full_spectrum_and_never_above_one():
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 5), (5, 7), (6, 6), (13, 4), (4, 13), (9, 8), (8, 9), (20, 3), (3, 20), (11, 11)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        assert relevance_2d(W)[1] == 1.0, shape
        assert relevance_2d(W, rank=min(shape) + 3)[1] == 1.0, shape  # rank clipped to min(m, n)
        # an exactly rank-2 matrix: two triplets hold all of its energy (to round-off), never more
        L = W[:, :2] @ torch.randn(2, shape[1], generator=g, dtype=torch.float64)
        for method in ("exact", "randomized"):
            e = relevance_2d(L, rank=2, method=method)[1]
            assert 1.0 - 1e-12 <= e <= 1.0, (shape, method)


def test_exact_relevance_eigendecomposes_the_smaller_gram_matrix(monkeypatch):
    sizes = []
    eigh = torch.linalg.eigh

    def spy(A, *args, **kwargs):
        sizes.append(tuple(A.shape))
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    for shape in [(30, 8), (8, 30)]:
        W = np.random.default_rng(0).standard_normal(shape)
        S, e = relevance_2d(torch.from_numpy(W))
        np.testing.assert_allclose(S.numpy(), np_relevance(W)[0], rtol=1e-10, atol=1e-12)
        assert e == 1.0
    assert sizes == [(8, 8), (8, 8)]  # an 8x8 Gram matrix, not 30x30, either way round


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_zero_and_unit_norm_matrices(method):
    S, e = relevance_2d(torch.zeros(5, 4, dtype=torch.float64), rank=2, method=method)
    assert torch.equal(S, torch.zeros(5, 4, dtype=torch.float64)) and e == 1.0
    W = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # ‖W‖_F² = 1 exactly
    S, e = relevance_2d(W, rank=1, method=method)
    torch.testing.assert_close(S, W, rtol=0, atol=1e-12)
    assert e == 1.0


def test_default_rank_formula():
    # max(min(64, M), M // 2), M = min(rows, cols)
    for rows, cols in [(100, 70), (70, 100), (10, 100), (200, 127), (1000, 767), (129, 300)]:
        m = min(rows, cols)
        got = scores.default_rank(rows, cols)
        assert type(got) is int and got == max(min(64, m), m // 2), (rows, cols)
    assert scores.default_rank(100, 70) == 64 and scores.default_rank(1000, 767) == 383


def test_score_errors_name_the_problem():
    W = torch.ones(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^rank must be in \[1, 4\] for a 4x6 matrix, got 0$"):
        scores.randomized_svd(W, 0)
    with pytest.raises(ValueError, match=r"^rank must be in \[1, 4\] for a 6x4 matrix, got 5$"):
        scores.randomized_svd(W.T, 5)
    with pytest.raises(ValueError, match=r"^expected a 2-D matrix, got shape \(3,\)$"):
        relevance_2d(torch.ones(3))
    with pytest.raises(ValueError, match=r"^W: weights contain NaN or Inf"):
        scores.as_matrix(torch.tensor([[float("inf")]]))
    with pytest.raises(ValueError, match=r"^q_proj: complex weights are not supported$"):
        scores.as_matrix(torch.ones(2, 2, dtype=torch.complex64), "q_proj")
    with pytest.raises(ValueError, match=r"^norms must be a non-empty 1-D sequence$"):
        matrix_importance([])
    with pytest.raises(ValueError, match=r"^norms must be a non-empty 1-D sequence$"):
        matrix_importance([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"^norms must be finite and non-negative$"):
        matrix_importance([1.0, math.inf])


def test_matrix_importance_edge_cases():
    np.testing.assert_array_equal(matrix_importance([4.0]), [1.0])
    np.testing.assert_allclose(matrix_importance([0.2, 0.3]), [0.4, 0.6], rtol=1e-15)  # sum below 1
    r = matrix_importance(np.array([1.0, 2.0, 4.0], dtype=np.float32))
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, np.array([1.0, 2.0, 4.0]) / 7.0)


def test_alpha_multipliers_edge_cases():
    np.testing.assert_allclose(alpha_multipliers([2.0, 4.0], 0.5), [0.5, 1.5])  # two finite alphas
    np.testing.assert_array_equal(alpha_multipliers([math.nan, math.nan, math.inf], 0.5), [1.0, 1.0, 1.0])
    got = alpha_multipliers(np.array([[2.0], [3.0], [6.0]]), 0.5)  # a column, e.g. df[["alpha"]]
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [0.5, 0.75, 1.5])
    # float32 alphas: the map is computed in float64 on the given values
    a32 = np.array([2.1, 3.3, 4.7], dtype=np.float32)
    a = a32.astype(np.float64)
    got = alpha_multipliers(a32, 0.3)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 1 - 0.3 + 0.6 * (a - a.min()) / (a.max() - a.min()), rtol=1e-15)


def test_alpha_lookup_reads_non_numeric_alpha_as_failed_and_explains_errors():
    df = pd.DataFrame({"name": ["a", "b"], "alpha": ["n/a", 3.5]})  # e.g. read back from a CSV
    np.testing.assert_array_equal(alpha_lookup(df, ["a", "b"]), [np.nan, 3.5])
    with pytest.raises(ValueError, match=r"^alpha_lookup: alpha must be a table from frogwatch.analyze"):
        alpha_lookup(pd.DataFrame({"name": ["a"]}), ["a"])
    with pytest.raises(ValueError, match=r"^alpha for 'a' is not a number: 'x'$"):
        alpha_lookup({"a": "x"}, ["a"])
    with pytest.raises(ValueError, match=r"got list$"):
        alpha_lookup([1.0], ["a"])
    with pytest.raises(ValueError) as e:
        alpha_lookup({k: 1.0 for k in "vwxyz"}, list("abcde"))
    assert str(e.value) == (
        "none of the 5 targeted matrices is in the alpha table (targets e.g. ['a', 'b', 'c'], "
        "table e.g. ['v', 'w', 'x']); compute alpha with frogwatch.analyze on the same model"
    )
