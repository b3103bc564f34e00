"""Brute-force references written independently of frogwatch (plain numpy loops).

Used by the reference-free numeric tests: nothing here imports frogwatch.
"""

from __future__ import annotations

import math

import numpy as np


def evals(W: np.ndarray) -> np.ndarray:
    """Eigenvalues of WᵀW from numpy's SVD: squared singular values, ascending."""
    return np.sort(np.linalg.svd(np.asarray(W, np.float64), compute_uv=False) ** 2)


def clauset_fit(x: np.ndarray, thresh: float = 1e-5) -> tuple[float, float, float]:
    """Continuous power-law MLE with xmin by minimum KS distance, one candidate at a time.

    Returns (alpha, xmin, D). Candidates are every eigenvalue except the largest; n >= 20 is
    assumed (no small-sample correction).
    """
    x = np.sort(np.asarray(x, np.float64))
    x = x[x > thresh]
    n = x.size
    best = (math.nan, math.nan, math.inf)
    for i in range(n - 1):
        tail = x[i:]
        xmin = tail[0]
        s = np.sum(np.log(tail / xmin))
        if s <= 0:
            continue
        a = 1.0 + tail.size / s
        if not a > 1:
            continue
        cdf = 1.0 - (tail / xmin) ** (1.0 - a)
        emp = np.arange(tail.size) / tail.size
        D = np.max(np.abs(cdf - emp))
        if D < best[2]:
            best = (a, xmin, D)
    return best


def mp_edge(N: int, M: int, var: float = 1.0) -> float:
    """Marchenko–Pastur upper edge of the eigenvalues of WᵀW for an N×M matrix of variance var."""
    return var * (math.sqrt(N) + math.sqrt(M)) ** 2


def finger_spectrum() -> np.ndarray:
    """100 eigenvalues: a Pareto bulk (94, density exponent 3.4) and a cluster of 6 "fingers"
    40x above it. The plain fit takes the fingers as the tail (alpha ~ 5.7); clipping 2 of them
    lets it see the bulk (alpha ~ 2.4): WeightWatcher's clip_xmax case."""
    rng = np.random.default_rng(1)
    base = np.sort(rng.pareto(2.4, 94) + 1)
    return np.concatenate([base, base[-1] * 40 * (1 + 0.1 * np.arange(6))])


def matrix_with_evals(ev: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """A rows x len(ev) matrix whose WᵀW has exactly the eigenvalues ``ev`` (random rotations)."""
    rng = np.random.default_rng(seed)
    m = len(ev)
    U = np.linalg.qr(rng.standard_normal((rows, m)))[0]
    V = np.linalg.qr(rng.standard_normal((m, m)))[0]
    return (U * np.sqrt(ev)) @ V.T
