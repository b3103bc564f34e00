"""FROG scores: weight relevance S, matrix importance R, and the α multiplier m(α).

Pure functions on tensors and arrays; no model, no I/O. REFERENCE.md §3 and §4.

* Relevance (§3.1): for ``W = U diag(σ) Vᵀ``, ``S = |U| diag(σ) |V|ᵀ``, i.e.
  ``S_ij = Σ_k σ_k |u_ik| |v_jk|``. By the triangle inequality ``S_ij ≥ |W_ij|``. The exact path
  uses ``σ_k u_k = W v_k``: ``S = |W V| |V|ᵀ`` with V from the smaller Gram matrix (float64).
  A rank-q SVD (exact truncated or randomized) gives ``S_q = Σ_{k≤q} σ_k |u_k| |v_k|ᵀ`` and reports
  the spectral energy it captured, ``Σ_{k≤q} σ_k² / ‖W‖_F²``.
* Matrix importance (§3.4): ``R_i = ‖W_i‖_F / Σ_j ‖W_j‖_F``.
* α multiplier (§4): see :func:`alpha_multipliers`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "AUTO_RANDOMIZED_MIN_DIM",
    "DIRECTIONS",
    "METHODS",
    "alpha_lookup",
    "alpha_multipliers",
    "as_matrix",
    "check_blend",
    "check_direction",
    "default_rank",
    "matrix_importance",
    "randomized_svd",
    "relevance",
    "relevance_2d",
]

METHODS = ("exact", "randomized", "auto")
DIRECTIONS = ("undertrained-first", "overtrained-first")

#: ``method="auto"`` switches to the randomized SVD when ``min(rows, cols)`` reaches this size.
#: Below it (every matrix of GPT-2 small, BERT-base, MiniLM) the exact path costs well under a
#: second per matrix on two CPU cores and a randomized S of useful rank is no cheaper; from 4096
#: (7B-class models) the O(M³) eigensolver starts to dominate. A randomized S changes the
#: selection (see :func:`default_rank`), so ``select`` uses ``exact`` unless asked.
AUTO_RANDOMIZED_MIN_DIM = 4096


def default_rank(rows: int, cols: int) -> int:
    """Rank used by the randomized SVD when none is given: ``max(min(64, M), M // 2)``, ``M = min(rows, cols)``.

    FROG's S is not carried by the top of the spectrum alone: on the trained MiniLM a rank-M/4 S
    shares only 44 % (Jaccard, mean over the 37 matrices) of the exact 1 % selection, rank M/2
    72 % (``benchmarks/results_select.md``). Half the spectrum is the smallest rank that keeps
    most of the selection.
    """
    m = min(rows, cols)
    return max(min(64, m), m // 2)


def randomized_svd(
    W: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-q randomized SVD (range finder with power iterations, Halko–Martinsson–Tropp 2011).

    Parameters
    ----------
    W : Tensor, shape (m, n)
        Floating-point matrix.
    rank : int
        Number q of singular triplets returned, ``1 <= q <= min(m, n)``.
    oversample : int
        Extra random directions ``p`` in the sketch (the sketch has ``q + p`` columns).
    n_iter : int
        Power iterations; each sharpens the captured subspace for slowly decaying spectra.
    seed : int
        Seed of the Gaussian test matrix; the result is deterministic for a given seed.

    Returns
    -------
    U : Tensor, shape (m, q)
    sigma : Tensor, shape (q,)
        Descending.
    V : Tensor, shape (n, q)
        Right singular vectors as columns (``W ≈ U diag(sigma) Vᵀ``).
    """
    m, n = W.shape
    q = int(rank)
    if not 1 <= q <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    width = min(q + max(int(oversample), 0), min(m, n))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, width, generator=gen, dtype=W.dtype).to(W.device)
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(int(n_iter)):
        Q = torch.linalg.qr(W.mT @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    B = Q.mT @ W  # (width, n)
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :q], s[:q], Vh[:q].mT


def _resolve_method(method: str, rows: int, cols: int) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "randomized" if min(rows, cols) >= AUTO_RANDOMIZED_MIN_DIM else "exact"
    return method


def _gram_relevance(W: torch.Tensor, q: int, total: float) -> tuple[torch.Tensor, float]:
    """Exact S from the eigenvectors of the smaller Gram matrix.

    With ``W = U diag(σ) Vᵀ`` we have ``σ_k u_k = W v_k``, hence ``S = |W V| |V|ᵀ``: only the right
    singular vectors are needed, and they are the eigenvectors of ``WᵀW`` (the side with fewer
    columns; ``S(Wᵀ) = S(W)ᵀ`` handles the other). There is no division by σ, so rank-deficient
    matrices are handled exactly. In float64 this agrees with the SVD formula to ~1e-13 relative
    on the MiniLM matrices and is 2–5x faster than ``torch.linalg.svd`` on two CPU cores.
    """
    flip = W.shape[0] < W.shape[1]
    A = W.mT if flip else W
    _, V = torch.linalg.eigh(A.mT @ A)  # ascending eigenvalues
    V = V[:, V.shape[1] - q :]
    AV = A @ V
    energy = 1.0 if q == V.shape[0] else min(float(AV.square().sum()) / total, 1.0)
    S = AV.abs_() @ V.abs_().mT  # in place: one matrix-sized temporary fewer
    return (S.mT if flip else S), energy


