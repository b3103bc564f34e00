"""Marchenko-Pastur (MP) fit of an eigenvalue spectrum: bulk edge, spikes, MP soft rank.

Definitions (docs/method.md#mp). The eigenvalues are first rescaled to mean 1
(``x = evals * n / sum(evals)``). For a matrix of i.i.d. entries and aspect ratio ``Q = N / M``
(``gamma = 1 / Q``) the rescaled ESD follows the MP law of scale ``s = 1``:

    density  rho(x) = sqrt((b - x)(x - a)) / (2 pi s^2 gamma x)   on [a, b]
    edges    a = (s (1 - 1/sqrt(Q)))^2 = bulk_min,   b = (s (1 + 1/sqrt(Q)))^2 = bulk_max

A trained matrix adds a heavy tail of large eigenvalues ("spikes") to such a bulk.

How frogwatch fits ``s`` (its own estimator, not WeightWatcher's kernel-density fit): least
squares between the empirical quantiles of ``x`` and the MP quantiles of scale 1 at the
probability levels 0.05, ..., 0.95 (``MP_QUANTILE_RANGE``). MP quantiles scale as ``s^2``, so
the fit has the closed form ``s^2 = sum(q_emp q_mp) / sum(q_mp^2)``. Using the central 90 % of
the eigenvalues keeps up to 5 % of spikes on top (and rank-deficient zeros at the bottom) from
moving the scale; it needs no iteration and no bandwidth.

Spikes are the eigenvalues above the bulk edge plus a Tracy-Widom margin:
``x > bulk_max + TW_MARGIN_SIGMAS * sigma_TW``, where ``sigma_TW`` is the scale of the largest
eigenvalue's fluctuations for an ``N x M`` Gaussian matrix (Johnstone 2001), in mean-1 units:

    sigma_TW = s^2 N^(-2/3) (1 + sqrt(gamma)) (1 + 1/sqrt(gamma))^(1/3)

``TW_MARGIN_SIGMAS = 4``: the Tracy-Widom (beta = 1) law puts about 5e-5 of its mass above 4, so a
pure-noise matrix almost never shows a spike, while a genuine outlier stands far above it
(the correlation traps of the real MiniLM stand 20 to 1200 sigma_TW above the edge).

``bulk_max``, ``bulk_min`` and the spike threshold are reported in the units of the input
eigenvalues (as WeightWatcher reports them), so they compare directly with ``lambda_max`` and
``xmin``; ``sigma_mp`` is the dimensionless scale ``s``; ``mp_softrank = bulk_max / lambda_max``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

__all__ = [
    "MPFit",
    "fit_mp",
    "mp_density",
    "mp_quantiles",
    "tracy_widom_scale",
    "mp_fit_hook",
    "MP_COLUMNS",
    "TW_MARGIN_SIGMAS",
    "MP_QUANTILE_RANGE",
]

TW_MARGIN_SIGMAS = 4.0
MP_QUANTILE_RANGE = (0.05, 0.95)
_N_QUANTILES = 181  # probability levels used in the fit (every 0.5 %)
_CDF_GRID = 4001

# analyze() columns produced by mp_fit_hook
MP_COLUMNS = ["num_spikes", "sigma_mp", "mp_softrank", "bulk_max", "bulk_min"]


@dataclass(frozen=True)
class MPFit:
    """Marchenko-Pastur fit of one spectrum.

    Attributes
    ----------
    sigma_mp : float
        Fitted scale ``s`` of the mean-1 rescaled eigenvalues (1 for pure noise).
    bulk_max, bulk_min : float
        MP bulk edges ``(s (1 +- 1/sqrt(Q)))^2``, in the units of the input eigenvalues.
    threshold : float
        ``bulk_max`` plus the Tracy-Widom margin, in the units of the input eigenvalues.
    num_spikes : int
        Eigenvalues above ``threshold``.
    mp_softrank : float
        ``bulk_max / lambda_max``.
    Q : float
        Aspect ratio ``N / M``.
    scale : float
        Factor that rescales the input eigenvalues to mean 1.
    """

    sigma_mp: float
    bulk_max: float
    bulk_min: float
    threshold: float
    num_spikes: int
    mp_softrank: float
    Q: float
    scale: float

    def columns(self, prefix: str = "") -> dict:
        """The analyze() columns of this fit, names optionally prefixed (``rand_``)."""
        d = asdict(self)
        return {prefix + k: d[k] for k in MP_COLUMNS}


def _check_shape(N: int, M: int) -> float:
    if not (isinstance(N, (int, np.integer)) and isinstance(M, (int, np.integer))):
        raise ValueError(f"N and M must be integers, got {N!r} and {M!r}")
    if M < 1 or N < M:
        raise ValueError(f"need N >= M >= 1 (N = larger side, M = smaller side), got N={N}, M={M}")
    return N / M


def mp_density(x: np.ndarray, Q: float, sigma: float = 1.0) -> np.ndarray:
    """MP density of scale ``sigma`` for aspect ratio ``Q >= 1`` (zero outside the bulk).

    Parameters
    ----------
    x : array_like
        Points (mean-1 units when ``sigma = 1``).
    Q : float
        ``N / M >= 1``.
    sigma : float
        Scale ``s``; the bulk is ``[(s(1-1/sqrt Q))^2, (s(1+1/sqrt Q))^2]``.
    """
    if Q < 1 or sigma <= 0:
        raise ValueError(f"need Q >= 1 and sigma > 0, got Q={Q}, sigma={sigma}")
    x = np.asarray(x, dtype=np.float64)
    g = 1.0 / Q
    a = (sigma * (1 - math.sqrt(g))) ** 2
    b = (sigma * (1 + math.sqrt(g))) ** 2
    out = np.zeros_like(x)
    inside = (x > a) & (x < b) & (x > 0)
    xi = x[inside]
    out[inside] = np.sqrt((b - xi) * (xi - a)) / (2 * math.pi * sigma**2 * g * xi)
    return out


@lru_cache(maxsize=128)
def _mp_cdf_table(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, CDF(x)) of the scale-1 MP law on a grid, exact up to trapezoid error.

    Integrates in ``theta`` with ``x = a + (b - a) sin^2(theta)``, which removes the square-root
    singularities at both edges (and the 1/sqrt(x) one at 0 when ``gamma = 1``).
    """
    a = (1 - math.sqrt(gamma)) ** 2
    b = (1 + math.sqrt(gamma)) ** 2
    th = np.linspace(0.0, math.pi / 2, _CDF_GRID)
    s2, c2 = np.sin(th) ** 2, np.cos(th) ** 2
    x = a + (b - a) * s2
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (b - a) ** 2 * 2 * s2 * c2 / (2 * math.pi * gamma * x)
    # at x = 0 (gamma = 1, theta = 0) the integrand tends to b cos^2 / (pi gamma)
    f = np.where(x > 0, f, (b - a) * c2 / (math.pi * gamma))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(th))])
    cdf /= cdf[-1]
    return x, cdf


