"""Layer matrices -> eigenvalue spectra (ESDs).

The eigenvalues of ``X = W^T W`` are the squared singular values of ``W``. frogwatch gets them from
the smaller Gram matrix (M x M) with a symmetric eigensolver, in float64: about 3-4x less work than
the full SVD that WeightWatcher runs, with the same eigenvalues to ~1e-12 relative to the largest
(see BENCHMARKS.md). ``method="svd"`` runs the SVD instead. A CUDA ``device`` runs the same
computation in torch on the GPU, and falls back to the CPU with a warning when CUDA is missing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .sources import LayerMatrix

__all__ = ["Spectrum", "esd_matrices", "eigenvalues", "spectrum", "resolve_device"]

CONV2D_POOLED_SCALE = math.sqrt(0.5)  # WeightWatcher's conv2d normalisation (docs/method.md#conv2d)


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of one analysed matrix (or of a pooled set of conv2d slices).

    Attributes
    ----------
    evals : (num_evals,) float64, ascending
        Squared singular values, after the conv2d scale factor.
    N, M : int
        Larger and smaller side of each matrix; ``num_evals = M * (number of pooled slices)``.
    rank : int
        Numerical rank summed over slices.
    sv_max, sv_min : float
        Largest and smallest singular value (sv_min: the largest per-slice minimum, as
        WeightWatcher reports it for pooled conv slices).
    """

    evals: np.ndarray
    N: int
    M: int
    rank: int
    sv_max: float
    sv_min: float


def esd_matrices(lm: LayerMatrix, W: torch.Tensor, pool: bool = True) -> list[tuple[str, torch.Tensor]]:
    """The 2-D matrices whose spectra describe a layer, already scaled.

    Parameters
    ----------
    lm : LayerMatrix
    W : tensor shaped ``lm.shape``
    pool : bool
        For conv2d: ``True`` pools the kh*kw slices ``W[:, :, i, j]`` into one spectrum (scaled by
        sqrt(1/2)); ``False`` returns each slice as its own matrix (scaled by sqrt(kh*kw/2)).

    Returns
    -------
    list of (suffix, matrix)
        One entry with suffix ``""`` for a pooled spectrum or a plain matrix; with ``pool=False``
        one entry per conv slice, suffix ``"[i,j]"``.
    """
    if W.dim() == 2:
        return [("", W)]
    if W.dim() != 4:
        raise ValueError(f"{lm.name}: expected a 2-D or 4-D weight, got shape {tuple(W.shape)}")
    kh, kw = W.shape[2], W.shape[3]
    if pool:
        return [("", W[:, :, i, j] * CONV2D_POOLED_SCALE) for i in range(kh) for j in range(kw)]
    scale = math.sqrt(kh * kw / 2.0)
    return [(f"[{i},{j}]", W[:, :, i, j] * scale) for i in range(kh) for j in range(kw)]


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` (numpy on the CPU) or a torch device that exists; CUDA falls back with a warning."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("device='cuda' requested but CUDA is not available; using the CPU", stacklevel=3)
        return None
    return dev


def _gram_eigvalsh_numpy(A: np.ndarray) -> np.ndarray:
    if A.shape[0] < A.shape[1]:
        A = A.T
    G = A.T @ A  # M x M, symmetric positive semi-definite
    return np.linalg.eigvalsh(G)


def _gram_eigvalsh_torch(A: torch.Tensor) -> np.ndarray:
    if A.shape[0] < A.shape[1]:
        A = A.T
    G = A.T @ A
    return torch.linalg.eigvalsh(G).cpu().numpy()


def eigenvalues(
    W: torch.Tensor | np.ndarray, *, method: str = "gram", device: torch.device | None = None
) -> np.ndarray:
    """Eigenvalues of ``W^T W`` (squared singular values of ``W``), ascending, float64.

    Parameters
    ----------
    W : (rows, cols) tensor or array
    method : {"gram", "svd"}
        ``"gram"``: symmetric eigensolver on the smaller Gram matrix (fast). ``"svd"``: singular
        values of ``W`` squared (WeightWatcher's way; slower, better for tiny eigenvalues).
    device : torch.device, optional
        Run in torch on this device (e.g. CUDA); ``None`` runs numpy on the CPU.

    Returns
    -------
    (min(rows, cols),) float64 array. Tiny negative round-off from the Gram route is clipped to 0.
    """
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    if device is not None:
        A = torch.as_tensor(W).to(device=device, dtype=torch.float64)
        if method == "svd":
            ev = torch.linalg.svdvals(A).cpu().numpy() ** 2
        else:
            ev = _gram_eigvalsh_torch(A)
    else:
        A = W.detach().to(torch.float64).cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W, np.float64)
        if method == "svd":
            ev = np.linalg.svd(A, compute_uv=False) ** 2
        else:
            ev = _gram_eigvalsh_numpy(A)
    return np.sort(np.clip(ev, 0.0, None))


def _rank_from_evals(evals: np.ndarray, N: int, method: str) -> int:
    """Numerical rank.

    From singular values (``svd``): ``sv > sv_max * N * eps``, numpy's matrix_rank rule. From Gram
    eigenvalues the round-off is ``~ lambda_max * eps`` (not ``sv_max * eps``), so the same rule is
    applied to eigenvalues: ``lambda > lambda_max * N * eps``. Both agree on any matrix whose
    condition number is below ``1 / sqrt(N * eps)`` (~ 1e6).
    """
    if evals.size == 0:
        return 0
    x = np.sqrt(evals) if method == "svd" else evals
    return int(np.count_nonzero(x > x.max() * N * np.finfo(np.float64).eps))


def spectrum(
    mats: list[torch.Tensor], *, method: str = "gram", device: torch.device | None = None
) -> Spectrum:
    """Pooled spectrum of one or more same-shaped matrices (conv2d slices, or a single matrix)."""
    parts = [eigenvalues(W, method=method, device=device) for W in mats]
    rows, cols = mats[0].shape
    N, M = max(rows, cols), min(rows, cols)
    evals = np.sort(np.concatenate(parts))
    return Spectrum(
        evals=evals,
        N=N,
        M=M,
        rank=sum(_rank_from_evals(p, N, method) for p in parts),
        sv_max=float(math.sqrt(max(p[-1] for p in parts))),
        sv_min=float(math.sqrt(max(p[0] for p in parts))),
    )
