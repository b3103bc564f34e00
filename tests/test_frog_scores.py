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
