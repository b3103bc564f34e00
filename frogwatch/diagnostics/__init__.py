"""Diagnostics beyond one alpha per layer.

* :mod:`.traps` - correlation traps (``analyze(..., randomize=True)``): shuffled-weight ESDs.
* :mod:`.mp` - Marchenko-Pastur bulk fit (``analyze(..., mp_fit=True)``): spikes, MP soft rank.
* :mod:`.flow` - correlation flow through depth, per layer kind, and between-layer subspace
  overlaps (the trusted-fit rule behind ``overparameterized`` is :mod:`frogwatch.rules`).
* :mod:`.collapse` - scale collapse, with or without a reference model.
* :mod:`.compare` - before/after comparison of two models: the table math. ``compare`` itself
  (which runs analyze) is :func:`frogwatch.comparison.compare`, re-exported here on first use.
"""

from __future__ import annotations

from .collapse import scale_collapse, scale_collapse_vs_reference
from typing import Any

from .compare import compare_summary, delta_spectrum
from .flow import (
    CorrelationFlow,
    correlation_flow,
    flow_stats,
    layer_kind,
    overparameterized,
    pair_overlap,
    subspace_overlap,
    trusted_fit,
)
from .mp import MPFit, fit_mp, mp_density, mp_fit_hook, mp_quantiles, tracy_widom_scale
from .traps import (
    correlation_traps,
    esd_distance,
    find_layer,
    layer_spectrum,
    randomize_hook,
    randomized_eigenvalues,
    shuffle_entries,
)

__all__ = [
    "compare", "compare_summary", "delta_spectrum",
    "CorrelationFlow", "correlation_flow", "flow_stats", "layer_kind", "overparameterized",
    "trusted_fit", "pair_overlap", "subspace_overlap",
    "scale_collapse", "scale_collapse_vs_reference",
    "MPFit", "fit_mp", "mp_density", "mp_quantiles", "tracy_widom_scale", "mp_fit_hook",
    "correlation_traps", "esd_distance", "randomized_eigenvalues", "shuffle_entries",
    "randomize_hook", "find_layer", "layer_spectrum",
]  # fmt: skip


def compare(base: Any, tuned: Any, **kwargs: Any) -> Any:
    """:func:`frogwatch.comparison.compare` (imported on first call: it runs analyze, which sits
    above diagnostics)."""
    from ..comparison import compare as _compare

    return _compare(base, tuned, **kwargs)
