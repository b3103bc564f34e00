"""Is a power law the right model for a layer's tail at all? Likelihood-ratio tests on the tail.

Alpha is only meaningful if the tail above ``xmin`` looks like a power law. Following Clauset,
Shalizi & Newman (2009, section 5), the tail ``x >= xmin`` is also fitted by a lognormal and by an
exponential (maximum likelihood, through ``powerlaw``'s distributions, on exactly the same
eigenvalues), and the log-likelihood ratio

    R = sum_i [ log p_PL(x_i) - log p_alt(x_i) ]

is computed with the frogwatch alpha for the power law, together with Vuong's two-sided p-value
for ``R != 0`` (``powerlaw.loglikelihood_ratio``; the same numbers as ``powerlaw.Fit(...)
.distribution_compare("power_law", alt)``).

Columns: ``R_lognormal``, ``p_lognormal``, ``R_exponential``, ``p_exponential``.

Reading: ``R > 0`` with ``p < 0.1``: the power law describes the tail better than the alternative;
``R < 0`` with ``p < 0.1``: the alternative is better, so alpha is a slope fitted to a tail that
is not a power law; ``p >= 0.1``: the tail is too short or too ambiguous to tell. Heavy tails are
often indistinguishable from a lognormal (``p_lognormal`` large) while clearly not exponential
(``R_exponential > 0``, small ``p_exponential``): that is still a heavy tail.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np

__all__ = ["TAIL_TEST_COLUMNS", "ALTERNATIVES", "tail_tests", "tail_tests_hook"]

ALTERNATIVES = ("lognormal", "exponential")
TAIL_TEST_COLUMNS = [f"{k}_{alt}" for alt in ALTERNATIVES for k in ("R", "p")]


def _pl_loglikelihoods(tail: np.ndarray, alpha: float, xmin: float) -> np.ndarray:
    """Log density of the continuous power law ``(alpha-1)/xmin (x/xmin)^-alpha`` on ``tail``."""
    return math.log(alpha - 1.0) - math.log(xmin) - alpha * np.log(tail / xmin)


def tail_tests(evals: np.ndarray, alpha: float, xmin: float) -> dict:
    """Likelihood-ratio tests of the power law against a lognormal and an exponential.

    Parameters
    ----------
    evals : (n,) array_like
        The layer's eigenvalues (all of them; the tail ``>= xmin`` is taken here).
    alpha, xmin : float
        The power-law fit of that tail.

    Returns
    -------
    dict
        ``R_<alt>`` (sum of log-likelihood ratios, > 0 favours the power law) and ``p_<alt>``
        (two-sided significance) for each alternative; NaN where a fit is impossible.
    """
    import powerlaw

    out = {c: math.nan for c in TAIL_TEST_COLUMNS}
    x = np.asarray(evals, dtype=np.float64).ravel()
    if not (np.isfinite(alpha) and alpha > 1 and np.isfinite(xmin) and xmin > 0):
        return out
    tail = np.sort(x[x >= xmin])
    if tail.size < 3 or tail[0] == tail[-1]:
        return out
    l_pl = _pl_loglikelihoods(tail, alpha, xmin)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for alt in ALTERNATIVES:
            try:
                cls = powerlaw.Lognormal if alt == "lognormal" else powerlaw.Exponential
                dist = cls(data=tail, xmin=xmin, xmax=None, discrete=False, fit_method="Likelihood")
                R, p = powerlaw.loglikelihood_ratio(l_pl, dist.loglikelihoods(tail))
            except Exception:  # powerlaw's optimiser raises bare exceptions on degenerate tails
                continue
            if np.isfinite(R):
                out[f"R_{alt}"], out[f"p_{alt}"] = float(R), float(p)
    return out


def tail_tests_hook() -> Callable:
    """An :func:`frogwatch.analyze` hook adding the :data:`TAIL_TEST_COLUMNS`."""

    def hook(layer, matrices, spec, fit) -> dict:
        if fit.status != "success":
            return {c: math.nan for c in TAIL_TEST_COLUMNS}
        return tail_tests(spec.evals, fit.alpha, fit.xmin)

    return hook
