"""What the plots read from an ``analyze`` table: a row's spectrum recomputed as ``analyze`` did,
the fit's cut-off, and the order of the table's rows. No drawing here."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pandas as pd
import torch

from .powerlaw_fit import PowerLawFit
from .spectra import Spectrum

__all__ = ["row_spectrum", "lambda_of", "is_table_row", "row_order"]


def row_spectrum(row: pd.Series, model: Any) -> Spectrum:
    """The spectrum of the layer an ``analyze`` row describes, computed as ``analyze`` did
    (same source, scaling, method and pooling; ``row.attrs`` carries analyze's record)."""
    from .diagnostics.traps import find_layer
    from .handoff import ATTRS_KEY, Analysis
    from .spectra import esd_matrices, spectrum

    record = row.attrs.get(ATTRS_KEY) if hasattr(row, "attrs") else None
    record = record if isinstance(record, Analysis) else None
    opts = dict(record.options) if record is not None else {}
    method, pool = opts.get("method", "gram"), bool(opts.get("pool", True))
    if model is None and record is not None:
        model = record.source
    if model is None:
        raise ValueError(
            "plot_esd: the row does not carry the model it came from (a table read from a file or "
            "unpickled); pass it: plot_esd(row, model=model)"
        )
    name = str(row["name"])
    m = re.fullmatch(r"(.*)\[(\d+),(\d+)\]", name)  # an unpooled conv2d slice
    lm = find_layer(model, m.group(1) if m and not pool else name)
    W = lm.load().to(torch.float64)
    groups = esd_matrices(lm, W, pool=pool)
    if m and not pool:
        groups = [(sfx, M) for sfx, M in groups if sfx == f"[{m.group(2)},{m.group(3)}]"]
    return spectrum([M for _, M in groups], method=method)


def lambda_of(fit: Any) -> float:
    """The truncated power law's cut-off of a fit (0 for a plain power law)."""
    lam = fit.Lambda if isinstance(fit, PowerLawFit) else fit.get("Lambda", math.nan)
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        return 0.0
    return lam if math.isfinite(lam) and lam > 0 else 0.0


def is_table_row(x: Any) -> bool:
    return isinstance(x, pd.Series) and "name" in x.index and "alpha" in x.index


def row_order(df: pd.DataFrame) -> str:
    """What the table's row order is: module order for a model, name order for a file."""
    from .handoff import analysis_of

    record = analysis_of(df)
    source = record.source if record is not None else None
    if source is None:
        return "table order"
    return "natural name order of the file" if isinstance(source.model, (str, os.PathLike)) else "module order"
