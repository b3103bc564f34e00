"""The detX / ERG condition: how many top eigenvalues have a product (determinant) of about 1.

WeightWatcher 0.7.7's ``analyze(detX=True)`` (alias ``ERG=True``), reproduced exactly. The
eigenvalues of a layer are first rescaled so that their mean is 1
(``x = evals * n / sum(evals)``). Walking down from the largest, the tail ``x[i:]`` is grown until
its product falls below 1; ``detX_num`` is the size of that tail and ``detX_val`` its smallest
eigenvalue, in the original units. In the theory of the Exact Renormalisation Group (ERG) a
well-trained layer has ``det X = 1`` on its power-law tail, so ``detX_num`` should be close to the
power-law tail size ``num_pl_spikes``: ``ERG_gap = detX_num - num_pl_spikes`` measures the
difference (near 0: the two tails agree; large: the fitted tail and the ERG tail disagree).

Columns (see :func:`detx_hook`): ``detX_num``, ``num_ERG_spikes`` (the same number, WeightWatcher
reports both), ``ERG_gap``, ``detX_val`` and ``detX_val_unrescaled`` (``detX_val`` in mean-1 units).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["DETX_COLUMNS", "detx_constraint", "detx_columns", "detx_hook"]

DETX_COLUMNS = ["detX_num", "num_ERG_spikes", "ERG_gap", "detX_val", "detX_val_unrescaled"]


def detx_constraint(x: np.ndarray) -> tuple[int, int]:
    """Tail size and start index where the product of the top eigenvalues first drops below 1.

    Parameters
    ----------
    x : (n,) float64, ascending
        Eigenvalues already rescaled to mean 1.

    Returns
    -------
    (num, idx) : tuple of int
        ``idx`` is the largest index with ``prod(x[idx:]) < 1`` (searched over ``idx >= 1``), and
        ``num = n - idx``. If no tail qualifies: ``(n, 1)``, as WeightWatcher's loop leaves them;
        ``(0, 0)`` for fewer than two eigenvalues or a flat spectrum.
    """
    n = x.size
    if n < 2 or not x[0] < x[-1]:
        return 0, 0
    # Going down from the top, the product first grows (factors > 1) and then shrinks, so the
    # crossing is unique; find it with log sums, then confirm with the product WeightWatcher takes.
    with np.errstate(divide="ignore"):
        tail_log = np.cumsum(np.log(x[::-1]))[::-1]  # tail_log[i] = sum(log x[i:])
    below = np.flatnonzero(tail_log[1:] < 0.0) + 1
    idx = int(below[-1]) if below.size else 1
    if below.size and np.prod(x[idx:]) < 1.0 and (idx == n - 1 or np.prod(x[idx + 1 :]) >= 1.0):
        return n - idx, idx
    for i in range(n - 1, 0, -1):  # round-off at the crossing: WeightWatcher's own loop
        if np.prod(x[i:]) < 1.0:
            return n - i, i
    return n, 1


def detx_columns(evals: np.ndarray, num_pl_spikes: float) -> dict:
    """The detX / ERG columns of one spectrum.

    Parameters
    ----------
    evals : (n,) array_like
        All eigenvalues of the layer (zeros included), any order.
    num_pl_spikes : int or NaN
        Size of the fitted power-law tail (``ERG_gap`` is NaN when it is NaN).

    Returns
    -------
    dict
        ``detX_num``, ``num_ERG_spikes``, ``ERG_gap``, ``detX_val`` (eigenvalue units) and
        ``detX_val_unrescaled`` (mean-1 units).
    """
    ev = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    total = float(ev.sum())
    if ev.size < 2 or not total > 0:
        return {c: math.nan for c in DETX_COLUMNS}
    scale = ev.size / total
    x = scale * ev
    num, idx = detx_constraint(x)
    gap = num - num_pl_spikes if num_pl_spikes is not None and np.isfinite(num_pl_spikes) else math.nan
    return {
        "detX_num": int(num),
        "num_ERG_spikes": int(num),
        "ERG_gap": gap,
        "detX_val": float(x[idx] / scale),
        "detX_val_unrescaled": float(x[idx]),
    }


def detx_hook() -> Callable:
    """An :func:`frogwatch.analyze` hook adding the :data:`DETX_COLUMNS`."""

    def hook(layer, matrices, spec, fit) -> dict:
        n_pl = fit.num_pl_spikes if fit.status == "success" else math.nan
        return detx_columns(spec.evals, n_pl)

    return hook
