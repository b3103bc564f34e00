"""Scale collapse: layers whose spectral norm is anomalously small (Martin, Peng & Mahoney 2021).

Some layers of distilled or poorly trained models have much smaller spectral norms than their
peers; the model's alpha-hat (``alpha * log_spectral_norm``) then falls for a reason that has
nothing to do with better correlations. frogwatch detects it two ways, embeddings excluded:

Without a reference (:func:`scale_collapse`, ``analyze``'s ``scale_collapse`` column; the rule
lives in :mod:`frogwatch.rules` and is re-exported here)
    Layers are grouped by role (query, key, value, attention-out, MLP up/down... see
    :func:`frogwatch.layers.layer_role`) and shape ``(N, M)``. In a group of at least ``MIN_GROUP`` (3)
    layers, a layer is collapsed when its ``log_spectral_norm`` is below
    ``median - max(COLLAPSE_MADS * 1.4826 * MAD, MIN_COLLAPSE_DEX)``: more than 3 robust standard
    deviations (the MAD scaled to a normal sigma) below the group's median, and at least 0.3 dex
    (a factor 2 in the largest eigenvalue) below it. The floor keeps groups of near-identical
    layers (fresh initialisations) from flagging harmless differences. Layers in smaller groups,
    embeddings and failed fits are never flagged.

Against a reference (:func:`scale_collapse_vs_reference`, used by :func:`frogwatch.compare`)
    The same layer in the two models: collapsed when ``log_spectral_norm`` falls by more than
    ``REFERENCE_DROP_DEX`` (0.3) while alpha does not improve. Alpha improves when it decreases by
    more than ``ALPHA_IMPROVE_TOL`` (0.1) and stays at or above 2 (below 2 is over-trained, not
    better). A missing alpha on either side never counts as an improvement.
"""

from __future__ import annotations

import numpy as np

from ..layers import ALPHA_LOW
from ..rules import (
    COLLAPSE_MADS,
    MAD_TO_SIGMA,
    MIN_COLLAPSE_DEX,
    MIN_GROUP,
    collapse_threshold,
    scale_collapse,
)

__all__ = [
    "scale_collapse",
    "collapse_threshold",
    "scale_collapse_vs_reference",
    "COLLAPSE_MADS",
    "MAD_TO_SIGMA",
    "MIN_COLLAPSE_DEX",
    "MIN_GROUP",
    "REFERENCE_DROP_DEX",
    "ALPHA_IMPROVE_TOL",
]

REFERENCE_DROP_DEX = 0.3
ALPHA_IMPROVE_TOL = 0.1


def scale_collapse_vs_reference(
    lsn_base: np.ndarray,
    lsn_tuned: np.ndarray,
    alpha_base: np.ndarray,
    alpha_tuned: np.ndarray,
    *,
    drop: float = REFERENCE_DROP_DEX,
    alpha_tol: float = ALPHA_IMPROVE_TOL,
) -> np.ndarray:
    """Per layer: ``log_spectral_norm`` fell by more than ``drop`` dex and alpha did not improve.

    All inputs are aligned 1-D arrays (one entry per matched layer). Returns a bool array.
    """
    lb, lt, ab, at = (np.asarray(x, dtype=np.float64).ravel() for x in (lsn_base, lsn_tuned, alpha_base, alpha_tuned))
    if not (lb.shape == lt.shape == ab.shape == at.shape):
        raise ValueError("all inputs must have the same length")
    if drop < 0 or alpha_tol < 0:
        raise ValueError("drop and alpha_tol must be >= 0")
    with np.errstate(invalid="ignore"):
        fell = np.isfinite(lb) & np.isfinite(lt) & (lb - lt > drop)
        improved = np.isfinite(ab) & np.isfinite(at) & (at < ab - alpha_tol) & (at >= ALPHA_LOW)
    return fell & ~improved