def relevance_2d(
    W: torch.Tensor,
    *,
    rank: int | None = None,
    method: str = "exact",
    seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """Relevance ``S = |U| diag(σ) |V|ᵀ`` of one matrix, and the spectral energy captured.

    Parameters
    ----------
    W : Tensor, shape (m, n)
        Finite floating-point matrix; computed in ``W``'s dtype (pass float64 for exactness).
    rank : int or None
        Keep the ``q`` largest singular triplets. ``None``: all of them for ``exact``,
        :func:`default_rank` for ``randomized``. Clipped to ``min(m, n)``.
    method : {"exact", "randomized", "auto"}
        ``exact``: the full spectrum (eigenvectors of the smaller Gram matrix,
        ``S = |W V| |V|ᵀ``, equal to the SVD formula), truncated to ``rank`` if given.
        ``randomized``: :func:`randomized_svd`. ``auto``: randomized when
        ``min(m, n) >= AUTO_RANDOMIZED_MIN_DIM``, else exact.
    seed : int
        Seed of the randomized sketch.

    Returns
    -------
    S : Tensor, shape (m, n)
        Non-negative; ``S >= |W|`` elementwise when all triplets are kept.
    energy : float
        ``Σ_{k≤q} σ_k² / ‖W‖_F²`` (1.0 for the full SVD, 1.0 for an all-zero ``W``).
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    m, n = W.shape
    full = min(m, n)
    how = _resolve_method(method, m, n)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        q = min(int(rank), full)
    else:
        q = full if how == "exact" else default_rank(m, n)
    total = float((W * W).sum())
    if full == 0 or total == 0.0:
        return torch.zeros_like(W), 1.0
    if how == "exact":
        return _gram_relevance(W, q, total)
    U, s, V = randomized_svd(W, q, seed=seed)
    S = (U.abs() * s) @ V.abs().mT
    energy = min(float((s * s).sum()) / total, 1.0)
    return S, energy


def as_matrix(W: Any, name: str = "W") -> torch.Tensor:
    """2-D float64 view of a weight (conv2d (out, in, kh, kw) -> (out, in·kh·kw)); checks finiteness."""
    t = torch.as_tensor(W).detach()
    if t.dim() not in (2, 4):
        raise ValueError(
            f"{name}: expected a 2-D matrix or a 4-D conv weight (out, in, kh, kw), got shape {tuple(t.shape)}"
        )
    if t.is_complex():
        raise ValueError(f"{name}: complex weights are not supported")
    t = t.to(torch.float64).reshape(t.shape[0], -1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: weights contain NaN or Inf; FROG relevance is undefined")
    return t


def relevance(
    W: Any,
    *,
    rank: int | None = None,
    method: str = "exact",
    return_energy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """FROG relevance ``S = |U| diag(σ) |V|ᵀ`` of a weight (REFERENCE §3.1), in float64.

    Parameters
    ----------
    W : Tensor or array-like, shape (m, n) or (out, in, kh, kw)
        A weight matrix (any orientation: ``S(Wᵀ) = S(W)ᵀ``, so Hugging Face ``Conv1D`` weights
        stored (in, out) need no transpose) or a conv2d kernel, scored as ``W.reshape(out, in·kh·kw)``.
    rank : int, optional
        Keep the ``q`` largest singular triplets (default: all for ``exact``,
        :func:`~frogwatch.frog.scores.default_rank` for ``randomized``).
    method : {"exact", "randomized", "auto"}
        ``auto`` uses the randomized SVD when ``min(m, n) >= 4096``
        (:data:`~frogwatch.frog.scores.AUTO_RANDOMIZED_MIN_DIM`).
    return_energy : bool
        Also return the captured spectral energy ``Σ_{k≤q} σ_k² / ‖W‖_F²``.

    Returns
    -------
    S : Tensor of float64, same shape as ``W``
        ``S >= |W|`` elementwise for the full SVD.
    energy : float
        Only with ``return_energy=True``.
    """
    shape = tuple(torch.as_tensor(W).shape)
    S, energy = relevance_2d(as_matrix(W), rank=rank, method=method)
    S = S.reshape(shape)
    return (S, energy) if return_energy else S


def matrix_importance(norms: Sequence[float] | np.ndarray) -> np.ndarray:
    """Frobenius importance ``R_i = ‖W_i‖_F / Σ_j ‖W_j‖_F``.

    Parameters
    ----------
    norms : array-like, shape (n_matrices,)
        Non-negative Frobenius norms.

    Returns
    -------
    ndarray of float64, shape (n_matrices,)
        Sums to 1; uniform when every norm is zero.
    """
    a = np.asarray(norms, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("norms must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("norms must be finite and non-negative")
    total = a.sum()
    return a / total if total > 0 else np.full(a.shape, 1.0 / a.size)


def alpha_multipliers(
    alphas: Sequence[float] | np.ndarray,
    blend: float,
    direction: str = "undertrained-first",
) -> np.ndarray:
    """Per-layer multiplier ``m_i = m(α_i)`` of the blended FROG score (REFERENCE §4).

    The finite α of the targeted layers are mapped linearly onto ``[1 - λ, 1 + λ]`` over their own
    range (AlphaPruning's linear α → layer-ratio map, centred on 1)::

        t_i = (α_i - min α) / (max α - min α)            in [0, 1]
        m_i = 1 - λ + 2 λ t_i     (undertrained-first: larger α, more budget)
        m_i = 1 + λ - 2 λ t_i     (overtrained-first:  smaller α, more budget)

    A layer whose fit failed (α NaN or ±inf) gets ``m = 1``, the value of the middle of the range,
    so it is neither favoured nor penalised. When all finite α are equal, every ``m = 1``.
    ``λ = 0`` gives ``m = 1`` everywhere (plain FROG). The map is bounded, so ``m_i >= 0``; at
    ``λ = 1`` the layer at the disfavoured end gets ``m = 0`` (no budget), as in AlphaPruning.

    Parameters
    ----------
    alphas : array-like, shape (n_layers,)
        Power-law exponents; NaN marks a failed fit.
    blend : float
        Strength ``λ`` in ``[0, 1]``.
    direction : {"undertrained-first", "overtrained-first"}

    Returns
    -------
    ndarray of float64, shape (n_layers,)
    """
    lam = check_blend(blend)
    check_direction(direction)
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    m = np.ones(a.shape, dtype=np.float64)
    ok = np.isfinite(a)
    if lam == 0.0 or ok.sum() < 2:
        return m
    lo, hi = a[ok].min(), a[ok].max()
    if hi <= lo:
        return m
    t = (a[ok] - lo) / (hi - lo)
    if direction == "overtrained-first":
        t = 1.0 - t
    m[ok] = 1.0 - lam + 2.0 * lam * t
    return m


def check_blend(blend: float) -> float:
    """Validate the blend strength λ; returns it as a float."""
    if isinstance(blend, bool) or not isinstance(blend, (int, float, np.integer, np.floating)):
        raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")
    lam = float(blend)
    if not (0.0 <= lam <= 1.0) or math.isnan(lam):
        raise ValueError(f"blend must be in [0, 1] (0 = plain FROG), got {blend!r}")
    return lam


def check_direction(direction: str) -> str:
    """Validate the α direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def alpha_lookup(alpha: object, names: Sequence[str]) -> np.ndarray:
    """α for each name from an ``analyze`` DataFrame or a ``{name: alpha}`` mapping.

    A DataFrame needs columns ``name`` and ``alpha``; rows with ``status != "success"`` (when a
    ``status`` column exists) count as failed. Names absent from the table get NaN (neutral).

    Raises
    ------
    ValueError
        If the table has the wrong form, or none of ``names`` is in it (a naming mismatch).
    """
    import pandas as pd

    from ..handoff import check_table

    if isinstance(alpha, pd.DataFrame):
        check_table(alpha, "alpha_lookup", ("name", "alpha"), name="alpha")
        vals = pd.to_numeric(alpha["alpha"], errors="coerce").astype(float)
        if "status" in alpha.columns:
            vals = vals.where(alpha["status"].astype(str) == "success")
        table = dict(zip(alpha["name"].astype(str), vals))
    elif isinstance(alpha, Mapping):
        table = {}
        for k, v in alpha.items():
            try:
                table[str(k)] = float(v) if v is not None else math.nan
            except (TypeError, ValueError):
                raise ValueError(f"alpha for {k!r} is not a number: {v!r}") from None
    else:
        raise ValueError(
            f"alpha must be a DataFrame from frogwatch.analyze or a dict name -> alpha, "
            f"got {type(alpha).__name__}"
        )
    if names and not any(n in table for n in names):
        raise ValueError(
            f"none of the {len(names)} targeted matrices is in the alpha table "
            f"(targets e.g. {list(names)[:3]}, table e.g. {list(table)[:3]}); "
            "compute alpha with frogwatch.analyze on the same model"
        )
    return np.array([table.get(n, math.nan) for n in names], dtype=np.float64)
