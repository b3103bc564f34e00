"""Eigenvector localisation: are a layer's top eigenvectors spread over all inputs or a few?

For each analysed matrix ``W`` (``M`` = its smaller side) the eigenvectors ``v`` (unit length, ``M``
entries) of the ``M x M`` correlation matrix (``W W^T`` or ``W^T W``, whichever is smaller) are
measured by:

* ``vec_entropy`` (WeightWatcher's ``discrete_entropy``): the entropy of a 100-bin histogram of
  ``|v| - mean(|v|)``; lower = more localised.
* ``loc_ratio`` (localisation ratio): ``||v||_1 / ||v||_inf``; ``M``-ish when delocalised, 1 when
  the vector sits on one coordinate.
* ``part_ratio`` (WeightWatcher's participation ratio): ``||v||_2 / ||v||_4``; ``M^(1/4)`` when
  spread evenly, 1 on one coordinate.

WeightWatcher 0.7.7's ``analyze(vectors=True)`` splits the eigenvectors at the power-law ``xmin``
into the bulk (eigenvalue ``< xmin``) and the tail (``>= xmin``) and reports the mean and variance
of each measure on each side: ``bulk_mean_vec_entropy``, ``bulk_var_vec_entropy``,
``tail_mean_vec_entropy``, ... (12 columns, same names and formulas here). One difference: WeightWatcher
recomputes the eigenvalues with a non-symmetric solver and compares them with ``xmin``, so the
eigenvalue *equal* to ``xmin`` lands on either side by round-off (on MiniLM it falls in the bulk
in 19 of 39 layers); frogwatch's tail is exactly the fit's tail, the top ``num_pl_spikes``
eigenvectors. Where the two splits agree the columns agree to round-off.

frogwatch adds four normalised columns that read without knowing ``M``:

* ``top_participation``: the participation ratio ``1 / (M sum_i v_i^4)`` of the top eigenvector,
  the fraction of the ``M`` coordinates it uses (1 = perfectly even; about 1/3 for a random
  Gaussian direction; ``1/M`` = one coordinate).
* ``top_entropy``: the Shannon entropy of ``v_i^2`` of the top eigenvector over ``log M`` (1 = even,
  0 = one coordinate; a random direction gives about ``1 - 0.73 / log M``).
* ``tail_participation``, ``tail_entropy``: the same, averaged over the tail eigenvectors.

Reading: a tail whose vectors are much more localised than its bulk (tail_participation well
below the ~1/3 of random directions) means the large eigenvalues are carried by a few input or
output units - typical of correlation traps, outlier features, or quantisation-sensitive channels.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = ["VECTOR_COLUMNS", "eigenvectors", "vector_columns", "vectors_hook"]

_WW_MEASURES = ("vec_entropy", "loc_ratio", "part_ratio")
_WW_COLUMNS = [f"{side}_{stat}_{m}" for m in _WW_MEASURES for side in ("bulk", "tail") for stat in ("mean", "var")]
VECTOR_COLUMNS = _WW_COLUMNS + ["top_participation", "top_entropy", "tail_participation", "tail_entropy"]
_EPSILON = 1e-10  # WeightWatcher's EPSILON in discrete_entropy
_BINS = 100


def eigenvectors(W: torch.Tensor | np.ndarray, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and unit eigenvectors (columns) of the smaller Gram matrix of ``W``.

    Returns
    -------
    evals : (M,) float64
    V : (M, M) float64, column ``j`` belongs to ``evals[j]``.
    """
    if device is not None:
        A = torch.as_tensor(W).to(device=device, dtype=torch.float64)
        X = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
        ev, V = torch.linalg.eigh(X)
        return ev.cpu().numpy(), V.cpu().numpy()
    A = W.detach().to(torch.float64).cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W, np.float64)
    X = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return np.linalg.eigh(X)


def _discrete_entropy(V: np.ndarray) -> np.ndarray:
    """WeightWatcher's discrete_entropy of every column of ``V`` (100 density bins)."""
    out = np.empty(V.shape[1])
    for j in range(V.shape[1]):
        a = np.abs(V[:, j])
        h = np.histogram(a - a.mean(), density=True, bins=_BINS)[0]
        p = (h + _EPSILON) / math.sqrt(2 * math.pi)
        p = p / p.sum()
        out[j] = -np.sum(p * np.log(p))
    return out


def _measures(V: np.ndarray) -> dict[str, np.ndarray]:
    a = np.abs(V)
    return {
        "vec_entropy": _discrete_entropy(V),
        "loc_ratio": a.sum(0) / a.max(0),
        "part_ratio": np.sqrt((a**2).sum(0)) / ((a**4).sum(0)) ** 0.25,
    }


def _normalised(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Participation fraction and normalised entropy of each column (unit vectors)."""
    M = V.shape[0]
    p = V**2
    p = p / p.sum(0)
    part = 1.0 / (M * (p**2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(0) / math.log(M) if M > 1 else np.full(V.shape[1], np.nan)
    return part, ent


def vector_columns(mats: list, num_tail: int, device: torch.device | None = None) -> dict:
    """The :data:`VECTOR_COLUMNS` of one layer.

    Parameters
    ----------
    mats : list of (rows, cols) tensors or arrays
        The layer's matrices (several for pooled conv2d slices), already scaled as for its ESD.
    num_tail : int
        Size of the power-law tail (``num_pl_spikes``): the top ``num_tail`` eigenvectors are the
        tail, the rest the bulk. 0 (a failed fit): only the ``top_*`` columns are filled.
    """
    evs, cols = [], {m: [] for m in _WW_MEASURES}
    parts, ents = [], []
    for W in mats:
        ev, V = eigenvectors(W, device)
        evs.append(ev)
        for k, v in _measures(V).items():
            cols[k].append(v)
        p, e = _normalised(V)
        parts.append(p)
        ents.append(e)
    ev = np.concatenate(evs)
    order = np.argsort(ev, kind="stable")
    ev = ev[order]
    out: dict = {c: math.nan for c in VECTOR_COLUMNS}
    part, ent = np.concatenate(parts)[order], np.concatenate(ents)[order]
    out["top_participation"] = float(part[-1])
    out["top_entropy"] = float(ent[-1])
    if num_tail <= 0:
        return out
    tail = np.arange(ev.size) >= ev.size - num_tail
    for m in _WW_MEASURES:
        data = np.concatenate(cols[m])[order]
        for side, sel in (("bulk", ~tail), ("tail", tail)):
            if sel.any():
                out[f"{side}_mean_{m}"] = float(np.mean(data[sel]))
                out[f"{side}_var_{m}"] = float(np.var(data[sel]))
    if tail.any():
        out["tail_participation"] = float(part[tail].mean())
        out["tail_entropy"] = float(ent[tail].mean())
    return out


def vectors_hook(device: torch.device | None = None) -> Callable:
    """An :func:`frogwatch.analyze` hook adding the :data:`VECTOR_COLUMNS`."""

    def hook(layer, matrices, spec, fit) -> dict:
        num_tail = fit.num_pl_spikes if fit.status == "success" else 0
        return vector_columns(matrices, int(num_tail), device)

    return hook
