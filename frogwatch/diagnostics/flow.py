"""Correlation flow: how the layer quality alpha evolves through depth, per kind of layer.

Martin, Peng & Mahoney (Nature Communications 2021) read the alpha of each layer against its depth:
well-trained models hold alpha flat, around 2-4, while a steady rise with depth (VGG-like) or
erratic jumps (DenseNet-like) mark poor flow. Attention projections and MLP matrices sit in
different alpha bands, so frogwatch measures each kind of layer on its own and the model as a whole.

Per group (one kind, or the whole model), over the layers whose fit succeeded, in module order:

``n``               layers with a finite alpha
``share_in_range``  share with ``ALPHA_LOW <= alpha <= ALPHA_HIGH`` (2 and 6)
``alpha_median``    median alpha
``slope``           Theil-Sen slope of alpha against normalised depth (0 = first layer of the
                    group, 1 = last): the change of alpha over the whole depth, robust to outliers;
                    ``slope_low``/``slope_high`` its 95 % confidence interval
``dispersion``      median |alpha_i+1 - alpha_i| between neighbours; for the model, between
                    neighbours of the same kind (pooled), so the gap between the attention and MLP
                    bands is not counted as jitter
``verdict``         the first that applies:

* ``insufficient``: fewer than ``MIN_LAYERS`` (3) layers;
* ``rising`` / ``falling``: ``|slope| >= TREND_SLOPE`` (2.0: alpha drifts by half the width of
  the 2-6 band or more from the first to the last layer) and the slope's 95 % interval excludes 0
  (a steady trend, not one outlier);
* ``erratic``: ``dispersion > ERRATIC_DISPERSION`` (1.0). The standard error of a layer's alpha
  is ``(alpha - 1) / sqrt(n_tail)``, about 0.2-0.5 for typical tails, so two neighbours differing by
  more than 1 in the median is more than fit noise;
* ``flat`` otherwise.

Between-layer correlation (``model`` given): for each pair of matrices where the first's output
feeds the second's input (MLP up/gate -> down, attention value -> output, the value part of a
fused qkv -> output), the overlap of the top-``k`` singular subspaces they share:
``overlap = ||U1_k^T V2_k||_F^2 / k``, the mean squared cosine of the principal angles between the
top-k left singular vectors of the first matrix (its output space) and the top-k right singular
vectors of the second (its input space). Two random k-dimensional subspaces of the shared
dimension ``d`` give ``k / d`` on average (``baseline``); ``enrichment = overlap / baseline``.

This module also defines the trusted-fit rule behind ``analyze``'s ``overparameterized`` column.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import theilslopes

__all__ = [
    "CorrelationFlow",
    "correlation_flow",
    "flow_stats",
    "layer_kind",
    "layer_pairs",
    "subspace_overlap",
    "pair_overlap",
    "trusted_fit",
    "overparameterized",
    "KINDS",
    "ALPHA_LOW",
    "ALPHA_HIGH",
    "TREND_SLOPE",
    "ERRATIC_DISPERSION",
    "MIN_LAYERS",
    "TRUST_MIN_TAIL",
    "TRUST_MAX_D",
    "DEFAULT_TOP_K",
]

KINDS = ("query", "key", "value", "qkv", "attn_out", "mlp_up", "mlp_down", "conv", "embedding", "other")
ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0
TREND_SLOPE = 2.0
ERRATIC_DISPERSION = 1.0
MIN_LAYERS = 3
TRUST_MIN_TAIL = 10
TRUST_MAX_D = 0.15
DEFAULT_TOP_K = 16

# --------------------------------------------------------------------------------------------
# Layer kinds
# --------------------------------------------------------------------------------------------

_EMBED = re.compile(r"(embed|wte|wpe|tok_embeddings|shared$)", re.IGNORECASE)
_FUSED_QKV = {"qkv", "query_key_value", "c_attn", "in_proj", "wqkv", "qkv_proj", "qkv_lin", "to_qkv"}
_QUERY = {"q", "query", "q_proj", "q_lin", "wq", "to_q", "query_proj"}
_KEY = {"k", "key", "k_proj", "k_lin", "wk", "to_k", "key_proj"}
_VALUE = {"v", "value", "v_proj", "v_lin", "wv", "to_v", "value_proj"}
_ATTN_OUT = {"o", "o_proj", "out_proj", "out_lin", "c_proj", "dense", "wo", "proj", "to_out",
             "output", "out"}  # fmt: skip  (only inside an attention module)
_UP = {"fc1", "c_fc", "up_proj", "gate_proj", "gate_up_proj", "w1", "w3", "wi", "wi_0", "wi_1",
       "dense_h_to_4h", "lin1", "fc_in", "intermediate", "up", "gate"}  # fmt: skip
_DOWN = {"fc2", "down_proj", "w2", "dense_4h_to_h", "lin2", "fc_out", "down"}
_ATTN_CTX = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP_CTX = re.compile(r"(mlp|ffn|feed_forward|feedforward|densereludense|intermediate)", re.IGNORECASE)


def layer_kind(name: str, layer_type: str = "dense", shape: Sequence[int] | None = None) -> str:
    """Role of a weight matrix from its name (and, as a fallback, its shape).

    Parameters
    ----------
    name : str
        Qualified module name, e.g. ``encoder.layer.0.attention.self.query``; a trailing
        ``.weight`` is ignored.
    layer_type : str
        frogwatch's ``layer_type`` (``dense``, ``conv1d``, ``conv2d``, ``embedding``, ``rnn``).
    shape : (rows, cols), optional
        The matrix as stored: ``(out, in)`` for ``dense``, ``(in, out)`` for ``conv1d``. Used only
        when the name says nothing: a matrix widening by 2x or more is ``mlp_up``, one narrowing by
        2x or more ``mlp_down``.

    Returns
    -------
    str
        One of :data:`KINDS`.
    """
    if layer_type == "conv2d":
        return "conv"
    parts = [p for p in name.split(".") if p]
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    if layer_type == "embedding" or (parts and _EMBED.search(parts[-1])):
        return "embedding"
    if not parts:
        return "other"
    leaf = parts[-1].lower()
    parent = parts[-2].lower() if len(parts) > 1 else ""
    context = ".".join(parts[:-1])
    in_attn = bool(_ATTN_CTX.search(context))
    if leaf in _FUSED_QKV:
        return "qkv"
    if leaf in _QUERY:
        return "query"
    if leaf in _KEY:
        return "key"
    if leaf in _VALUE:
        return "value"
    if in_attn and (leaf in _ATTN_OUT or parent in ("output", "out_proj", "o")):
        return "attn_out"
    if leaf in _UP or parent == "intermediate":
        return "mlp_up"
    if leaf in _DOWN:
        return "mlp_down"
    if leaf == "wo" or (leaf == "c_proj" and _MLP_CTX.search(context)):
        return "mlp_down"
    if leaf == "dense" and parent == "output":  # BERT: layer.N.output.dense after intermediate
        return "mlp_down"
    if shape is not None and len(shape) == 2 and layer_type in ("dense", "conv1d"):
        out_dim, in_dim = (shape[0], shape[1]) if layer_type == "dense" else (shape[1], shape[0])
        if out_dim >= 2 * in_dim:
            return "mlp_up"
        if in_dim >= 2 * out_dim:
            return "mlp_down"
    return "other"


def _block_of(name: str) -> str:
    """Name prefix up to and including its first numeric component (``encoder.layer.3``)."""
    m = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
    return m.group(1) if m else ""


# --------------------------------------------------------------------------------------------
# Trusted fits and over-parameterization
# --------------------------------------------------------------------------------------------


def trusted_fit(df: pd.DataFrame) -> pd.Series:
    """Whether each layer's power-law fit is good enough to act on.

    A fit is trusted when ``status == "success"``, its tail holds at least ``TRUST_MIN_TAIL`` (10)
    eigenvalues (``num_pl_spikes``) and its Kolmogorov-Smirnov distance ``D <= TRUST_MAX_D``
    (0.15). With fewer than 10 tail eigenvalues the standard error of alpha,
    ``(alpha - 1) / sqrt(n_tail)``, exceeds 1.5 at alpha = 6, too wide to tell 6 from 8; a KS
    distance above 0.15 means the tail is not a power law (all of MiniLM's fits have D < 0.14).
    """
    _require(df, ("status", "num_pl_spikes", "D"), "trusted_fit")
    return (
        (df["status"] == "success")
        & (pd.to_numeric(df["num_pl_spikes"], errors="coerce") >= TRUST_MIN_TAIL)
        & (pd.to_numeric(df["D"], errors="coerce") <= TRUST_MAX_D)
    ).astype(bool)


def overparameterized(df: pd.DataFrame) -> pd.Series:
    """``alpha > 6`` (``ALPHA_HIGH``) with a trusted fit (:func:`trusted_fit`).

    The seed's over-parameterized layer: a spectrum too close to random for its size, a
    candidate to prune or to fine-tune more aggressively. Unlike ``warning == "under-trained"``
    it is not raised by a fit on a handful of eigenvalues or by a poor fit.
    """
    _require(df, ("alpha",), "overparameterized")
    alpha = pd.to_numeric(df["alpha"], errors="coerce")
    # a truncated power law's alpha is not on the 2-6 scale (docs/method.md#tpl)
    plain = pd.to_numeric(df["Lambda"], errors="coerce").isna() if "Lambda" in df.columns else True
    return (trusted_fit(df) & (alpha > ALPHA_HIGH) & plain).astype(bool)


def _require(df: Any, cols: Sequence[str], who: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{who}() expects the DataFrame returned by frogwatch.analyze()")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{who}(): the table lacks column(s) {missing}; pass analyze()'s output")


# --------------------------------------------------------------------------------------------
# Flow statistics
# --------------------------------------------------------------------------------------------

_STAT_COLUMNS = ["n", "share_in_range", "alpha_median", "slope", "slope_low", "slope_high",
                 "dispersion", "verdict"]  # fmt: skip


def _verdict(n: int, slope: float, lo: float, hi: float, dispersion: float) -> str:
    if n < MIN_LAYERS:
        return "insufficient"
    if abs(slope) >= TREND_SLOPE and (lo > 0 or hi < 0):
        return "rising" if slope > 0 else "falling"
    if dispersion > ERRATIC_DISPERSION:
        return "erratic"
    return "flat"


def flow_stats(alphas: Sequence[float], *, dispersion: float | None = None) -> dict:
    """Flow statistics of a sequence of alphas in depth order (NaNs are dropped).

    Parameters
    ----------
    alphas : sequence of float
        One alpha per layer, first layer first.
    dispersion : float, optional
        Use this neighbour dispersion instead of the one of ``alphas`` (the model-level
        statistic pools same-kind neighbours).

    Returns
    -------
    dict
        ``n, share_in_range, alpha_median, slope, slope_low, slope_high, dispersion, verdict``.
    """
    a = np.asarray(alphas, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    n = int(a.size)
    nan = math.nan
    out = {"n": n, "share_in_range": nan, "alpha_median": nan, "slope": nan, "slope_low": nan,
           "slope_high": nan, "dispersion": nan}  # fmt: skip
    if n:
        out["share_in_range"] = float(np.mean((a >= ALPHA_LOW) & (a <= ALPHA_HIGH)))
        out["alpha_median"] = float(np.median(a))
    if n >= 2:
        out["dispersion"] = float(np.median(np.abs(np.diff(a))))
    if dispersion is not None:
        out["dispersion"] = float(dispersion)
    if n >= MIN_LAYERS:
        depth = np.linspace(0.0, 1.0, n)
        res = theilslopes(a, depth, alpha=0.95)
        out["slope"], out["slope_low"], out["slope_high"] = (
            float(res[0]), float(res[2]), float(res[3])
        )
    out["verdict"] = _verdict(n, out["slope"], out["slope_low"], out["slope_high"], out["dispersion"])
    return out


# --------------------------------------------------------------------------------------------
# Between-layer correlation
# --------------------------------------------------------------------------------------------


def subspace_overlap(U: np.ndarray, V: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between the column spaces of U and V.

    Both must have orthonormal columns and the same number of rows; the result is
    ``||U^T V||_F^2 / min(k_U, k_V)``, in [0, 1].
    """
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != V.shape[0]:
        raise ValueError(f"U and V must be 2-D with the same number of rows, got {U.shape}, {V.shape}")
    k = min(U.shape[1], V.shape[1])
    if k < 1:
        raise ValueError("subspaces must have dimension >= 1")
    return float(np.sum((U.T @ V) ** 2) / k)


def _top_left(W: np.ndarray, k: int) -> np.ndarray:
    U, _, _ = np.linalg.svd(W, full_matrices=False)
    return U[:, :k]


def _top_right(W: np.ndarray, k: int) -> np.ndarray:
    _, _, Vt = np.linalg.svd(W, full_matrices=False)
    return Vt[:k].T


def pair_overlap(W1: np.ndarray, W2: np.ndarray, k: int = DEFAULT_TOP_K) -> dict:
    """Overlap of the top-k output space of ``W1`` with the top-k input space of ``W2``.

    Parameters
    ----------
    W1 : (d, d_in) array
        First matrix in ``(out, in)`` orientation: ``y = W1 x``.
    W2 : (d_out, d) array
        Second matrix, fed by W1's output: ``z = W2 f(y)``.
    k : int
        Subspace dimension, clipped to ``d // 2`` (and to the smaller sides of W1 and W2).

    Returns
    -------
    dict
        ``k, d, overlap, baseline (= k/d), enrichment (= overlap / baseline)``.
    """
    W1 = np.asarray(W1, dtype=np.float64)
    W2 = np.asarray(W2, dtype=np.float64)
    if W1.ndim != 2 or W2.ndim != 2:
        raise ValueError("W1 and W2 must be 2-D")
    d = W1.shape[0]
    if W2.shape[1] != d:
        raise ValueError(f"W1's output dimension {d} does not match W2's input {W2.shape[1]}")
    k = int(min(k, d // 2, min(W1.shape), min(W2.shape)))
    if k < 1:
        raise ValueError(f"matrices too small for a subspace overlap (shared dimension {d})")
    ov = subspace_overlap(_top_left(W1, k), _top_right(W2, k))
    base = k / d
    return {"k": k, "d": d, "overlap": ov, "baseline": base, "enrichment": ov / base}


_FEEDS = {"mlp_up": "mlp_down", "value": "attn_out", "qkv": "attn_out"}


def _common_depth(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def layer_pairs(names: Sequence[str], kinds: Sequence[str]) -> list[tuple[str, str]]:
    """(first, second) name pairs where the first's output feeds the second's input.

    Within one block (same name prefix up to the first number), each ``mlp_up`` is paired with the
    ``mlp_down``, and each ``value`` (or fused ``qkv``) with the ``attn_out``, that shares the
    longest dotted name prefix with it; ties leave the layer unpaired.
    """
    if len(names) != len(kinds):
        raise ValueError("names and kinds must have the same length")
    pairs = []
    for n1, k1 in zip(names, kinds):
        target = _FEEDS.get(k1)
        if target is None:
            continue
        cands = [n2 for n2, k2 in zip(names, kinds) if k2 == target and _block_of(n2) == _block_of(n1)]
        if not cands:
            continue
        depths = [_common_depth(n1, n2) for n2 in cands]
        best = max(depths)
        winners = [c for c, dep in zip(cands, depths) if dep == best]
        if best > 0 and len(winners) == 1:
            pairs.append((n1, winners[0]))
    return pairs


def _as_out_in(lm: Any, W: torch.Tensor) -> np.ndarray:
    A = W.detach().to("cpu", torch.float64).numpy()
    return A.T if lm.kind == "conv1d" else A


def _between_layers(model: Any, layer_df: pd.DataFrame, k: int) -> pd.DataFrame:
    from ..sources import layer_matrices

    cols = ["first", "second", "relation", "k", "d", "overlap", "baseline", "enrichment"]
    names = list(layer_df["name"])
    kinds = list(layer_df["kind"])
    pairs = layer_pairs(names, kinds)
    if not pairs:
        return pd.DataFrame(columns=cols)
    by_name = {lm.name: lm for lm in layer_matrices(model)}
    cache: dict[str, np.ndarray] = {}

    def matrix(name: str) -> np.ndarray | None:
        if name not in cache:
            lm = by_name.get(name)
            if lm is None or len(lm.shape) != 2:
                return None
            cache[name] = _as_out_in(lm, lm.load())
        return cache[name]

    kind_of = dict(zip(names, kinds))
    rows = []
    for n1, n2 in pairs:
        W1, W2 = matrix(n1), matrix(n2)
        if W1 is None or W2 is None:
            continue
        if kind_of[n1] == "qkv":  # fused (q; k; v) rows: keep the value third
            if W1.shape[0] != 3 * W1.shape[1]:
                continue
            d = W1.shape[1]
            W1 = W1[2 * d :]
        if W1.shape[0] != W2.shape[1]:
            continue
        try:
            res = pair_overlap(W1, W2, k)
        except (ValueError, np.linalg.LinAlgError):
            continue
        rows.append({"first": n1, "second": n2, "relation": f"{kind_of[n1]}->{kind_of[n2]}", **res})
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------
# correlation_flow
# --------------------------------------------------------------------------------------------


@dataclass
class CorrelationFlow:
    """Result of :func:`correlation_flow`.

    Attributes
    ----------
    groups : DataFrame
        Index ``"model"`` then each kind present; columns ``n, share_in_range, alpha_median,
        slope, slope_low, slope_high, dispersion, verdict``.
    layers : DataFrame
        One row per layer: ``name, layer_id, kind, alpha, depth`` (normalised over the model's
        non-embedding layers), ``kind_depth`` (normalised within its kind), ``in_range``.
    pairs : DataFrame or None
        Between-layer subspace overlaps (``model`` given): ``first, second, relation, k, d,
        overlap, baseline, enrichment``.
    """

    groups: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame | None = None

    @property
    def verdict(self) -> str:
        """The model-level verdict."""
        return str(self.groups.loc["model", "verdict"])

    def __repr__(self) -> str:
        """A short readable summary: the verdict and one line per kind (``print(flow)``); the
        full tables are ``flow.groups``, ``flow.layers`` and ``flow.pairs``."""
        from .._format import fmt_fixed

        lines = [f"CorrelationFlow: {self.verdict} ({len(self.layers)} layers)"]
        for group, r in self.groups.iterrows():
            lines.append(
                f"  {str(group):<10} n={int(r['n']):<3} in 2..6: {fmt_fixed(r['share_in_range'], 2):>4}  "
                f"median alpha {fmt_fixed(r['alpha_median'], 2):>5}  slope {fmt_fixed(r['slope'], 2):>6}  "
                f"{r['verdict']}"
            )
        if self.pairs is not None and len(self.pairs):
            enr = self.pairs.groupby("relation")["enrichment"].median()
            desc = ", ".join(f"{k} {fmt_fixed(v, 1)}x" for k, v in enr.items())
            lines.append(f"  subspace overlap over random (median): {desc}")
        lines.append("  tables: .groups, .layers, .pairs")
        return "\n".join(lines)

    __str__ = __repr__


def correlation_flow(df: pd.DataFrame, model: Any = None, *, top_k: int = DEFAULT_TOP_K) -> CorrelationFlow:
    """Correlation flow of a model from its :func:`frogwatch.analyze` table.

    Parameters
    ----------
    df : DataFrame
        Output of ``analyze`` (needs ``name``, ``layer_type``, ``alpha``; ``layer_id`` orders the
        layers when present). Embeddings are left out of the model-level statistics.
    model : optional
        The analysed model (any source ``analyze`` reads). When given, kinds use the stored
        shapes as a fallback and the between-layer subspace overlaps are computed.
    top_k : int
        Subspace dimension for the between-layer overlap.

    Returns
    -------
    CorrelationFlow
    """
    _require(df, ("name", "layer_type", "alpha"), "correlation_flow")
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    d = df.copy()
    if "layer_id" in d.columns:
        d = d.sort_values("layer_id", kind="stable")
    shapes: dict[str, tuple] = {}
    if model is not None:
        from ..sources import layer_matrices

        shapes = {lm.name: lm.shape for lm in layer_matrices(model)}
    d["kind"] = [
        layer_kind(n, t, shapes.get(n)) for n, t in zip(d["name"], d["layer_type"])
    ]
    alpha = pd.to_numeric(d["alpha"], errors="coerce")
    ok_status = d["status"] == "success" if "status" in d.columns else pd.Series(True, index=d.index)
    d["alpha"] = alpha.where(ok_status)
    layers = pd.DataFrame({
        "name": d["name"].to_numpy(),
        "layer_id": d["layer_id"].to_numpy() if "layer_id" in d.columns else np.arange(len(d)),
        "kind": d["kind"].to_numpy(),
        "alpha": d["alpha"].to_numpy(),
    })  # fmt: skip
    body = layers["kind"] != "embedding"
    n_body = int(body.sum())
    layers["depth"] = np.nan
    layers.loc[body, "depth"] = np.linspace(0.0, 1.0, n_body) if n_body > 1 else 0.0
    layers["kind_depth"] = np.nan
    for idx in layers.groupby("kind", sort=False).groups.values():
        m = len(idx)
        layers.loc[idx, "kind_depth"] = np.linspace(0.0, 1.0, m) if m > 1 else 0.0
    layers["in_range"] = (layers["alpha"] >= ALPHA_LOW) & (layers["alpha"] <= ALPHA_HIGH)

    groups: dict[str, dict] = {}
    neighbour_diffs: list[np.ndarray] = []
    for kind in [k for k in KINDS if k in set(layers["kind"])]:
        a = layers.loc[layers["kind"] == kind, "alpha"].to_numpy(dtype=np.float64)
        groups[kind] = flow_stats(a)
        if kind != "embedding":
            fa = a[np.isfinite(a)]
            if fa.size >= 2:
                neighbour_diffs.append(np.abs(np.diff(fa)))
    pooled = float(np.median(np.concatenate(neighbour_diffs))) if neighbour_diffs else None
    model_alphas = layers.loc[body, "alpha"].to_numpy(dtype=np.float64)
    model_row = flow_stats(model_alphas, dispersion=pooled)
    table = pd.DataFrame.from_dict({"model": model_row, **groups}, orient="index")[_STAT_COLUMNS]
    table.index.name = "group"
    pairs = _between_layers(model, layers, int(top_k)) if model is not None else None
    return CorrelationFlow(groups=table, layers=layers, pairs=pairs)
