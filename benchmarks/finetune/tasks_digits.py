"""Task 1 — digits domain shift (scikit-learn's bundled ``load_digits``, 1,797 8×8 images).

* Source domain: the images as they are (intensities scaled to [0, 1]).
* Target domain: :func:`shift` — intensities inverted (``1 - x``) and the four 4×4 quadrants of
  each image rotated one place clockwise (top-left → top-right → bottom-right → bottom-left).
* Per seed the images are split into disjoint sets: ``source_train`` (800, pretraining),
  ``target_train`` (:data:`N_TARGET_TRAIN`, fine-tuning, shifted), ``val`` (200, shifted, for the lr
  sweep) and ``test`` (the rest, 497, evaluated in both domains).
* "Pretrained" model: an MLP 64 → 128 → 128 → 10 (ReLU) trained on ``source_train`` only
  (Adam, 1,500 steps): 97 % source test accuracy, 9 % (chance) on the target domain.
* Metrics: ``target_metric`` = target-domain test accuracy; ``source_metric`` = source-domain test
  accuracy after fine-tuning (how much of the original skill is kept); ``val_metric`` = target val
  accuracy (lr selection; ties broken by val loss, reported as ``val_loss``).

Targets: the MLP's three ``nn.Linear`` weights (T = 25,856); biases are outside the budget.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from train import Problem

__all__ = ["make_problem", "shift"]

N_SOURCE_TRAIN = 800
N_TARGET_TRAIN = 300
N_VAL = 200
HIDDEN = 128
PRETRAIN_STEPS = 1500
BATCH = 32


def shift(x: torch.Tensor) -> torch.Tensor:
    """Target domain: inverted intensities, 4×4 quadrants rotated clockwise. ``x``: (n, 64) in [0, 1]."""
    img = (1.0 - x).reshape(-1, 8, 8)
    tl, tr = img[:, :4, :4], img[:, :4, 4:]
    bl, br = img[:, 4:, :4], img[:, 4:, 4:]
    top = torch.cat([bl, tl], dim=2)  # new top-left = old bottom-left, new top-right = old top-left
    bottom = torch.cat([br, tr], dim=2)  # new bottom-left = old bottom-right, new bottom-right = old top-right
    return torch.cat([top, bottom], dim=1).reshape(-1, 64)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


@lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def _accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def pretrain(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = PRETRAIN_STEPS) -> nn.Module:
    """The "pretrained" source-domain MLP (deterministic in ``seed``)."""
    torch.manual_seed(10_000 + seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(20_000 + seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_problem(seed: int, quick: bool = False) -> Problem:
    """The digits domain-shift problem for one seed."""
    X, Y = _data()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    a = N_SOURCE_TRAIN
    b = a + N_TARGET_TRAIN
    c = b + N_VAL
    src_idx, tgt_idx, val_idx, test_idx = perm[:a], perm[a:b], perm[b:c], perm[c:]
    model = pretrain(X[src_idx], Y[src_idx], seed, PRETRAIN_STEPS // 3 if quick else PRETRAIN_STEPS)

    x_tr, y_tr = shift(X[tgt_idx]), Y[tgt_idx]
    x_val, y_val = shift(X[val_idx]), Y[val_idx]
    x_te_src, y_te = X[test_idx], Y[test_idx]
    x_te_tgt = shift(x_te_src)

    def train_batch(gen: torch.Generator):
        idx = torch.randint(len(x_tr), (BATCH,), generator=gen)
        return x_tr[idx], y_tr[idx]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(m(x), y)

    def evaluate(m: nn.Module) -> dict:
        val_acc, val_loss = _accuracy_and_loss(m, x_val, y_val)
        tgt_acc, _ = _accuracy_and_loss(m, x_te_tgt, y_te)
        src_acc, _ = _accuracy_and_loss(m, x_te_src, y_te)
        return {"val_metric": val_acc, "val_loss": val_loss, "target_metric": tgt_acc, "source_metric": src_acc}

    return Problem(
        task="digits",
        model=model,
        targets=["0", "2", "4"],
        train_batch=train_batch,
        loss=loss,
        evaluate=evaluate,
        higher_is_better=True,
        steps=60 if quick else 300,
        lr_grid={"sparse": [3e-2, 1e-1, 3e-1, 1.0], "lora": [1e-2, 3e-2, 1e-1], "full": [3e-3, 1e-2, 3e-2]},
    )
