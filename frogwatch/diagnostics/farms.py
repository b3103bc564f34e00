"""FARMS-style alpha: the power-law exponent of an aspect-ratio-free ESD (``alpha_farms``).

The ESD of an ``N x M`` matrix depends on its aspect ratio ``Q = N / M`` even for pure noise (the
Marchenko-Pastur bulk is wider for ``Q`` near 1), so alphas of square attention matrices and of
``4:1`` MLP matrices are not directly comparable. FARMS (Fixed-Aspect-Ratio Matrix Subsampling;
Hu et al., ICML 2025) removes that bias by measuring the *average* ESD of submatrices that all
have the same aspect ratio.

frogwatch's version (documented choices, not the paper's code): each analysed matrix (oriented
``N x M``, ``N >= M``; each conv2d slice on its own) is tiled by windows of ``b * ratio`` rows and
``b`` columns with ``b = floor(M / 2)`` (``FARMS_FRACTION``) and ``ratio = 1`` (``FARMS_RATIO``,
square windows), placed with stride ``b`` (``b * ratio`` along the rows) and the last window
flush with the matrix edge, so every entry is covered and windows overlap only at the edges. The
eigenvalues of every window's ``X = w^T w`` are pooled into one ESD, and ``alpha_farms`` is the
same power-law fit as ``alpha`` (same ``fit`` and ``fix_fingers``) on that pooled ESD. Columns:
``alpha_farms``, ``D_farms``, ``num_farms_windows``.

Reading: ``alpha_farms`` is meant to compare layers of different shapes where ``alpha`` would mix
the quality of a layer with its shape; treat it as a second opinion (benchmarks/results_farms.md:
on random matrices this windowing did not show the shape correction). Its values are on a different scale from ``alpha`` (smaller
windows have shorter tails), so use it for ranking and for the correlation-flow verdicts
(``correlation_flow(df.assign(alpha=df["alpha_farms"]))``), not against the 2-6 band.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..powerlaw_fit import fit_power_law
from ..spectra import eigenvalues

__all__ = ["FARMS_COLUMNS", "FARMS_RATIO", "FARMS_FRACTION", "farms_windows", "farms_eigenvalues", "farms_hook"]

FARMS_COLUMNS = ["alpha_farms", "D_farms", "num_farms_windows"]
FARMS_RATIO = 1.0
FARMS_FRACTION = 0.5
_MIN_SIDE = 8


def _starts(length: int, size: int) -> list[int]:
    if size >= length:
        return [0]
    starts = list(range(0, length - size + 1, size))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def farms_windows(N: int, M: int, *, ratio: float = FARMS_RATIO, fraction: float = FARMS_FRACTION) -> list[tuple[int, int, int, int]]:
    """Windows ``(row0, rows, col0, cols)`` tiling an ``N x M`` matrix (``N >= M``).

    Windows have ``cols = max(8, floor(fraction * M))`` (at most ``M``) and
    ``rows = min(N, round(ratio * cols))``.
    """
    cols = min(M, max(_MIN_SIDE, int(fraction * M)))
    rows = min(N, max(cols, int(round(ratio * cols))))
    return [(r, rows, c, cols) for r in _starts(N, rows) for c in _starts(M, cols)]


def farms_eigenvalues(
    W: torch.Tensor | np.ndarray,
    *,
    ratio: float = FARMS_RATIO,
    fraction: float = FARMS_FRACTION,
    method: str = "gram",
    device: torch.device | None = None,
) -> tuple[np.ndarray, int]:
    """Pooled eigenvalues of all fixed-aspect-ratio windows of ``W`` and the number of windows.

    Returns
    -------
    evals : (num_windows * cols,) float64, ascending
    num_windows : int
    """
    A = torch.as_tensor(W)
    if A.shape[0] < A.shape[1]:
        A = A.T
    N, M = A.shape
    wins = farms_windows(N, M, ratio=ratio, fraction=fraction)
    parts = [eigenvalues(A[r : r + nr, c : c + nc], method=method, device=device) for r, nr, c, nc in wins]
    return np.sort(np.concatenate(parts)), len(wins)


def farms_hook(
    *, fit: str = "PL", fix_fingers: str | None = None, method: str = "gram", device: torch.device | None = None
) -> Callable:
    """An :func:`frogwatch.analyze` hook adding the :data:`FARMS_COLUMNS`."""

    def hook(layer, matrices, spec, _fit) -> dict:
        parts, n = [], 0
        for W in matrices:
            ev, k = farms_eigenvalues(W, method=method, device=device)
            parts.append(ev)
            n += k
        result = fit_power_law(np.concatenate(parts), fit=fit, fix_fingers=fix_fingers)
        ok = result.status == "success"
        return {
            "alpha_farms": result.alpha if ok else math.nan,
            "D_farms": result.D if ok else math.nan,
            "num_farms_windows": n,
        }

    return hook
