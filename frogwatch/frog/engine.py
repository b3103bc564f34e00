"""Deprecated location of the FROG training engine; kept so that old imports keep working.

The engine is split the way PEFT splits a tuner:

* :mod:`frogwatch.frog.config` — :class:`FrogConfig`, the validated, serialisable settings;
* :mod:`frogwatch.frog.ops` — the sparse-delta autograd function and the compact noise amplitude;
* :mod:`frogwatch.frog.layer` — the FROG layer classes and the child module holding δ;
* :mod:`frogwatch.frog.model` — ``prepare`` / ``merge``;
* :mod:`frogwatch.frog.io` — ``save_delta`` / ``read_delta`` / ``load_delta``;
* :mod:`frogwatch.frog.distributed` — FSDP2 (``fully_shard_frog``);
* :mod:`frogwatch.frog.checkpoint` — streaming ``merge_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from .config import FrogConfig
from .io import load_delta, read_delta, save_delta
from .layer import FrogConv2d, FrogLinear, current_step, effective_weight, frog_layers, set_step
from .model import merge, parameter_counts, prepare, print_trainable_parameters

__all__ = [
    "FrogConfig",
    "FrogConv2d",
    "FrogLinear",
    "current_step",
    "effective_weight",
    "frog_layers",
    "load_delta",
    "merge",
    "parameter_counts",
    "prepare",
    "print_trainable_parameters",
    "read_delta",
    "save_delta",
    "set_step",
]


def __getattr__(name: str) -> Any:  # FrogConv1D pickled by older versions lives here
    if name == "FrogConv1D":
        from . import layer

        return layer.FrogConv1D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
