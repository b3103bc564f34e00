"""Within-matrix selection scores and pickers: which k entries of one matrix to train.

Pure functions on one matrix; no model, no I/O. :func:`frogwatch.frog.select.select` calls
:func:`score_matrix` and :func:`pick` once per targeted matrix. The scores (``score=`` of
``select``; benchmarked in ``benchmarks/results_finetune.md``, summarised in README "Does FROG help?"):

``relevance``
    FROG's SVD relevance ``S = |U| diag(σ) |V|ᵀ`` (:func:`~frogwatch.frog.scores.relevance_2d`);
    the top-k entries of S. S is dominated by the leading singular triplets, so its top entries
    pile up in a few rows and columns.
``balanced``
    Row- and column-balanced top-S: entries are taken in decreasing S, skipping any whose row
    already holds ``ceil(k/m)`` or whose column already holds ``ceil(k/n)`` selected entries
    (:func:`balanced_topk`).
``normalized``
    ``S_ij / (r_i c_j)`` with ``r_i`` the mean of row i of S and ``c_j`` the mean of column j: the
    rank-one block structure of S divided out.
``bulk``
    Relevance of the Marchenko–Pastur bulk: S computed from the singular components whose
    eigenvalue σ² lies at or below the spike threshold of frogwatch's MP fit
    (:func:`frogwatch.diagnostics.mp.fit_mp`: bulk edge plus a Tracy–Widom margin), i.e. the
    power-law spikes removed.
``magnitude``
    ``|W_ij|``.
``random``
    Uniform random values from a generator seeded by ``(seed, matrix name)``: a seeded random mask.
    ``select``'s default: none of the scores above adapted better than it in the benchmark.

:func:`pick` adds the mixture: a share of the k entries chosen uniformly at random (same
generator), the rest by score among the remaining entries.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from .budget import topk_flat
from .scores import relevance_2d

__all__ = ["SCORES", "balanced_topk", "bulk_relevance", "matrix_generator", "normalized_relevance", "pick", "score_matrix"]

SCORES = ("relevance", "balanced", "normalized", "bulk", "magnitude", "random")
#: Scores that need an eigendecomposition of the matrix.
SVD_SCORES = ("relevance", "balanced", "normalized", "bulk")


def matrix_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator for one matrix: depends on ``seed`` and the matrix name only (not on the order
    or the set of targets), so the same matrix gets the same random entries in any selection."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1))


def normalized_relevance(S: torch.Tensor) -> torch.Tensor:
    """``S_ij / (r_i c_j)``, ``r_i`` = mean of row i, ``c_j`` = mean of column j (0 where S's row or column is 0).

    Parameters
    ----------
    S : Tensor, shape (m, n)
        Non-negative relevance.

    Returns
    -------
    Tensor, shape (m, n), float64
    """
    S = S.to(torch.float64)
    r = S.mean(1, keepdim=True)
    c = S.mean(0, keepdim=True)
    denom = r * c
    return torch.where(denom > 0, S / torch.where(denom > 0, denom, 1.0), torch.zeros_like(S))


def bulk_relevance(W: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Relevance of the Marchenko–Pastur bulk of ``W``: ``Σ_{k in bulk} σ_k |u_k| |v_k|ᵀ``.

    The bulk is the set of components whose eigenvalue ``σ_k²`` of the Gram matrix is at or below
    :func:`~frogwatch.diagnostics.mp.fit_mp`'s spike threshold (MP bulk edge + Tracy–Widom margin).

    Parameters
    ----------
    W : Tensor, shape (m, n)
        Finite float64 matrix.

    Returns
    -------
    S_bulk : Tensor, shape (m, n), float64
    energy : float
        ``Σ_{bulk} σ_k² / ‖W‖_F²``.
    n_spikes : int
        Components removed.
    """
    from ..diagnostics.mp import fit_mp  # lazy: frog does not import diagnostics at module level

    W = W.to(torch.float64)
    total = float((W * W).sum())
    if W.numel() == 0 or total == 0.0:
        return torch.zeros_like(W), 1.0, 0
    flip = W.shape[0] < W.shape[1]
    A = W.mT if flip else W  # (N, M), N >= M
    evals, V = torch.linalg.eigh(A.mT @ A)
    ev = evals.clamp_min(0.0).numpy()
    fit = fit_mp(ev, A.shape[0], A.shape[1])
    keep = torch.from_numpy(ev <= fit.threshold)
    Vb = V[:, keep]
    AV = A @ Vb
    energy = min(float(AV.square().sum()) / total, 1.0)
    S = AV.abs_() @ Vb.abs().mT
    return (S.mT if flip else S), energy, int((~keep).sum())


def score_matrix(W: torch.Tensor, score: str, *, name: str = "W", seed: int = 0, method: str = "exact",
                 rank: int | None = None) -> tuple[torch.Tensor, float]:
    """The selection score of every entry of one matrix.

    Parameters
    ----------
    W : Tensor, shape (m, n)
        float64 matrix (:func:`~frogwatch.frog.scores.as_matrix`).
    score : one of :data:`SCORES`
    name : str
        Matrix name (seeds the ``random`` score).
    seed : int
    method, rank
        How S is computed for ``relevance`` / ``balanced`` / ``normalized``
        (:func:`~frogwatch.frog.scores.relevance_2d`); ``bulk`` is always exact.

    Returns
    -------
    values : Tensor, shape (m, n), float64, non-negative
    energy : float
        Spectral energy behind S (NaN for ``magnitude`` and ``random``, which compute no S).
    """
    if score in ("relevance", "balanced"):
        return relevance_2d(W, rank=rank, method=method)
    if score == "normalized":
        S, energy = relevance_2d(W, rank=rank, method=method)
        return normalized_relevance(S), energy
    if score == "bulk":
        S, energy, _ = bulk_relevance(W)
        return S, energy
    if score == "magnitude":
        return W.abs().to(torch.float64), math.nan
    if score == "random":
        return torch.rand(W.shape, generator=matrix_generator(seed, name), dtype=torch.float64), math.nan
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def balanced_topk(values: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Row- and column-balanced top-k of a matrix.

    Entries are visited in decreasing value (ties: lower flat index first); an entry is taken when
    its row holds fewer than ``ceil(k/m)`` and its column fewer than ``ceil(k/n)`` taken entries.
    If the scan ends with fewer than ``k`` (the caps can block each other), the rest are the largest
    entries not yet taken, caps ignored.

    Parameters
    ----------
    values : Tensor, shape (m, n)
    k : int
        ``0 <= k <= m·n`` minus the excluded entries.
    exclude : Tensor of int64, optional
        Flat indices that may not be taken (already chosen elsewhere).

    Returns
    -------
    Tensor of int64, shape (k,), sorted flat indices
    """
    m, n = values.shape
    flat = values.reshape(-1).to(torch.float64).clone()
    allowed = torch.ones(flat.numel(), dtype=torch.bool)
    if exclude is not None and exclude.numel():
        allowed[exclude] = False
    k = int(k)
    if not 0 <= k <= int(allowed.sum()):
        raise ValueError(f"k must be in [0, {int(allowed.sum())}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    rcap, ccap = -(-k // m), -(-k // n)
    order = torch.sort(flat, descending=True, stable=True).indices.numpy()
    ok = allowed.numpy()
    rows = np.zeros(m, dtype=np.int64)
    cols = np.zeros(n, dtype=np.int64)
    taken = np.zeros(flat.numel(), dtype=bool)
    got = 0
    for start in range(0, order.size, 1 << 16):
        for idx in order[start : start + (1 << 16)].tolist():
            if not ok[idx]:
                continue
            i, j = divmod(idx, n)
            if rows[i] < rcap and cols[j] < ccap:
                rows[i] += 1
                cols[j] += 1
                taken[idx] = True
                got += 1
                if got == k:
                    break
        if got == k:
            break
    if got < k:
        rest = order[ok[order] & ~taken[order]][: k - got]
        taken[rest] = True
    return torch.from_numpy(np.flatnonzero(taken)).to(torch.int64)


def pick(values: torch.Tensor, k: int, *, balanced: bool = False, random_share: float = 0.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``k`` entries of one matrix to train.

    ``round(random_share · k)`` entries are drawn uniformly at random (``generator``); the others
    are the top entries of ``values`` among the rest (row- and column-balanced with
    ``balanced=True``, :func:`balanced_topk`; plain top-k otherwise, ties to the lower flat index).

    Parameters
    ----------
    values : Tensor, shape (m, n)
    k : int
    balanced : bool
    random_share : float in [0, 1]
    generator : torch.Generator, optional
        Needed when ``random_share > 0``.

    Returns
    -------
    Tensor of int64, shape (k,), sorted flat indices
    """
    size = values.numel()
    n_rand = int(math.floor(random_share * k + 0.5))
    rand = torch.randperm(size, generator=generator)[:n_rand] if n_rand else torch.zeros(0, dtype=torch.int64)
    k_score = int(k) - n_rand
    if balanced and values.dim() == 2:
        chosen = balanced_topk(values, k_score, exclude=rand)
    else:
        flat = values.reshape(-1).to(torch.float64)
        if n_rand:
            flat = flat.clone()
            flat[rand] = -math.inf
        chosen = topk_flat(flat, k_score)
    return torch.sort(torch.cat([rand, chosen])).values
