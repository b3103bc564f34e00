"""Shared fine-tuning loop of the benchmark: one (task, method, budget, seed, lr) run.

A task module builds a :class:`Problem` (a pretrained model, its targeted matrices, data access,
a loss and an evaluation); a method (:mod:`methods`) turns a copy of the model into something that
trains only its allowed parameters; :func:`fine_tune` runs a fixed number of AdamW steps and
evaluates the merged (plain) model.

Every run is deterministic given its seed: the batch order depends on the seed only (so all methods
see the same batches for a given seed, which is what makes the paired tests paired), and the
method's own randomness (random mask, LoRA init, FROG init and noise, dropout) is seeded from it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["Problem", "RunResult", "fine_tune", "set_threads", "batch_generator"]


@dataclass
class Problem:
    """A task instance for one seed, ready to be fine-tuned by any method.

    Attributes
    ----------
    task : str
        Task name as written in the CSV (``digits``, ``planted_sparse``, ...).
    model : nn.Module
        The pretrained model. Never modified: every run deep-copies it.
    targets : list of str
        Qualified names of the targeted ``nn.Linear`` modules (the budget is a fraction of their
        weights).
    train_batch : callable(torch.Generator) -> batch
        Draws one training batch.
    loss : callable(model, batch) -> scalar Tensor
    evaluate : callable(model) -> dict
        Evaluates a plain (merged, eval-mode) model. Must return ``val_metric``, ``target_metric``
        and ``source_metric`` (NaN when the task has none) plus any task-specific extras.
    higher_is_better : bool
        Direction of ``val_metric`` / ``target_metric``.
    steps : int
        Optimizer steps per run.
    lr_grid : mapping family -> list of float
        Learning rates swept per method family (``sparse``, ``lora``, ``full``, ``head``).
    always_trainable : tuple of str
        Name prefixes of parameters every method trains in addition to its budget (a new
        classification head); they are not counted in ``trainable``.
    head_lr : float
        Learning rate of the ``always_trainable`` parameters (methods other than ``head_only``).
    cache : dict
        Per-problem memo for things methods derive from the pretrained model (α table, S).
    """

    task: str
    model: nn.Module
    targets: list[str]
    train_batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict]
    higher_is_better: bool
    steps: int
    lr_grid: Mapping[str, Sequence[float]]
    always_trainable: tuple[str, ...] = ()
    head_lr: float = 3e-3
    cache: dict = field(default_factory=dict, repr=False)

    def target_modules(self, model: nn.Module | None = None) -> dict[str, nn.Linear]:
        """The targeted modules of ``model`` (default: the pretrained one), by name."""
        modules = dict((model or self.model).named_modules())
        return {name: modules[name] for name in self.targets}

    def n_targeted(self) -> int:
        """``T``: number of weights in the targeted matrices."""
        return sum(m.weight.numel() for m in self.target_modules().values())


@dataclass
class RunResult:
    """Metrics of one run (a row of ``runs.csv``).

    ``seconds`` / ``cpu_seconds``: wall / process CPU time of setup (mask selection, ``prepare``)
    plus training, evaluation excluded. On a shared machine the CPU time is the stabler number.
    """

    lr: float
    trainable: int
    seconds: float
    cpu_seconds: float
    peak_mem_mb: float
    state_mb: float
    final_loss: float
    metrics: dict


def set_threads(n: int = 1) -> None:
    """Pin torch to ``n`` threads (small models on a shared 2-core machine run fastest on one)."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def batch_generator(seed: int) -> torch.Generator:
    """Generator of the batch order for a seed (the same for every method and lr)."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1))


# --------------------------------------------------------------------------------------------
# memory probe (Linux): peak resident set size during a run, relative to its start
# --------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _state_bytes(params: Sequence[torch.nn.Parameter], extra_buffers: Sequence[torch.Tensor]) -> int:
    """Exact bytes of trainable parameters, their gradients, AdamW's two moments, and extras."""
    p = sum(t.numel() * t.element_size() for t in params)
    return 4 * p + sum(t.numel() * t.element_size() for t in extra_buffers)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _lr_lambda(steps: int) -> Callable[[int], float]:
    """Cosine decay from the peak lr to 0 over ``steps``, with a 5 % linear warm-up."""
    warm = max(1, steps // 20)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def fine_tune(problem: Problem, method: Any, budget: float, seed: int, lr: float) -> RunResult:
    """Fine-tune a copy of ``problem.model`` with ``method`` and evaluate the merged model.

    Parameters
    ----------
    problem : Problem
    method : methods.Method
        Provides ``attach(model, problem, budget, seed) -> (model, trainable, extra_buffers)`` and
        ``finalize(model) -> plain model``.
    budget : float
        Fraction of the targeted weights (ignored by ``full`` and ``head_only``).
    seed : int
    lr : float
        Peak learning rate of the method's parameters (the head, if any, uses ``problem.head_lr``
        unless the method is ``head_only``).

    Returns
    -------
    RunResult
    """
    torch.manual_seed(seed)
    have_probe = _reset_peak()
    rss0 = _status_kb("VmRSS") if have_probe else None
    t0 = time.perf_counter()
    c0 = time.process_time()

    model = copy.deepcopy(problem.model)
    model, trainable, extra_buffers = method.attach(model, problem, budget, seed)
    head, body = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = name.removeprefix("base_model.model.")  # PEFT's wrapper prefix
        is_head = bool(problem.always_trainable) and plain.startswith(problem.always_trainable)
        (head if is_head else body).append(p)
    groups = []
    if body:
        groups.append({"params": body, "lr": lr})
    if head:
        groups.append({"params": head, "lr": lr if method.family == "head" else problem.head_lr})
    state_mb = _state_bytes(body + head, extra_buffers) / 2**20

    final_loss = math.nan
    if groups and problem.steps > 0:
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(problem.steps))
        gen = batch_generator(seed)
        model.train()
        ema = None
        for _ in range(problem.steps):
            batch = problem.train_batch(gen)
            loss = problem.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            v = float(loss.detach())
            ema = v if ema is None else 0.9 * ema + 0.1 * v
        final_loss = ema if ema is not None else math.nan

    train_seconds = time.perf_counter() - t0
    train_cpu = time.process_time() - c0
    peak = _status_kb("VmHWM") if have_probe else None
    peak_mb = (peak - rss0) / 1024 if peak is not None and rss0 is not None else math.nan

    plain_model = method.finalize(model)
    plain_model.eval()
    with torch.no_grad():
        metrics = problem.evaluate(plain_model)
    return RunResult(
        lr=lr,
        trainable=int(trainable),
        seconds=train_seconds,
        cpu_seconds=train_cpu,
        peak_mem_mb=peak_mb,
        state_mb=state_mb,
        final_loss=final_loss,
        metrics=metrics,
    )
