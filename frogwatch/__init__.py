"""frogwatch: data-free spectral diagnostics and FROG sparse fine-tuning for PyTorch models.

Diagnose: :func:`analyze` (one row per layer), :func:`summary`, :func:`describe`.
Select and fine-tune (FROG): :func:`relevance`, :func:`select`, :class:`Masks`, :func:`prepare`,
:func:`merge`.

Types: a hook ``hook(layer, matrices, spectrum, fit) -> dict`` (:data:`LayerHook`) receives a
:class:`LayerMatrix`, a list of tensors, a :class:`Spectrum` and a :class:`PowerLawFit`; ``layers=``
takes a :data:`LayerSelector`. What travels with analyze's table is an :class:`Analysis`
(``df.attrs["frogwatch"]``); :func:`resolve_source` reads a model source once.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .analyze import analyze, describe, summary
from .sources import SourceError, layer_matrices, load_default_model

# Public names that live in heavier modules, imported on first use.
_LAZY = {
    "correlation_flow": "frogwatch.diagnostics.flow",
    "compare": "frogwatch.comparison",
    "compare_summary": "frogwatch.diagnostics.compare",
    "layer_spectrum": "frogwatch.diagnostics.traps",
    "report": "frogwatch.html_report",
    "plot_esd": "frogwatch.plots",
    "plot_alpha_depth": "frogwatch.plots",
    "plot_compare": "frogwatch.plots",
    "plot_randomized_esd": "frogwatch.plots",
    "relevance": "frogwatch.frog.scores",
    "select": "frogwatch.frog.select",
    "Masks": "frogwatch.frog.masks",
    "prepare": "frogwatch.frog.model",
    "merge": "frogwatch.frog.model",
    "save_delta": "frogwatch.frog.io",
    "load_delta": "frogwatch.frog.io",
    "print_trainable_parameters": "frogwatch.frog.model",
    # FROG engine (config, delta files, distributed, streaming merge)
    "FrogConfig": "frogwatch.frog.config",
    "MaskMismatchError": "frogwatch.frog.masks",
    "read_delta": "frogwatch.frog.io",
    "merge_checkpoint": "frogwatch.frog.checkpoint",
    "fully_shard_frog": "frogwatch.frog.distributed",
    "FrogwatchCallback": "frogwatch.frog.callbacks",
    "record_layer_stats": "frogwatch.frog.callbacks",
    # layout: the vocabulary, the hand-off after analyze, the types a hook receives
    "layer_role": "frogwatch.layers",
    "block_of": "frogwatch.layers",
    "ALPHA_LOW": "frogwatch.layers",
    "ALPHA_HIGH": "frogwatch.layers",
    "Analysis": "frogwatch.handoff",
    "NotATableError": "frogwatch.handoff",
    "check_table": "frogwatch.handoff",
    "LayerMatrix": "frogwatch.sources",
    "ResolvedSource": "frogwatch.sources",
    "resolve_source": "frogwatch.sources",
    "Spectrum": "frogwatch.spectra",
    "PowerLawFit": "frogwatch.powerlaw_fit",
    "LayerHook": "frogwatch.analyze",
    "LayerSelector": "frogwatch.analyze",
    "CorrelationFlow": "frogwatch.diagnostics.flow",
    # WeightWatcher parity and beyond
    "distances": "frogwatch.model_distances",
    "svd_smoothing": "frogwatch.smoothing",
    "analyze_adapters": "frogwatch.adapters",
}

__all__ = [
    "analyze", "describe", "summary", "layer_matrices", "load_default_model", "SourceError",
    *_LAZY,
]  # fmt: skip


def __dir__() -> list[str]:
    # The public names only (lazy ones included), not the submodules and helpers in globals().
    return sorted({*__all__, "__version__"})


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'frogwatch' has no attribute {name!r}")
