"""One analysis spread over the ranks of a ``torch.distributed`` process group.

    torchrun --nproc_per_node=2 -m frogwatch analyze DIR --out OUT

or, inside a process group you initialised, ``frogwatch.analyze(model, distributed=True)``. The
matrices are shared among the ranks by their cost (``rf * M^2 * (N + M)``, largest first, greedy;
:func:`frogwatch.schedule.share_by_cost`), each rank reads and solves only its own tensors, and
the rows are exchanged with ``all_gather_object``: every rank returns the same DataFrame, equal to
one process's, and the command line writes it on rank 0 only. Backend: gloo on CPUs, nccl with one
GPU per rank (``--device cuda``).
"""

from __future__ import annotations

import os

import torch

from .schedule import share_by_cost

__all__ = ["my_share", "gather_rows", "init_from_env", "is_rank_zero"]


def _group() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "analyze: distributed=True needs an initialised torch.distributed process group; "
            "launch with torchrun or call torch.distributed.init_process_group first"
        )
    return dist.get_rank(), dist.get_world_size()


def my_share(costs: list[float]) -> list[int]:
    """Positions of the matrices this rank analyses (the same split on every rank)."""
    rank, world = _group()
    return share_by_cost(costs, world)[rank]


def gather_rows(local: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Every rank's ``{position: rows}`` merged, on every rank."""
    import torch.distributed as dist

    _, world = _group()
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict[int, list[dict]] = {}
    for part in parts:
        merged.update(part)
    return merged


def is_rank_zero() -> bool:
    """True outside a process group, or on rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun.

    nccl when ``device`` is CUDA (each rank on GPU ``LOCAL_RANK``), else gloo. Returns True when
    this call initialised the group (the caller destroys it).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True
