"""Per-layer distances between two models of the same architecture.

For every weight matrix present in both models with the same shape (conv2d kernels are flattened
to ``out x (in*kh*kw)``), with ``A`` from model ``a`` and ``B`` from model ``b``, each oriented
``N x M`` (``M`` = smaller side, the "feature" side):

* ``fro`` = ``||A - B||_F`` and ``rel`` = ``||A - B||_F / ||A||_F`` (0 = identical);
* ``cka`` = ``||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F)``: linear CKA (uncentred) with the ``N``
  rows as samples and the ``M`` columns as features; 1 = the two matrices induce the same
  similarity structure up to a rotation and scale, 0 = orthogonal. Invariant to ``B = c A R``
  for an orthogonal ``R`` (``M x M``, a rotation of the feature side), unlike ``rel``;
* principal angles between the top-``k`` singular subspaces: ``angle_out_mean`` /
  ``angle_out_max`` (left singular vectors, the output side of ``nn.Linear``) and
  ``angle_in_mean`` / ``angle_in_max`` (right singular vectors, the input side), in degrees.
  ``cos(theta_i)`` are the singular values of ``U_A^T U_B``; 0 deg = the same subspace, 90 deg =
  a direction of one is orthogonal to all of the other's.

``frogwatch.distances(a, b)`` returns one row per common layer; layers in only one model, or
with different shapes, are listed in ``df.attrs["a_only"]``, ``["b_only"]`` and ``["mismatched"]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ._validation import check_bool, check_int
from .sources import SourceError, layer_matrices

__all__ = ["distances", "layer_distances", "principal_angles", "DISTANCE_COLUMNS"]

DISTANCE_COLUMNS = [
    "layer_id", "name", "layer_type", "N", "M", "fro", "rel", "cka", "k",
    "angle_out_mean", "angle_out_max", "angle_in_mean", "angle_in_max",
]  # fmt: skip


def principal_angles(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the column spans of orthonormal ``U`` and ``V``.

    Parameters
    ----------
    U, V : (d, k) float64 with orthonormal columns.
    """
    c = np.linalg.svd(U.T @ V, compute_uv=False)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))[::-1]


def _as_2d(W: torch.Tensor) -> np.ndarray:
    A = W.detach().to("cpu", torch.float64).reshape(W.shape[0], -1).numpy()
    return A if A.shape[0] >= A.shape[1] else A.T


def layer_distances(A: np.ndarray, B: np.ndarray, k: int = 10) -> dict:
    """The distance columns for one pair of same-shaped matrices.

    Parameters
    ----------
    A, B : (N, M) float64, N >= M
    k : int
        Size of the top singular subspaces compared (capped at M).

    Returns
    -------
    dict with ``fro``, ``rel``, ``cka``, ``k`` and the four angle columns.
    """
    fro = float(np.linalg.norm(A - B))
    na = float(np.linalg.norm(A))
    GA, GB, AB = A.T @ A, B.T @ B, A.T @ B  # M x M: cheap for N >= M
    den = float(np.linalg.norm(GA) * np.linalg.norm(GB))
    k = min(k, A.shape[1])
    Ua, _, Vat = np.linalg.svd(A, full_matrices=False)
    Ub, _, Vbt = np.linalg.svd(B, full_matrices=False)
    out_ang = principal_angles(Ua[:, :k], Ub[:, :k])
    in_ang = principal_angles(Vat[:k].T, Vbt[:k].T)
    return {
        "fro": fro,
        "rel": fro / na if na > 0 else math.nan,
        "cka": float(np.sum(AB * AB)) / den if den > 0 else math.nan,
        "k": int(k),
        "angle_out_mean": float(out_ang.mean()),
        "angle_out_max": float(out_ang.max()),
        "angle_in_mean": float(in_ang.mean()),
        "angle_in_max": float(in_ang.max()),
    }


def distances(a: Any, b: Any, *, k: int = 10, progress: bool = True) -> pd.DataFrame:
    """Per-layer distances between two models of the same shapes (one row per common layer).

    Parameters
    ----------
    a, b : nn.Module, state dict, or path
        Anything :func:`frogwatch.analyze` reads. ``a`` is the reference (``rel`` divides by it).
    k : int
        Top singular subspaces compared by the principal angles (capped at each layer's ``M``).
    progress : bool
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        :data:`DISTANCE_COLUMNS`; ``attrs`` lists ``a_only``, ``b_only`` and ``mismatched`` layers.
        The orientation is the one of ``nn.Linear`` weights (``out x in``); for HF ``Conv1D``
        (stored ``in x out``) the ``angle_out_*`` and ``angle_in_*`` columns swap meaning.

    Raises
    ------
    SourceError
        No layer is shared by the two models.
    """
    k = check_int(k, "k", "distances", low=1)
    progress = check_bool(progress, "progress", "distances")
    la, lb = layer_matrices(a), layer_matrices(b)
    by_name = {lm.name: lm for lm in lb}
    pairs, mismatched = [], []
    for i, lm in enumerate(la):
        other = by_name.get(lm.name)
        if other is None:
            continue
        if tuple(other.shape) != tuple(lm.shape):
            mismatched.append(lm.name)
        else:
            pairs.append((i, lm, other))
    if not pairs:
        raise SourceError(
            f"distances: the two models share no layer of the same name and shape "
            f"({len(la)} and {len(lb)} weight matrices)"
        )
    rows = []
    for i, lm, other in tqdm(pairs, desc="frogwatch distances", unit="layer", disable=not progress, leave=False):
        A, B = _as_2d(lm.load()), _as_2d(other.load())
        rows.append({"layer_id": i, "name": lm.name, "layer_type": lm.kind, "N": A.shape[0], "M": A.shape[1],
                     **layer_distances(A, B, k)})  # fmt: skip
    df = pd.DataFrame(rows, columns=DISTANCE_COLUMNS)
    names_a = {lm.name for lm in la}
    df.attrs["a_only"] = [lm.name for lm in la if lm.name not in by_name]
    df.attrs["b_only"] = [lm.name for lm in lb if lm.name not in names_a]
    df.attrs["mismatched"] = mismatched
    return df
