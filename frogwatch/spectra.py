"""Layer matrices -> eigenvalue spectra (ESDs).

The eigenvalues of ``X = W^T W`` are the squared singular values of ``W``. frogwatch gets them from
the smaller Gram matrix (M x M) with a symmetric eigensolver, in float64: about 3-4x less work than
the full SVD that WeightWatcher runs, with the same eigenvalues to ~1e-12 relative to the largest
(see BENCHMARKS.md). On the CPU the Gram matrix is built blockwise by symmetric rank-k updates
straight from the stored dtype (never a whole float64 copy; float32 accumulation for bf16/fp16
weights) and large ones are solved by LAPACK's two-stage eigensolver. ``method="svd"`` runs the
SVD instead. A torch ``device`` (CUDA, or ``"cpu"`` for the same code on the CPU) runs the Gram
matrix and ``eigvalsh`` in torch in float64; a missing CUDA falls back to the CPU with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .sources import LayerMatrix

__all__ = [
    "Spectrum", "esd_matrices", "eigenvalues", "spectrum", "resolve_device", "gram_cpu",
    "eigvalsh_cpu", "gram_dtype", "all_finite",
]  # fmt: skip

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
    """``None`` (numpy/LAPACK on the CPU) or the torch device to compute on.

    ``"cpu"`` selects the torch path on the CPU (the code a GPU runs; slower than ``None``). A
    missing CUDA falls back to ``None`` with a warning.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("device='cuda' requested but CUDA is not available; using the CPU", stacklevel=3)
        return None
    return dev


# --------------------------------------------------------------------------------------------
# CPU floor: Gram matrix by symmetric rank-k updates, eigenvalues only
# --------------------------------------------------------------------------------------------

BLOCK_BYTES = 16 * 2**20  # one converted block of rows; the whole matrix is never copied to fp64
TWO_STAGE_MIN_M = 3072  # two-stage tridiagonalisation wins from here (BENCHMARKS.md §9)
LOW_PRECISION = (torch.bfloat16, torch.float16)
EPS64 = float(np.finfo(np.float64).eps)


