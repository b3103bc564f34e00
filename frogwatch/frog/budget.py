"""FROG budgets: how many weights each matrix trains (docs/method.md#budget).

Pure functions on integers and arrays; no model.

* :func:`resolve_budget` turns the user's budget (a fraction G in (0, 1] or a count) into
  ``T_trainable = round(G · T)``, rounding halves up.
* :func:`allocate` splits ``T_trainable`` over the matrices in proportion to a weight
  (``R_i`` or ``R_i · m_i``), caps each at its size, gives the overflow to the uncapped matrices in
  proportion to their weights (repeated until nothing overflows), and rounds by largest remainder so
  that the counts sum to ``T_trainable`` exactly.
* :func:`topk_flat` is the deterministic top-k used by both selections: the ``k`` largest values,
  ties broken by lower flat index.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch

__all__ = ["allocate", "resolve_budget", "topk_flat"]


def resolve_budget(budget: float | int, total: int) -> int:
    """Number of trainable weights for a budget.

    Parameters
    ----------
    budget : float or int
        A fraction ``G`` in ``(0, 1]`` (a Python/NumPy float) or a count ``1 <= k <= total`` (an
        integer). ``1`` as an int means one weight; ``1.0`` means all of them.
    total : int
        ``T``, the number of weights in the targeted matrices.

    Returns
    -------
    int
        ``round(G · T)`` (halves rounded up), or the count itself.

    Raises
    ------
    ValueError
        For a non-number, a fraction outside (0, 1], a count outside [1, T], or a budget that
        rounds to zero weights.
    """
    if total < 1:
        raise ValueError("the targeted matrices hold no weights")
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise ValueError(
            f"budget must be a fraction in (0, 1] or a positive integer count, got {budget!r}"
        )
    if isinstance(budget, Integral):
        k = int(budget)
        if not 1 <= k <= total:
            raise ValueError(
                f"budget count must be between 1 and the {total:,} targeted weights, got {k:,}"
            )
        return k
    g = float(budget)
    if not (0.0 < g <= 1.0):
        raise ValueError(
            f"budget fraction must be in (0, 1], got {budget!r}; pass an int for a count of weights"
        )
    k = min(int(math.floor(g * total + 0.5)), total)
    if k < 1:
        raise ValueError(
            f"budget {budget!r} of {total:,} weights rounds to 0 trainable weights; raise it"
        )
    return k


def _capped_quotas(weights: np.ndarray, sizes: np.ndarray, total: int) -> np.ndarray:
    """Real-valued shares ``q_i <= size_i`` with ``Σ q_i = total`` (water-filling)."""
    q = np.zeros(weights.shape, dtype=np.float64)
    active = np.ones(weights.shape, dtype=bool)
    remaining = float(total)
    while active.any():
        w = np.where(active, weights, 0.0)
        if w.sum() <= 0.0:
            # Only zero-weight matrices are left: fill them in proportion to their sizes.
            w = np.where(active, sizes.astype(np.float64), 0.0)
        share = remaining * w / w.sum()
        over = active & (share >= sizes)
        if not over.any():
            q[active] = share[active]
            break
        q[over] = sizes[over]
        remaining -= float(sizes[over].sum())
        active &= ~over
    return q


def allocate(
    weights: Sequence[float] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    total: int,
    minimum: int = 0,
) -> np.ndarray:
    """Split ``total`` trainable weights over matrices: ``k_i ∝ weights_i``, capped at ``sizes_i``.

    Parameters
    ----------
    weights : array-like, shape (n,)
        Non-negative allocation weights (``R_i``, or ``R_i · m_i`` when blended).
    sizes : array-like of int, shape (n,)
        Number of entries of each matrix.
    total : int
        ``T_trainable``, ``0 <= total <= Σ sizes``.
    minimum : int
        Per-matrix floor: every matrix first gets ``f_i = min(minimum, sizes_i)`` entries and the
        remaining ``total - Σ f_i`` are split as below over the room left (``sizes_i - f_i``).
        ``Σ f_i`` may not exceed ``total``.

    Returns
    -------
    ndarray of int64, shape (n,)
        ``0 <= k_i <= sizes_i`` and ``Σ k_i == total`` exactly. A matrix whose share exceeds its
        size gets all of its entries and the excess goes to the others in proportion to their
        weights; matrices of weight 0 get nothing unless every positive-weight matrix is full.
        Fractional shares are rounded by largest remainder (ties to the lower index).
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    n = np.asarray(sizes).reshape(-1)
    if w.shape != n.shape or w.size == 0:
        raise ValueError(f"weights and sizes must be non-empty and equally long ({w.size} vs {n.size})")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("allocation weights must be finite and non-negative")
    if not np.issubdtype(n.dtype, np.integer) or np.any(n < 0):
        raise ValueError("sizes must be non-negative integers")
    n = n.astype(np.int64)
    total = int(total)
    if not 0 <= total <= int(n.sum()):
        raise ValueError(f"total must be in [0, {int(n.sum())}], got {total}")
    if isinstance(minimum, bool) or not isinstance(minimum, Integral) or minimum < 0:
        raise ValueError(f"allocate: minimum must be an int >= 0, got {minimum!r}")
    if minimum:
        floor = np.minimum(n, int(minimum))
        if int(floor.sum()) > total:
            raise ValueError(
                f"allocate: minimum must be at most {total // n.size} per matrix for {total:,} weights over "
                f"{n.size} matrices, got {minimum!r}"
            )
        return floor + allocate(w, n - floor, total - int(floor.sum()))
    q = _capped_quotas(w, n, total)
    k = np.minimum(np.floor(q).astype(np.int64), n)
    short = total - int(k.sum())
    while short > 0:  # largest remainder; loops again only if float error left matrices full
        frac = np.where(k < n, q - k, -np.inf)
        order = np.lexsort((np.arange(k.size), -frac))  # frac descending, index ascending
        room = order[np.isfinite(frac[order])][:short]
        k[room] += 1
        short = total - int(k.sum())
    if short < 0 or np.any(k > n):  # pragma: no cover - guarded by construction
        raise AssertionError("allocation failed to meet its total")
    return k


def topk_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest entries, ties broken by lower flat index.

    Parameters
    ----------
    values : Tensor, any shape
        Real, NaN-free.
    k : int
        ``0 <= k <= values.numel()``.

    Returns
    -------
    Tensor of int64, shape (k,)
        Sorted ascending. Deterministic: among equal values the lower flat indices are chosen.
    """
    v = values.reshape(-1)
    n = v.numel()
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=v.device)
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=v.device)
    threshold = torch.kthvalue(v, n - k + 1).values  # the k-th largest value
    above = v > threshold
    ties = torch.nonzero(v == threshold).reshape(-1)[: k - int(above.sum())]
    chosen = above
    chosen[ties] = True
    return torch.nonzero(chosen).reshape(-1)
