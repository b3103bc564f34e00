"""What an analysis will cost before it starts: time, memory, and whether a matrix fits a device.

The time model is ``seconds = rf * (g * M^2 * N + e * M^3)`` per matrix, with the Gram rate ``g``
and the eigensolver rate ``e`` measured once per process on a 512-wide matrix (about 0.1 s), on
the CPU with one BLAS thread or on the device. It is a rough guide (large matrices run BLAS more
efficiently; a busy machine runs slower), not a promise; BENCHMARKS.md §9 compares it with runs.

Memory per matrix on the CPU path: the tensor as stored, one converted block of rows, and the
M x M Gram matrix with the eigensolver's copy. On a torch device: the matrix in float64, its Gram
matrix and ``eigvalsh``'s workspace (taken as two more M x M copies).
"""

from __future__ import annotations

import functools
import time

import torch

from .schedule import num_workers
from .sources import LayerMatrix
from .spectra import BLOCK_BYTES, eigvalsh_cpu, gram_cpu

__all__ = [
    "rates", "layer_estimate", "fits_device", "device_bytes", "device_memory", "plan_estimate",
]  # fmt: skip

_DTYPE_BYTES = 2  # checkpoints are mostly bf16/fp16; a module's fp32 weights are already in memory


@functools.lru_cache(maxsize=4)
def rates(device: str | None = None) -> tuple[float, float]:
    """(seconds per M^2 N of the Gram matrix, seconds per M^3 of the eigensolver), measured."""
    n, m = 1024, 512
    W = torch.randn(n, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if device is None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            gram_cpu(W)  # warm-up
            t0 = time.perf_counter()
            G = gram_cpu(W)
            t1 = time.perf_counter()
            eigvalsh_cpu(G)
            t2 = time.perf_counter()
    else:
        dev = torch.device(device)
        A = W.to(dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        torch.linalg.eigvalsh(A.T @ A)  # warm-up
        sync()
        t0 = time.perf_counter()
        G = A.T @ A
        sync()
        t1 = time.perf_counter()
        torch.linalg.eigvalsh(G)
        sync()
        t2 = time.perf_counter()
    return (t1 - t0) / (m * m * n), (t2 - t1) / m**3


def device_bytes(lm: LayerMatrix) -> int:
    """Peak device memory of one matrix on the torch path: float64 copy + Gram + eigvalsh workspace."""
    return int((lm.size // lm.rf) * 8 + 3 * lm.M * lm.M * 8)


def layer_estimate(lm: LayerMatrix, device: str | None = None) -> tuple[float, int]:
    """(seconds, peak bytes) of analysing one matrix, on the CPU (``None``) or on ``device``."""
    g, e = rates(device)
    M, N, rf = lm.M, lm.N, lm.rf
    seconds = rf * (g * M * M * N + e * M**3)
    if device is None:
        nbytes = lm.size * _DTYPE_BYTES + min(BLOCK_BYTES, N * M * 8) + 2 * M * M * 8
    else:
        nbytes = device_bytes(lm)
    return float(seconds), int(nbytes)


def device_memory(device: str | torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None for the CPU or when CUDA is absent."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(dev).total_memory)


def fits_device(lm: LayerMatrix, device: str | torch.device, *, total: int | None = None) -> bool:
    """Whether one matrix fits the device: :func:`device_bytes` within 90 % of its memory.

    ``total``: the device's memory in bytes (default: asked from CUDA; always True on the CPU).
    """
    total = device_memory(device) if total is None else total
    return True if total is None else device_bytes(lm) <= 0.9 * total


def plan_estimate(lms: list[LayerMatrix], device: str | None = None) -> tuple[float, int]:
    """(wall seconds, peak bytes) of analysing ``lms`` the way ``analyze`` runs them.

    Wall: the summed time over the workers (one per core on the CPU, one on a device), at least
    the largest matrix. Peak: the ``workers + 1`` largest matrices in flight at once.
    """
    if not lms:
        return 0.0, 0
    est = [layer_estimate(lm, device) for lm in lms]
    w = num_workers() if device is None else 1
    wall = max(sum(s for s, _ in est) / w, max(s for s, _ in est))
    peak = sum(sorted((b for _, b in est), reverse=True)[: w + 1])
    return float(wall), int(peak)


def describe_estimate(df, lms: list[LayerMatrix], device: torch.device | None):
    """Add ``est_seconds``, ``est_memory_mb``, ``fits_device`` and ``attrs["estimate"]`` to describe's table."""
    dev = None if device is None else str(device)
    analysed = [lm for lm, ok in zip(lms, df["analyzed"]) if ok]
    est = {lm.name: layer_estimate(lm, dev) for lm in analysed}
    df["est_seconds"] = [est[n][0] if n in est else float("nan") for n in df["name"]]
    df["est_memory_mb"] = [est[n][1] / 2**20 if n in est else float("nan") for n in df["name"]]
    df["fits_device"] = [fits_device(lm, device) if device is not None else True for lm in lms]
    wall, peak = plan_estimate(analysed, dev)
    df.attrs["estimate"] = {
        "wall_seconds": wall,
        "peak_memory_mb": peak / 2**20,
        "workers": num_workers() if device is None else 1,
        "device": dev or "cpu (LAPACK)",
    }
    return df