def gram_dtype(W: torch.Tensor | np.ndarray) -> np.dtype:
    """Precision of the Gram matrix for ``W``: float32 for bf16/fp16 weights, else float64.

    The products of two bf16/fp16 numbers are exact in float32; only the accumulation rounds,
    which moves alpha by < 0.01 (tests/test_llm_scale.py) and halves the Gram matrix's cost. The
    round-off (~1e-7 lambda_max) hides singular values below ~3e-4 sigma_max: for those, rank and
    sv_min need ``method="svd"``.
    """
    if isinstance(W, torch.Tensor) and W.dtype in LOW_PRECISION:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def gram_cpu(W: torch.Tensor | np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """Upper triangle of the smaller Gram matrix ``A^T A`` (M x M, Fortran order).

    ``A`` is ``W`` or ``W^T``, whichever is tall. Rows of ``A`` are converted ``BLOCK_BYTES`` at
    a time and added by a symmetric rank-k update (``?syrk``: half a GEMM's work), so a bf16
    matrix is never copied whole to float64. A float64 ``W`` is used in place.

    Parameters
    ----------
    W : (rows, cols) tensor or array, any real floating dtype
    dtype : float32 or float64, optional
        Precision of the accumulation; default :func:`gram_dtype`.

    Returns
    -------
    (M, M) float64 array, M = min(rows, cols); only the upper triangle is set.
    """
    from scipy.linalg import blas

    dtype = np.dtype(dtype or gram_dtype(W))
    syrk = blas.dsyrk if dtype == np.float64 else blas.ssyrk
    rows, cols = W.shape
    M = min(rows, cols)
    G = np.zeros((M, M), dtype=dtype, order="F")
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    W = W.detach()
    if W.device.type != "cpu":
        W = W.cpu()
    if W.dtype == torch.float64 and dtype == np.float64 and (W.is_contiguous() or W.T.is_contiguous()):
        a = W.numpy()
        if rows >= cols:  # G = a^T a
            G = syrk(1.0, a.T, trans=0, c=G, beta=0.0, overwrite_c=1) if a.flags.c_contiguous else \
                syrk(1.0, a, trans=1, c=G, beta=0.0, overwrite_c=1)
        else:  # G = a a^T
            G = syrk(1.0, a.T, trans=1, c=G, beta=0.0, overwrite_c=1) if a.flags.c_contiguous else \
                syrk(1.0, a, trans=0, c=G, beta=0.0, overwrite_c=1)
        return G.astype(np.float64, copy=False)
    A = W if rows >= cols else W.T  # tall: (K, M)
    K = A.shape[0]
    step = max(256, BLOCK_BYTES // (M * dtype.itemsize))
    buf = torch.empty((min(step, K), M), dtype=torch.float64 if dtype == np.float64 else torch.float32)
    for r0 in range(0, K, step):
        k = min(step, K - r0)
        b = buf[:k]
        b.copy_(A[r0 : r0 + k])  # convert + make contiguous in one pass
        G = syrk(1.0, b.numpy().T, trans=0, c=G, beta=1.0, overwrite_c=1)
    return G.astype(np.float64, order="F", copy=False)


@functools.lru_cache(maxsize=1)
def _two_stage_solver() -> Callable[[np.ndarray], np.ndarray] | None:
    """LAPACK's ``dsyevd_2stage`` (eigenvalues only) from the OpenBLAS NumPy ships, or None.

    Called through ctypes, which releases the GIL, so layers still run side by side in threads.
    """
    import glob

    candidates = [
        ("numpy.libs", "libscipy_openblas64*.so*", "scipy_LAPACKE_dsyevd_2stage64_", ctypes.c_int64),
        ("scipy.libs", "libscipy_openblas*.so*", "scipy_LAPACKE_dsyevd_2stage", ctypes.c_int32),
    ]
    for pkg, pattern, symbol, lint in candidates:
        mod = np if pkg.startswith("numpy") else __import__("scipy")
        libdir = os.path.join(os.path.dirname(os.path.dirname(mod.__file__)), pkg)
        for path in sorted(glob.glob(os.path.join(libdir, pattern))):
            try:
                fn = getattr(ctypes.CDLL(path), symbol)
            except (OSError, AttributeError):
                continue
            fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, lint, ctypes.c_void_p, lint,
                           ctypes.c_void_p]  # fmt: skip
            fn.restype = lint

            def solve(G: np.ndarray, fn=fn) -> np.ndarray:
                G = np.require(G, np.float64, ["F", "W"])
                n = G.shape[0]
                w = np.empty(n)
                info = fn(102, b"N", b"U", n, G.ctypes.data, n, w.ctypes.data)  # 102: column-major
                if info != 0:
                    raise np.linalg.LinAlgError(f"dsyevd_2stage failed (info={info})")
                return w

            return solve
    return None


def eigvalsh_cpu(G: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of a symmetric matrix given by its upper triangle; may overwrite G.

    LAPACK's two-stage tridiagonalisation (BLAS-3) for ``M >= TWO_STAGE_MIN_M`` where the
    OpenBLAS at hand has it, else ``numpy.linalg.eigvalsh`` (``dsyevd``).
    """
    if G.shape[0] >= TWO_STAGE_MIN_M:
        solve = _two_stage_solver()
        if solve is not None:
            return solve(G)
    return np.linalg.eigvalsh(G, UPLO="U")


def _gram_eigvalsh_torch(A: torch.Tensor) -> np.ndarray:
    if A.shape[0] < A.shape[1]:
        A = A.T
    G = A.T @ A
    return torch.linalg.eigvalsh(G).cpu().numpy()


def all_finite(W: torch.Tensor) -> bool:
    """Whether every entry is finite, checked a block at a time (no full-size mask or copy)."""
    flat = W.reshape(-1) if W.is_contiguous() else W.contiguous().reshape(-1)
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        if not torch.isfinite(flat[i : i + step].sum(dtype=torch.float64)):
            return False
    return True


def eigenvalues(
    W: torch.Tensor | np.ndarray, *, method: str = "gram", device: torch.device | None = None
) -> np.ndarray:
    """Eigenvalues of ``W^T W`` (squared singular values of ``W``), ascending, float64.

    Parameters
    ----------
    W : (rows, cols) tensor or array, any real floating dtype
    method : {"gram", "svd"}
        ``"gram"``: symmetric eigensolver on the smaller Gram matrix (fast). ``"svd"``: singular
        values of ``W`` squared (WeightWatcher's way; slower, better for tiny eigenvalues).
    device : torch.device, optional
        Run in torch on this device (CUDA, or ``"cpu"`` for the torch path on the CPU), in
        float64; ``None`` runs LAPACK on the CPU: the Gram matrix blockwise by ``?syrk`` (float32
        accumulation for bf16/fp16 weights, see :func:`gram_dtype`), the eigenvalues in float64.

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
        del A
    elif method == "svd":
        A = W.detach().to(torch.float64).cpu().numpy() if isinstance(W, torch.Tensor) else np.asarray(W, np.float64)
        ev = np.linalg.svd(A, compute_uv=False) ** 2
    else:
        ev = eigvalsh_cpu(gram_cpu(W))
    return np.sort(np.clip(ev, 0.0, None))


def _rank_from_evals(evals: np.ndarray, N: int, method: str, eps: float = EPS64) -> int:
    """Numerical rank.

    From singular values (``svd``): ``sv > sv_max * N * eps``, numpy's matrix_rank rule. From Gram
    eigenvalues the round-off is ``~ lambda_max * eps`` (not ``sv_max * eps``), so the same rule is
    applied to eigenvalues: ``lambda > lambda_max * N * eps``. Both agree on any matrix whose
    condition number is below ``1 / sqrt(N * eps)`` (~ 1e6). A Gram matrix accumulated in
    float32 (bf16/fp16 weights) resolves singular values only down to ~3e-4 sigma_max; below
    that rank and sv_min see round-off (``method="svd"`` resolves them).
    """
    if evals.size == 0:
        return 0
    x = np.sqrt(evals) if method == "svd" else evals
    return int(np.count_nonzero(x > x.max() * N * eps))


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