def mp_quantiles(p: np.ndarray, Q: float) -> np.ndarray:
    """Quantiles of the scale-1 MP law (mean 1) at probability levels ``p`` in [0, 1]."""
    if Q < 1:
        raise ValueError(f"Q must be >= 1, got {Q}")
    p = np.asarray(p, dtype=np.float64)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probability levels must lie in [0, 1]")
    x, cdf = _mp_cdf_table(round(1.0 / Q, 12))
    return np.interp(p, cdf, x)


def tracy_widom_scale(N: int, M: int, sigma: float = 1.0) -> float:
    """Scale of the largest-eigenvalue fluctuations of an ``N x M`` noise matrix, mean-1 units."""
    _check_shape(N, M)
    g = M / N
    return sigma**2 * N ** (-2.0 / 3.0) * (1 + math.sqrt(g)) * (1 + 1 / math.sqrt(g)) ** (1.0 / 3.0)


def fit_mp(
    evals: np.ndarray,
    N: int,
    M: int,
    *,
    tw_sigmas: float = TW_MARGIN_SIGMAS,
    quantile_range: tuple[float, float] = MP_QUANTILE_RANGE,
) -> MPFit:
    """Fit the Marchenko-Pastur bulk to a spectrum and count the spikes above it.

    Parameters
    ----------
    evals : (n,) array_like
        Eigenvalues of ``W^T W`` (squared singular values), any order, all >= 0. For pooled conv
        slices, the pooled eigenvalues (``n = M * rf``).
    N, M : int
        Larger and smaller side of the (per-slice) matrix.
    tw_sigmas : float
        Spikes must stand this many Tracy-Widom scales above the bulk edge.
    quantile_range : (float, float)
        Probability levels whose quantiles fix the scale.

    Returns
    -------
    MPFit

    Raises
    ------
    ValueError
        Empty, non-finite or negative eigenvalues, a zero spectrum, or inconsistent N, M.
    """
    Q = _check_shape(N, M)
    x = np.asarray(evals, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("fit_mp needs at least one eigenvalue")
    if not np.isfinite(x).all():
        raise ValueError("eigenvalues contain NaN or Inf")
    if (x < 0).any():
        raise ValueError("eigenvalues must be >= 0 (squared singular values)")
    total = float(x.sum())
    if total <= 0:
        raise ValueError("all eigenvalues are zero; there is no bulk to fit")
    lo, hi = quantile_range
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"quantile_range must satisfy 0 <= lo < hi <= 1, got {quantile_range}")
    if tw_sigmas < 0:
        raise ValueError(f"tw_sigmas must be >= 0, got {tw_sigmas}")
    scale = x.size / total
    xs = x * scale
    p = np.linspace(lo, hi, _N_QUANTILES)
    q_emp = np.quantile(xs, p)
    q_mp = mp_quantiles(p, Q)
    s2 = float((q_emp * q_mp).sum() / (q_mp * q_mp).sum())
    s = math.sqrt(max(s2, 0.0))
    edge = s2 * (1 + 1 / math.sqrt(Q)) ** 2
    low = s2 * (1 - 1 / math.sqrt(Q)) ** 2
    thr = edge + tw_sigmas * tracy_widom_scale(N, M, s)
    lam_max = float(xs.max())
    return MPFit(
        sigma_mp=s,
        bulk_max=edge / scale,
        bulk_min=low / scale,
        threshold=thr / scale,
        num_spikes=int(np.count_nonzero(xs > thr)),
        mp_softrank=edge / lam_max,
        Q=Q,
        scale=scale,
    )


def _nan_columns(prefix: str = "") -> dict:
    return {prefix + k: math.nan for k in MP_COLUMNS}


def mp_fit_hook(*, tw_sigmas: float = TW_MARGIN_SIGMAS) -> Callable:
    """An :func:`frogwatch.analyze` hook adding ``num_spikes, sigma_mp, mp_softrank, bulk_max,
    bulk_min`` from the layer's spectrum (NaN when the spectrum is all zeros)."""

    def mp_hook(layer, matrices, spec, fit) -> dict:
        try:
            return fit_mp(spec.evals, spec.N, spec.M, tw_sigmas=tw_sigmas).columns()
        except ValueError:
            return _nan_columns()

    return mp_hook
