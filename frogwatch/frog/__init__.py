"""FROG: SVD relevance scores, Frobenius budgets, per-matrix and global selection, masks.

Public entry points: :func:`select`, :func:`relevance`, :class:`Masks`. The math lives in
:mod:`.scores` (S, R, the α multiplier) and :mod:`.budget` (allocation, exact totals, top-k).
"""

from .budget import allocate, resolve_budget, topk_flat
from .masks import MaskInfo, MaskMismatchError, Masks
from .scores import alpha_multipliers, matrix_importance
from .select import STRATEGIES, relevance, resolve_targets, select

__all__ = [
    "MaskInfo",
    "MaskMismatchError",
    "Masks",
    "STRATEGIES",
    "allocate",
    "alpha_multipliers",
    "matrix_importance",
    "relevance",
    "resolve_budget",
    "resolve_targets",
    "select",
    "topk_flat",
]
