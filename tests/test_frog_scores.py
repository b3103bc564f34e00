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
