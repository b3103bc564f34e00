"""FROG under torch DistributedDataParallel: 2 CPU processes, gloo backend."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from frogwatch.frog.layer import frog_layers
from frogwatch.frog.model import prepare
from _procs import free_port, leave_worker

WORLD, STEPS, BATCH = 2, 3, 6


def build():
    """Same model, masks and data on every rank (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=g) < 0.2
             for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prepare(model, masks, init_scale=0.02, noise_scale=0.05, seed=4)
    data = torch.randn(STEPS, WORLD * BATCH, 10, generator=g)
    target = torch.randn(STEPS, WORLD * BATCH, 4, generator=g)
    return model, data, target


def deltas(model):
    return torch.cat([m.frog_delta.detach().reshape(-1) for m in frog_layers(model).values()])


def train(model, data, target, rank=None):
    """AdamW steps; with ``rank`` set, each rank sees its own half of every batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for x, y in zip(data, target):
        if rank is not None:
            x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model, data, target = build()
        w0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        ddp = nn.parallel.DistributedDataParallel(model)
        train(ddp, data, target, rank)
        d = deltas(model)
        gathered = [torch.empty_like(d) for _ in range(WORLD)]
        dist.all_gather(gathered, d)
        frozen_ok = all(torch.equal(p, w0[n]) for n, p in model.named_parameters() if n in w0)
        torch.save({"deltas": gathered, "frozen_ok": frozen_ok},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_keeps_delta_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ranks = results[0]["deltas"]
    assert all(r["frozen_ok"] for r in results)
    assert torch.equal(ranks[0], ranks[1])  # identical across ranks, bit for bit

    # and equal to one process training on the whole batch (DDP averages the two halves' grads;
    # the noise is the same on every rank because it depends only on seed, step and layer)
    model, data, target = build()
    start = deltas(model).clone()
    train(model, data, target)
    single = deltas(model)
    assert not torch.allclose(single, start)
    torch.testing.assert_close(ranks[0], single, rtol=1e-4, atol=1e-6)
