"""Spectrum + power-law fit -> the per-layer columns of REFERENCE §2 (WeightWatcher's names)."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from .layers import ALPHA_HIGH, ALPHA_LOW, alpha_warning
from .powerlaw_fit import PowerLawFit
from .spectra import Spectrum

__all__ = ["layer_metrics", "quality_warning", "OVER_TRAINED_ALPHA", "UNDER_TRAINED_ALPHA"]

WEAK_RANK_TOL = 1e-6  # eigenvalues below this count towards weak_rank_loss (as WeightWatcher)

# The alpha band lives in frogwatch.layers; these names stay for existing imports.
OVER_TRAINED_ALPHA = ALPHA_LOW
UNDER_TRAINED_ALPHA = ALPHA_HIGH
quality_warning = alpha_warning


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 else -math.inf


def layer_metrics(spec: Spectrum, fit: PowerLawFit) -> dict:
    """All per-layer metric columns for one spectrum and its fit.

    Norm metrics depend only on the eigenvalues and are reported even when the fit failed; the
    alpha-based ones (``alpha``, ``alpha_weighted``, ``log_alpha_norm``) are NaN then.

    Returns
    -------
    dict
        Column name -> value. ``norm`` is the squared Frobenius norm (sum of eigenvalues) and
        ``log_norm`` its log10, as in WeightWatcher.
    """
    ev = spec.evals
    norm = float(ev.sum())
    lam_max = float(ev[-1]) if ev.size else math.nan
    log_spectral_norm = _log10(lam_max)
    alpha = fit.alpha
    pos = ev[ev > 0]
    if fit.status == "success" and pos.size:
        log_alpha_norm = float(logsumexp(alpha * np.log(pos)) / math.log(10.0))
    else:
        log_alpha_norm = math.nan
    rank = spec.rank
    if norm > 0 and rank > 1:
        p = pos / norm
        entropy = float(-(p * np.log(p)).sum() / math.log(rank))
    else:
        entropy = math.nan
    return {
        "num_evals": int(ev.size),
        "alpha": alpha,
        "xmin": fit.xmin,
        "xmax": fit.xmax,
        "D": fit.D,
        "sigma": fit.sigma,
        "num_pl_spikes": fit.num_pl_spikes,
        "Lambda": fit.Lambda,
        "num_fingers": fit.num_fingers,
        "lambda_max": lam_max,
        "spectral_norm": lam_max,
        "norm": norm,
        "log_norm": _log10(norm),
        "log_spectral_norm": log_spectral_norm,
        "alpha_weighted": alpha * log_spectral_norm,
        "log_alpha_norm": log_alpha_norm,
        "stable_rank": norm / lam_max if lam_max > 0 else math.nan,
        "entropy": entropy,
        "matrix_rank": rank,
        "rank_loss": int(ev.size - rank),
        "weak_rank_loss": int(np.count_nonzero(ev < WEAK_RANK_TOL)),
        "sv_max": spec.sv_max,
        "sv_min": spec.sv_min,
        "status": fit.status,
        "reason": fit.reason,
        "warning": quality_warning(alpha) if fit.status == "success" else "",
    }
