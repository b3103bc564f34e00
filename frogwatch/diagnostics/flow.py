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

Roles come from :func:`frogwatch.layers.layer_role`; the trusted-fit rule behind ``analyze``'s
``overparameterized`` column is in :mod:`frogwatch.rules` (re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import theilslopes

from .._validation import check_int
from ..handoff import check_table, source_of
from ..layers import ALPHA_HIGH, ALPHA_LOW, ROLES, block_prefix, layer_role
from ..rules import TRUST_MAX_D, TRUST_MIN_TAIL, overparameterized, trusted_fit

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

KINDS = ROLES  # deprecated name of frogwatch.layers.ROLES
layer_kind = layer_role  # deprecated name of frogwatch.layers.layer_role
TREND_SLOPE = 2.0
ERRATIC_DISPERSION = 1.0
MIN_LAYERS = 3
DEFAULT_TOP_K = 16


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
        cands = [n2 for n2, k2 in zip(names, kinds) if k2 == target and block_prefix(n2) == block_prefix(n1)]
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
    return A.T if lm.layer_type == "conv1d" else A


def _between_layers(source: Any, layer_df: pd.DataFrame, k: int) -> pd.DataFrame:
    cols = ["first", "second", "relation", "k", "d", "overlap", "baseline", "enrichment"]
    names = list(layer_df["name"])
    roles = list(layer_df["role"])
    pairs = layer_pairs(names, roles)
    if not pairs:
        return pd.DataFrame(columns=cols)
    by_name = source.by_name
    cache: dict[str, np.ndarray] = {}

    def matrix(name: str) -> np.ndarray | None:
        if name not in cache:
            lm = by_name.get(name)
            if lm is None or len(lm.shape) != 2:
                return None
            cache[name] = _as_out_in(lm, lm.load())
        return cache[name]

    kind_of = dict(zip(names, roles))
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
        Index ``"model"`` then each role present; columns ``n, share_in_range, alpha_median,
        slope, slope_low, slope_high, dispersion, verdict``.
    layers : DataFrame
        One row per layer: ``name, layer_id, role`` (:func:`frogwatch.layers.layer_role`),
        ``alpha, depth`` (normalised over the model's non-embedding layers), ``role_depth``
        (normalised within its role), ``in_range``; ``kind`` and ``kind_depth`` are deprecated
        copies of ``role`` and ``role_depth``.
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


def correlation_flow(df: pd.DataFrame, model: Any = None, *, top_k: int = DEFAULT_TOP_K) -> CorrelationFlow:
    """Correlation flow of a model from its :func:`frogwatch.analyze` table.

    Parameters
    ----------
    df : DataFrame
        Output of ``analyze`` (needs ``name``, ``layer_type``, ``alpha``; ``layer_id`` orders the
        layers when present). Embeddings are left out of the model-level statistics.
    model : optional
        The analysed model: any source ``analyze`` reads, a
        :class:`~frogwatch.sources.ResolvedSource` or ``df.attrs["frogwatch"]`` (an
        :class:`~frogwatch.handoff.Analysis`; nothing is read again). When given, roles use the stored
        shapes as a fallback and the between-layer subspace overlaps are computed.
    top_k : int
        Subspace dimension for the between-layer overlap.

    Returns
    -------
    CorrelationFlow
    """
    check_table(df, "correlation_flow")
    top_k = check_int(top_k, "top_k", "correlation_flow", low=1)
    source = source_of(model) if model is not None else None
    d = df.copy()
    if "layer_id" in d.columns:
        d = d.sort_values("layer_id", kind="stable")
    shapes = {lm.name: lm.shape for lm in source.matrices} if source is not None else {}
    roles = [layer_role(n, t, shapes.get(n)) for n, t in zip(d["name"], d["layer_type"])]
    alpha = pd.to_numeric(d["alpha"], errors="coerce")
    ok_status = d["status"] == "success" if "status" in d.columns else pd.Series(True, index=d.index)
    layers = pd.DataFrame({
        "name": d["name"].to_numpy(),
        "layer_id": d["layer_id"].to_numpy() if "layer_id" in d.columns else np.arange(len(d)),
        "role": roles,
        "alpha": alpha.where(ok_status).to_numpy(),
    })  # fmt: skip
    body = layers["role"] != "embedding"
    n_body = int(body.sum())
    layers["depth"] = np.nan
    layers.loc[body, "depth"] = np.linspace(0.0, 1.0, n_body) if n_body > 1 else 0.0
    layers["role_depth"] = np.nan
    for idx in layers.groupby("role", sort=False).groups.values():
        m = len(idx)
        layers.loc[idx, "role_depth"] = np.linspace(0.0, 1.0, m) if m > 1 else 0.0
    layers["in_range"] = (layers["alpha"] >= ALPHA_LOW) & (layers["alpha"] <= ALPHA_HIGH)
    # deprecated names of role / role_depth, kept for older code
    layers["kind"] = layers["role"]
    layers["kind_depth"] = layers["role_depth"]

    groups: dict[str, dict] = {}
    neighbour_diffs: list[np.ndarray] = []
    for role in [r for r in ROLES if r in set(layers["role"])]:
        a = layers.loc[layers["role"] == role, "alpha"].to_numpy(dtype=np.float64)
        groups[role] = flow_stats(a)
        if role != "embedding":
            fa = a[np.isfinite(a)]
            if fa.size >= 2:
                neighbour_diffs.append(np.abs(np.diff(fa)))
    pooled = float(np.median(np.concatenate(neighbour_diffs))) if neighbour_diffs else None
    model_alphas = layers.loc[body, "alpha"].to_numpy(dtype=np.float64)
    model_row = flow_stats(model_alphas, dispersion=pooled)
    table = pd.DataFrame.from_dict({"model": model_row, **groups}, orient="index")[_STAT_COLUMNS]
    table.index.name = "group"
    pairs = _between_layers(source, layers, top_k) if source is not None else None
    return CorrelationFlow(groups=table, layers=layers, pairs=pairs)
