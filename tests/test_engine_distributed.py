"""FROG under FSDP2 (fully_shard_frog) and under DDP through accelerate: 2 CPU processes, gloo.

Each test trains the same prepared model on two ranks (each rank half of every batch) and checks
the deltas against one process training on the whole batch, and that the base weights stay frozen.
"""

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

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def build(dtype: torch.dtype, noise: float = 0.05):
    """Same model, masks and data on every rank (seeded); bases in ``dtype``, deltas float32.

    ``noise=0``: the layers compute in place with the forward's write held for backward (the
    held write must survive FSDP2's reshard and refill of the unsharded weights).
    """
    torch.manual_seed(0)
    model = Net().to(dtype)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=g) < 0.2
             for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prepare(model, masks, init_scale=0.02, noise_scale=noise, seed=4)
    data = torch.randn(STEPS, WORLD * BATCH, 10, generator=g).to(dtype)
    target = torch.randn(STEPS, WORLD * BATCH, 4, generator=g)
    return model, data, target


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def deltas(model) -> torch.Tensor:
    return torch.cat([full(m.frog.delta.detach()).reshape(-1) for m in frog_layers(model).values()])


def train(model, opt, data, target, rank=None, backward=None):
    for x, y in zip(data, target):
        if rank is not None:
            x, y = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        (backward or torch.Tensor.backward)(loss)
        opt.step()


def _fsdp_worker(rank: int, port: int, out_dir: str, dtype: torch.dtype, noise: float) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from frogwatch.frog.distributed import fully_shard_frog

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        model, data, target = build(dtype, noise)
        w0 = {n: full(p).detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        fully_shard_frog(model, mesh=init_device_mesh("cpu", (WORLD,)))
        sharded = [n for n, p in model.named_parameters() if hasattr(p, "full_tensor")]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        train(model, opt, data, target, rank)
        d = deltas(model)
        from frogwatch.frog.io import read_delta, save_delta

        path = save_delta(model, os.path.join(out_dir, f"delta{rank}.safetensors"))  # gathers
        saved = torch.cat([t.reshape(-1) for t in read_delta(path).deltas.values()])
        assert torch.equal(saved, d)
        frozen_ok = all(torch.equal(full(p.detach()), w0[n])
                        for n, p in model.named_parameters() if n in w0)
        if rank == 0:
            torch.save({"deltas": d, "frozen_ok": frozen_ok, "n_sharded": len(sharded),
                        "n_params": len(list(model.parameters()))},
                       os.path.join(out_dir, "fsdp.pt"))
        dist.barrier()  # no rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()
    leave_worker()


def _accelerate_worker(rank: int, port: int, out_dir: str, noise: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    try:
        model, data, target = build(torch.float32, noise)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        wrapped, opt = acc.prepare(model, opt)
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
        train(wrapped, opt, data, target, rank, backward=acc.backward)
        d = deltas(acc.unwrap_model(wrapped))
        gathered = [torch.empty_like(d) for _ in range(WORLD)]
        dist.all_gather(gathered, d)
        if rank == 0:
            torch.save({"deltas": gathered}, os.path.join(out_dir, "accelerate.pt"))
        dist.barrier()
    finally:
        acc.end_training()
        if dist.is_initialized():
            dist.destroy_process_group()
    leave_worker()


def _single(dtype: torch.dtype, noise: float) -> torch.Tensor:
    model, data, target = build(dtype, noise)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    start = deltas(model)
    train(model, opt, data, target)
    assert not torch.equal(deltas(model), start)
    return deltas(model)


@pytest.mark.parametrize("dtype, noise", [(torch.float32, 0.05), (torch.bfloat16, 0.05), (torch.float32, 0.0)])
def test_fsdp2_equals_single_process(tmp_path, dtype, noise):
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(_fsdp_worker, args=(free_port(), str(tmp_path), dtype, noise), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "fsdp.pt")
    assert res["frozen_ok"]
    assert res["n_sharded"] == res["n_params"]  # every parameter (bases and deltas) is sharded
    ref = _single(dtype, noise)
    assert res["deltas"].dtype == torch.float32  # master deltas stay float32 on a bf16 model
    # fp32: only the order of the gradient sums differs; bf16: the halves' products round apart
    # (SGD, so that a rounding difference stays as small as the gradient it perturbs)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.02, atol=2e-4)
    torch.testing.assert_close(res["deltas"], ref, **tol)


@pytest.mark.parametrize("noise", [0.05, 0.0])
def test_accelerate_ddp_equals_single_process(tmp_path, noise):
    pytest.importorskip("accelerate")
    mp.spawn(_accelerate_worker, args=(free_port(), str(tmp_path), noise), nprocs=WORLD, join=True)
    ranks = torch.load(tmp_path / "accelerate.pt")["deltas"]
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], _single(torch.float32, noise), rtol=1e-4, atol=1e-6)
