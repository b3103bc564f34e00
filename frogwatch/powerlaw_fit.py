"""Eigenvalues -> power-law fit of the spectral tail (docs/method.md#alpha). Pure numpy; no torch.

``fit="PL"`` is the Clauset-Shalizi-Newman continuous maximum-likelihood fit with xmin chosen by
the smallest Kolmogorov-Smirnov distance, scanned over every candidate xmin at once (blocked numpy,
no Python loop per candidate). ``fit="TPL"`` fits the truncated power law
``p(x) ~ x^-alpha exp(-lambda x)`` above that same xmin through the ``powerlaw`` package.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["PowerLawFit", "fit_power_law", "esd_peak", "EVALS_THRESH", "SMALL_N"]

EVALS_THRESH = 1e-5  # eigenvalues at or below this are dropped before the fit
SMALL_N = 20  # below this many eigenvalues: bias-corrected alpha, tails of >= SMALL_N_MIN_TAIL
SMALL_N_MIN_TAIL = 8
TPL_ALPHA_RANGE = {"alpha": [0.0, 100.0]}  # search range of the TPL exponent (powerlaw's default: [0, 3])
_BLOCK_ELEMS = 250_000  # elements per block of the KS scan: ~2 MB per temporary array


@dataclass(frozen=True)
class PowerLawFit:
    """Result of a tail fit. Fields are NaN when ``status == "failed"``.

    Attributes
    ----------
    alpha : float
        Exponent of the fitted tail density ``p(x) ~ x^-alpha``.
    xmin, xmax : float
        Smallest and largest eigenvalue of the fitted tail.
    D : float
        Kolmogorov-Smirnov distance between the tail and the fitted distribution.
    sigma : float
        ``(alpha - 1) / sqrt(n_tail)``, the standard error of alpha.
    num_pl_spikes : int
        Number of eigenvalues ``>= xmin`` (the tail size).
    Lambda : float
        Exponential cut-off of the truncated power law (``fit="TPL"`` only, else NaN).
    num_fingers : int
        Top eigenvalues clipped by ``fix_fingers="clip_xmax"``.
    status, reason : str
        ``"success"`` or ``"failed"``, and why it failed.
    """

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float
    num_pl_spikes: int
    Lambda: float = math.nan
    num_fingers: int = 0
    status: str = "success"
    reason: str = ""

    @classmethod
    def failed(cls, reason: str) -> "PowerLawFit":
        nan = math.nan
        return cls(nan, nan, nan, nan, nan, 0, status="failed", reason=reason)


def _ks_scan(x: np.ndarray, small_n: bool) -> tuple[np.ndarray, np.ndarray]:
    """Alpha and KS distance for every candidate xmin ``x[i]``, ``i = 0..n-2``.

    Parameters
    ----------
    x : (n,) float64, sorted ascending, all > 0.
    small_n : use the bias-corrected estimator and tails of at least ``SMALL_N_MIN_TAIL``.

    Returns
    -------
    alphas, Ds : (n - 1,) float64. ``D = inf`` marks a candidate that may not be chosen.

    Tied values (the plain fit, as ``powerlaw``): only the first of a run of equal values is a
    candidate, its tail is every value ``>= xmin``, and the KS distance compares the CDFs at the
    distinct values only (the empirical CDF at a value counts the values strictly below it). The
    small-N fit compares at every position, ties included, as WeightWatcher's small-N fitter does.
    """
    n = x.size
    logx = np.log(x)
    # first[j]: x[j] starts a run of equal values
    first = np.ones(n, dtype=bool) if small_n else np.concatenate(([True], x[1:] != x[:-1]))
    # sum(log x[i:]) for every i, from a reversed cumulative sum
    tail_log_sum = np.cumsum(logx[::-1])[::-1][:-1]
    idx = np.arange(n - 1)
    n_tail = (n - idx).astype(np.float64)
    denom = tail_log_sum - n_tail * logx[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + (n_tail - 1.0 if small_n else n_tail) / denom
    Ds = np.full(n - 1, np.inf if small_n else 1.0)
    valid = np.isfinite(alphas) & (alphas > 1.0) & (denom > 0)
    if small_n:
        valid &= n_tail >= SMALL_N_MIN_TAIL
    else:
        valid &= first[:-1]
    cand = np.flatnonzero(valid)
    if cand.size == 0:
        return alphas, Ds
    # Blocked scan: rows are candidates i, columns the tail x[j], j >= i.
    rows_per_block = max(1, _BLOCK_ELEMS // n)
    for start in range(0, cand.size, rows_per_block):
        rows = cand[start : start + rows_per_block]
        lo = rows[0]
        cols = np.arange(lo, n)
        rel = cols[None, :] - rows[:, None]  # position j - i inside each tail
        mask = (rel >= 0) & first[None, lo:]
        # theoretical CDF 1 - (x_j/xmin)^(1-alpha), in log space
        expo = (1.0 - alphas[rows])[:, None] * (logx[None, lo:] - logx[rows][:, None])
        cdf = 1.0 - np.exp(np.where(mask, expo, 0.0))
        emp = rel / n_tail[rows][:, None]
        dev = np.where(mask, np.abs(cdf - emp), 0.0)
        Ds[rows] = dev.max(axis=1)
    return alphas, Ds


def _fit_pl(x: np.ndarray) -> PowerLawFit:
    n = x.size
    small = n < SMALL_N
    if n < (SMALL_N_MIN_TAIL if small else 2):
        return PowerLawFit.failed(f"too few eigenvalues above {EVALS_THRESH:g} ({n})")
    if not small:
        # powerlaw's candidates: the distinct values below the two largest distinct ones
        starts = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
        if starts.size < 4:
            return PowerLawFit.failed(
                f"degenerate spectrum: fewer than 4 distinct eigenvalues above {EVALS_THRESH:g} ({starts.size})"
            )
    alphas, Ds = _ks_scan(x, small)
    if not small:
        Ds[starts[-2] :] = 1.0  # the "not a candidate" value (a valid D is < 1)
    if not np.isfinite(Ds).any():
        return PowerLawFit.failed("no candidate tail gives a valid power law (degenerate spectrum)")
    i = int(np.argmin(Ds))  # first minimum, as numpy's argmin
    if not np.isfinite(alphas[i]) or alphas[i] <= 1.0:
        return PowerLawFit.failed("degenerate spectrum: no tail with alpha > 1")
    return _fit_at(x, alphas, Ds, i)


def _fit_tpl(x: np.ndarray, pl: PowerLawFit) -> PowerLawFit:
    """Truncated power law above the power-law xmin, through the ``powerlaw`` package."""
    try:
        import powerlaw
    except ImportError:  # a base dependency, but say so clearly if it is missing
        return PowerLawFit.failed("fit='TPL' needs the powerlaw package")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            # powerlaw 2.0 searches alpha in [0, 3] unless told otherwise; lift the cap as the
            # plain fit's reference does. The floor stays 0: with the exponential cut-off any
            # alpha >= 0 is a normalisable density (docs/method.md#tpl).
            fit = powerlaw.Fit(x, xmin=pl.xmin, xmax=None, verbose=False, parameter_ranges=TPL_ALPHA_RANGE)
            tpl = fit.truncated_power_law
            alpha, lam, D = float(tpl.alpha), float(tpl.Lambda), float(tpl.D)
    except Exception as e:  # powerlaw raises bare exceptions from its optimiser
        return PowerLawFit.failed(f"truncated power-law fit failed: {type(e).__name__}: {e}")
    if not (np.isfinite(alpha) and np.isfinite(lam)):
        return PowerLawFit.failed("truncated power-law fit did not converge")
    return PowerLawFit(
        alpha=alpha,
        xmin=pl.xmin,
        xmax=pl.xmax,
        D=D,
        sigma=(alpha - 1.0) / math.sqrt(pl.num_pl_spikes),
        num_pl_spikes=pl.num_pl_spikes,
        Lambda=lam,
    )


def esd_peak(x: np.ndarray, bins: int = 100) -> float:
    """Peak of the ESD on a log scale: left edge of the fullest of ``bins`` log10 bins.

    Parameters
    ----------
    x : (n,) float64, eigenvalues above ``EVALS_THRESH``.
    """
    counts, edges = np.histogram(np.log10(x), bins=bins)
    return float(10.0 ** edges[int(np.argmax(counts))])


def _fit_pl_peak(x: np.ndarray) -> PowerLawFit:
    """Power-law fit with xmin searched only up to 1.5 x the peak of the log-ESD.

    WeightWatcher 0.7.7's ``fix_fingers="xmin_peak"``: it passes ``powerlaw.Fit`` the xmin range
    ``(log10(0.95 * peak), 1.5 * peak)`` (its lower end is a log10, so in practice the range is
    every eigenvalue below ``1.5 * peak``). ``powerlaw`` takes the distinct eigenvalues in
    ``[min, max)`` of that range, drops the largest one, and keeps the candidate of smallest KS
    distance among those with alpha > 1; the same is done here on the vectorised scan.
    """
    n = x.size
    if n < 3:
        return PowerLawFit.failed(f"too few eigenvalues above {EVALS_THRESH:g} ({n})")
    peak = esd_peak(x)
    lo, hi = sorted((math.log10(0.95 * peak), 1.5 * peak))
    in_range = np.flatnonzero((x >= lo) & (x < hi))
    _, first = np.unique(x[in_range], return_index=True)
    cand = in_range[first][:-1]
    cand = cand[cand < n - 1]
    if cand.size < 2:
        return PowerLawFit.failed(f"xmin_peak: fewer than 2 candidate xmin below 1.5 x peak ({peak:.4g})")
    alphas, Ds = _ks_scan(x, False)
    ok = np.isfinite(alphas[cand]) & (alphas[cand] > 1.0)
    if not ok.any():
        return PowerLawFit.failed("xmin_peak: no candidate tail gives alpha > 1")
    cand = cand[ok]
    i = int(cand[np.argmin(Ds[cand])])
    return _fit_at(x, alphas, Ds, i)


def _clip_fingers(
    x: np.ndarray, first: PowerLawFit, max_fingers: int, finger_thresh: float, min_alpha: float
) -> PowerLawFit:
    """Clip the top eigenvalues ("fingers") until alpha drops by more than ``finger_thresh``.

    Tries clipping 2, 3, ... up to ``max_fingers - 1`` top eigenvalues. The first clip whose alpha
    is more than ``finger_thresh`` below the unclipped alpha is kept; the search stops without a
    change once alpha falls to ``min_alpha``. Otherwise the unclipped fit stands.
    """
    for k in range(2, max_fingers):
        if x.size - k < SMALL_N_MIN_TAIL:
            break
        fit = _fit_pl(x[:-k])
        if fit.status != "success":
            break
        if fit.alpha + finger_thresh < first.alpha:
            return PowerLawFit(**{**fit.__dict__, "num_fingers": k})
        if fit.alpha <= min_alpha:
            break
    return first


def fit_power_law(
    evals: np.ndarray,
    *,
    fit: str = "PL",
    xmax: float | None = None,
    fix_fingers: str | None = None,
    max_fingers: int = 10,
    finger_thresh: float = 1.0,
) -> PowerLawFit:
    """Fit a (truncated) power law to the tail of an eigenvalue spectrum.

    Parameters
    ----------
    evals : (n,) array_like
        Eigenvalues of ``W^T W`` (squared singular values), any order.
    fit : {"PL", "TPL"}
        Plain power law (exact vectorised Clauset scan) or truncated power law (``powerlaw``).
    xmax : float, optional
        Ignore eigenvalues above this value (an upper cut-off of the fitted range).
    fix_fingers : {None, "clip_xmax", "xmin_peak"}
        ``"clip_xmax"`` clips up to ``max_fingers`` outlying top eigenvalues when doing so lowers
        alpha by more than ``finger_thresh`` (WeightWatcher's remedy for spuriously large alpha).
        ``"xmin_peak"`` searches xmin only below 1.5 x the peak of the log-ESD (WeightWatcher's
        other remedy: the tail starts at the bulk's peak), see :func:`esd_peak`.

    Returns
    -------
    PowerLawFit
        Never raises for a bad spectrum: ``status="failed"`` with a ``reason`` instead.
    """
    fit_u = str(fit).upper()
    if fit_u not in ("PL", "TPL", "POWER_LAW", "TRUNCATED_POWER_LAW"):
        raise ValueError(f"fit must be 'PL' or 'TPL', got {fit!r}")
    if fix_fingers not in (None, "clip_xmax", "xmin_peak"):
        raise ValueError(f"fix_fingers must be None, 'clip_xmax' or 'xmin_peak', got {fix_fingers!r}")
    x = np.asarray(evals, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        return PowerLawFit.failed("eigenvalues contain NaN or Inf")
    x = np.sort(x[x > EVALS_THRESH])
    if xmax is not None:
        x = x[x <= float(xmax)]
    result = _fit_pl_peak(x) if fix_fingers == "xmin_peak" else _fit_pl(x)
    if result.status != "success":
        return result
    if fix_fingers == "clip_xmax":
        result = _clip_fingers(x, result, max_fingers, finger_thresh, min_alpha=2.0)
    if fit_u in ("TPL", "TRUNCATED_POWER_LAW"):
        x_fit = x[: x.size - result.num_fingers] if result.num_fingers else x
        return _fit_tpl(x_fit, result)
    return result


def _fit_at(x: np.ndarray, alphas: np.ndarray, Ds: np.ndarray, i: int) -> PowerLawFit:
    """The fit whose tail starts at the i-th of the sorted eigenvalues ``x`` (n_tail = len(x) - i)."""
    alpha, n_tail = float(alphas[i]), len(x) - i
    return PowerLawFit(
        alpha=alpha,
        xmin=float(x[i]),
        xmax=float(x[-1]),
        D=float(Ds[i]),
        sigma=(alpha - 1.0) / math.sqrt(n_tail),
        num_pl_spikes=int(n_tail),
    )
