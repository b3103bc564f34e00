"""``compare``: analyse two models and hand both tables to the comparison math.

This orchestration sits above :mod:`frogwatch.analyze`; the table math (matching layers, changes,
scale collapse against the base, the spectrum of ``dW``) is :mod:`frogwatch.diagnostics.compare`,
which imports nothing above it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ._validation import fail_type
from .analyze import analyze, check_options
from .diagnostics.compare import compare_tables
from .sources import resolve_source

__all__ = ["compare"]


def compare(base: Any, tuned: Any, *, progress: bool = False, **analyze_kwargs: Any) -> pd.DataFrame:
    """Compare two models layer by layer (matched by name).

    Parameters
    ----------
    base, tuned : model sources
        Anything :func:`frogwatch.analyze` reads (modules, state dicts, paths, or sources resolved
        by :func:`frogwatch.sources.resolve_source`), same architecture. Each is resolved once:
        its shard headers are read once for both the analysis and ``dW``.
    progress : bool
        Show analyze's progress bars.
    **analyze_kwargs
        Passed to :func:`frogwatch.analyze` for both models (``layers``, ``fit``, ``randomize``...).

    Returns
    -------
    DataFrame
        One row per matrix analysed in both models, in the base's order: ``name, layer_type,
        role`` (:func:`frogwatch.layers.layer_role`; ``kind`` is a deprecated copy), ``M, N``,
        then for each of alpha, log_norm, log_spectral_norm, alpha_weighted the ``*_base``,
        ``*_tuned`` and ``*_change`` columns, ``scale_collapse`` and the ``dW_*`` columns.
        ``attrs["summary"]``: base/tuned/change of the model-level summary;
        ``attrs["base_only"]``, ``attrs["tuned_only"]``: names found in one model only.

    Raises
    ------
    TypeError, ValueError
        A bad option (checked by ``analyze`` before any model is read), or no layer name shared
        by the two models.
    """
    # checked (and hooks made a tuple, so a generator is not used up) before any model is read
    options = check_options("compare", progress=progress, **analyze_kwargs)
    for who, source in (("base", base), ("tuned", tuned)):
        if source is None:
            raise fail_type("compare", who, "a model source", source)
    src_b, src_t = resolve_source(base), resolve_source(tuned)
    df_b = analyze(src_b, **options)
    df_t = analyze(src_t, **options)
    return compare_tables(df_b, df_t, src_b, src_t)
