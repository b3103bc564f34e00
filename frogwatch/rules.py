"""Table-wide rules: columns and summaries computed over a whole ``analyze`` table.

``analyze`` computes each row from one matrix; the rules here look at all rows at once. They sit
below :mod:`frogwatch.analyze` (which calls them for its ``overparameterized`` and
``scale_collapse`` columns) and above :mod:`frogwatch.metrics`, so neither ``analyze`` nor
:mod:`frogwatch.diagnostics` needs the other to compute them.

Trusted fit (:func:`trusted_fit`)
    ``status == "success"``, at least ``TRUST_MIN_TAIL`` (10) tail eigenvalues
    (``num_pl_spikes``) and a Kolmogorov-Smirnov distance ``D <= TRUST_MAX_D`` (0.15). With fewer
    than 10 tail eigenvalues the standard error of alpha, ``(alpha - 1) / sqrt(n_tail)``, exceeds
    1.5 at alpha = 6, too wide to tell 6 from 8; a KS distance above 0.15 means the tail is not a
    power law (all of MiniLM's fits have D < 0.14).

Over-parameterized (:func:`overparameterized`, the ``overparameterized`` column)
    ``alpha > ALPHA_HIGH`` (6) with a trusted fit.

Scale collapse without a reference (:func:`scale_collapse`, the ``scale_collapse`` column)
    Layers are grouped by role (:func:`frogwatch.layers.layer_role`) and shape ``(N, M)``. In a
    group of at least ``MIN_GROUP`` (3) layers, a layer is collapsed when its
    ``log_spectral_norm`` is below ``median - max(COLLAPSE_MADS * 1.4826 * MAD,
    MIN_COLLAPSE_DEX)``: more than 3 robust standard deviations (the MAD scaled to a normal sigma)
    below the group's median, and at least 0.3 dex (a factor 2 in the largest eigenvalue) below
    it. The floor keeps groups of near-identical layers (fresh initialisations) from flagging
    harmless differences. Layers in smaller groups, embeddings and failed fits are never flagged.

Summary (:func:`summarize`, behind :func:`frogwatch.summary`)
    Means of ``SUMMARY_COLUMNS`` over the layers with a successful fit, embeddings left out
    unless asked for.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .handoff import check_table
from .layers import ALPHA_HIGH, layer_role

__all__ = [
    "COLLAPSE_MADS",
    "MAD_TO_SIGMA",
    "MIN_COLLAPSE_DEX",
    "MIN_GROUP",
    "SUMMARY_COLUMNS",
    "TRUST_MAX_D",
    "TRUST_MIN_TAIL",
    "collapse_threshold",
    "overparameterized",
    "scale_collapse",
    "summarize",
    "trusted_fit",
]

TRUST_MIN_TAIL = 10
TRUST_MAX_D = 0.15
COLLAPSE_MADS = 3.0
MAD_TO_SIGMA = 1.4826
MIN_COLLAPSE_DEX = 0.3
MIN_GROUP = 3

# Model-wide means (WeightWatcher's get_summary); alpha_weighted is the model's alpha-hat.
SUMMARY_COLUMNS = [
    "alpha_weighted", "alpha", "log_norm", "log_alpha_norm", "log_spectral_norm",
    "stable_rank", "mp_softrank",
]  # fmt: skip


def trusted_fit(df: pd.DataFrame) -> pd.Series:
    """Whether each layer's power-law fit is good enough to act on (see the module docstring).

    Returns
    -------
    Series of bool, aligned with ``df``.
    """
    check_table(df, "trusted_fit", ("status", "num_pl_spikes", "D"))
    return (
        (df["status"] == "success")
        & (pd.to_numeric(df["num_pl_spikes"], errors="coerce") >= TRUST_MIN_TAIL)
        & (pd.to_numeric(df["D"], errors="coerce") <= TRUST_MAX_D)
    ).astype(bool)


def overparameterized(df: pd.DataFrame) -> pd.Series:
    """``alpha > 6`` (``ALPHA_HIGH``) with a trusted fit (:func:`trusted_fit`).

    A spectrum too close to random for its size, a candidate to prune or to fine-tune more
    aggressively. Unlike ``warning == "under-trained"`` it is not raised by a fit on a handful of
    eigenvalues or by a poor fit.
    """
    check_table(df, "overparameterized", ("alpha", "status", "num_pl_spikes", "D"))
    alpha = pd.to_numeric(df["alpha"], errors="coerce")
    return (trusted_fit(df) & (alpha > ALPHA_HIGH)).astype(bool)


def collapse_threshold(values: np.ndarray) -> float:
    """The low cut-off ``median - max(3 * 1.4826 * MAD, 0.3)`` of a group's log spectral norms.

    NaN when fewer than ``MIN_GROUP`` finite values.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < MIN_GROUP:
        return float("nan")
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med)))
    return med - max(COLLAPSE_MADS * MAD_TO_SIGMA * mad, MIN_COLLAPSE_DEX)


def scale_collapse(df: pd.DataFrame) -> pd.Series:
    """Low-side outliers of ``log_spectral_norm`` among layers of the same role and shape.

    Parameters
    ----------
    df : DataFrame
        ``analyze`` output (needs ``name``, ``layer_type``, ``N``, ``M``, ``log_spectral_norm``).

    Returns
    -------
    Series of bool, aligned with ``df``.
    """
    check_table(df, "scale_collapse", ("name", "layer_type", "N", "M", "log_spectral_norm"))
    out = pd.Series(False, index=df.index, dtype=bool)
    if df.empty:
        return out
    roles = [layer_role(n, t) for n, t in zip(df["name"], df["layer_type"])]
    lsn = pd.to_numeric(df["log_spectral_norm"], errors="coerce").to_numpy(dtype=np.float64)
    keys = pd.Series(list(zip(roles, df["N"], df["M"])), index=df.index)
    for key, idx in keys.groupby(keys, sort=False).groups.items():
        if key[0] == "embedding":
            continue
        pos = df.index.get_indexer(idx)
        thr = collapse_threshold(lsn[pos])
        if np.isfinite(thr):
            out.iloc[pos] = np.isfinite(lsn[pos]) & (lsn[pos] < thr)
    return out


def summarize(df: pd.DataFrame, include_embeddings: bool = False) -> pd.Series:
    """The arithmetic of :func:`frogwatch.summary` (which validates its arguments first)."""
    use = df if include_embeddings else df[df["layer_type"] != "embedding"]
    ok = use[use["status"] == "success"]
    out = {c: float(ok[c].mean()) for c in SUMMARY_COLUMNS if c in ok.columns}
    out["num_layers"] = int(len(ok))
    out["num_failed"] = int((use["status"] != "success").sum())
    if "overparameterized" in ok.columns:
        out["overparameterized_share"] = float(ok["overparameterized"].mean()) if len(ok) else np.nan
    return pd.Series(out, name="summary")
