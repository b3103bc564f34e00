"""The fine-tuning benchmark's ``default`` method is exactly ``frogwatch.select`` + ``frogwatch.prepare``
with their defaults (benchmarks/finetune/methods.py; BENCHMARKS.md §10 reports it under that name)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

import frogwatch
from frogwatch.frog.config import FrogConfig
from frogwatch.frog.layer import state_of

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune"


def _methods():
    sys.path.insert(0, str(BENCH))
    try:
        import methods
        from train import Problem
    finally:
        sys.path.remove(str(BENCH))
    return methods, Problem


def _problem(Problem):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 4))
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return Problem(task="toy", model=model, targets=targets, train_batch=lambda g: None, loss=lambda m, b: None,
                   evaluate=lambda m: {}, higher_is_better=True, steps=0, lr_grid={})


def test_benchmark_default_is_select_and_prepare_with_their_defaults():
    methods, Problem = _methods()
    problem = _problem(Problem)
    want_masks = frogwatch.select(problem.model, 0.1, progress=False)
    for seed in (0, 3):  # the run seed must not leak into the package's defaults
        assert methods.METHODS["default"].masks(problem, 0.1, seed) == want_masks
        got, trainable, _ = methods.METHODS["default"].attach(copy.deepcopy(problem.model), problem, 0.1, seed)
        want = frogwatch.prepare(copy.deepcopy(problem.model), want_masks)
        assert trainable == want_masks.n_selected
        assert state_of(got).config == state_of(want).config == FrogConfig()
        got_p, want_p = dict(got.named_parameters()), dict(want.named_parameters())
        assert got_p.keys() == want_p.keys()
        for name in want_p:
            torch.testing.assert_close(got_p[name], want_p[name], rtol=0, atol=0)
