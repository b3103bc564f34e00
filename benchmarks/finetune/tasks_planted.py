"""Task 2 — planted deltas: recover a teacher that differs from the "pretrained" net by a known ΔW.

* "Pretrained" student: an MLP 32 → 128 → 128 → 16 (tanh) whose weights are
  ``W0 = G / √fan_in + Σ_{k≤3} s_k u_k v_kᵀ`` (Gaussian bulk plus three spikes of strength
  s = 3, 2, 1.5 times the bulk's spectral edge, so the spectrum has structure for S and α to see).
* Teacher: the same net with ``W0 + D`` in every targeted matrix, ``‖D_i‖_F = 0.3 ‖W0_i‖_F``:

  - ``planted_sparse``: D has a uniformly random support of :data:`SPARSE_DENSITY` (1 %) of the
    entries with Gaussian values — sparse and high-rank. The support is independent of W0, so
    no selection rule is favoured by construction.
  - ``planted_lowrank``: D = A Bᵀ of rank :data:`LOW_RANK` (2), Gaussian factors — dense, low rank.

* Data: x ~ N(0, I₃₂), y = teacher(x); 2,048 training, 512 validation and 4,096 test inputs.
* Metrics: ``target_metric`` = test MSE(tuned, teacher) / test MSE(untuned, teacher) — the fraction
  of the gap left (lower is better, 1 = no progress, 0 = teacher recovered). No source metric.
  Extras: ``delta_cos`` = cosine between the learned ΔW = W − W0 and the planted D (all targeted
  matrices concatenated) and ``delta_relerr`` = ‖ΔW − D‖_F / ‖D‖_F.

Targets: the three ``nn.Linear`` weights (T = 22,528); biases are identical in student and teacher.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train import Problem

__all__ = ["VARIANTS", "make_problem"]

VARIANTS = ("sparse", "lowrank")
DIMS = (32, 128, 128, 16)
SPARSE_DENSITY = 0.01
LOW_RANK = 2
DELTA_REL = 0.3
N_TRAIN, N_VAL, N_TEST = 2048, 512, 4096
BATCH = 64


def _structured_weight(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian bulk (spectral edge ≈ 1 + √(out/in)) plus three rank-one spikes."""
    W = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    edge = 1.0 + math.sqrt(out_f / in_f)
    for s in (3.0, 2.0, 1.5):
        u = F.normalize(torch.randn(out_f, generator=gen), dim=0)
        v = F.normalize(torch.randn(in_f, generator=gen), dim=0)
        W += s * edge * torch.outer(u, v)
    return W


def _planted_delta(W: torch.Tensor, variant: str, gen: torch.Generator) -> torch.Tensor:
    if variant == "sparse":
        k = max(1, round(SPARSE_DENSITY * W.numel()))
        D = torch.zeros(W.numel())
        D[torch.randperm(W.numel(), generator=gen)[:k]] = torch.randn(k, generator=gen)
        D = D.reshape(W.shape)
    elif variant == "lowrank":
        D = torch.randn(W.shape[0], LOW_RANK, generator=gen) @ torch.randn(LOW_RANK, W.shape[1], generator=gen)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return D * (DELTA_REL * W.norm() / D.norm())


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(DIMS[:-1], DIMS[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def make_problem(seed: int, quick: bool = False, variant: str = "sparse") -> Problem:
    """The planted-delta problem (``variant`` = "sparse" or "lowrank") for one seed."""
    gen = torch.Generator().manual_seed(30_000 + seed + (0 if variant == "sparse" else 500))
    student = _MLP()
    teacher = _MLP()
    names = [f"layers.{i}" for i in range(len(DIMS) - 1)]
    planted: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, s_layer, t_layer in zip(names, student.layers, teacher.layers):
            W0 = _structured_weight(s_layer.out_features, s_layer.in_features, gen)
            D = _planted_delta(W0, variant, gen)
            b = 0.1 * torch.randn(s_layer.out_features, generator=gen)
            s_layer.weight.copy_(W0)
            s_layer.bias.copy_(b)
            t_layer.weight.copy_(W0 + D)
            t_layer.bias.copy_(b)
            planted[name] = D
    student.eval()
    teacher.eval()

    x_tr = torch.randn(N_TRAIN, DIMS[0], generator=gen)
    x_val = torch.randn(N_VAL, DIMS[0], generator=gen)
    x_te = torch.randn(N_TEST, DIMS[0], generator=gen)
    with torch.no_grad():
        y_tr, y_val, y_te = teacher(x_tr), teacher(x_val), teacher(x_te)
        base_val = float(F.mse_loss(student(x_val), y_val))
        base_te = float(F.mse_loss(student(x_te), y_te))
    W0s = {n: l.weight.detach().clone() for n, l in zip(names, student.layers)}
    D_all = torch.cat([planted[n].reshape(-1) for n in names])

    def train_batch(g: torch.Generator):
        idx = torch.randint(N_TRAIN, (BATCH,), generator=g)
        return x_tr[idx], y_tr[idx]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(m(x), y)

    def evaluate(m: nn.Module) -> dict:
        mods = dict(m.named_modules())
        dW = torch.cat([(mods[n].weight.detach() - W0s[n]).reshape(-1) for n in names])
        cos = float(F.cosine_similarity(dW, D_all, dim=0)) if float(dW.norm()) > 0 else 0.0
        return {
            "val_metric": float(F.mse_loss(m(x_val), y_val)) / base_val,
            "target_metric": float(F.mse_loss(m(x_te), y_te)) / base_te,
            "source_metric": math.nan,
            "delta_cos": cos,
            "delta_relerr": float((dW - D_all).norm() / D_all.norm()),
        }

    return Problem(
        task=f"planted_{variant}",
        model=student,
        targets=names,
        train_batch=train_batch,
        loss=loss,
        evaluate=evaluate,
        higher_is_better=False,
        steps=80 if quick else 400,
        lr_grid={"sparse": [1e-2, 3e-2, 1e-1, 3e-1], "lora": [3e-3, 1e-2, 3e-2, 1e-1], "full": [3e-3, 1e-2, 3e-2]},
    )
