"""Layer-importance charts of a FROG selection (seed §9 and §10).

Every function returns a :class:`matplotlib.figure.Figure` drawn on the Agg canvas; nothing is
shown and no pyplot state is touched. Save with ``fig.savefig(path)``.

Values plotted (``value=``):

* ``"importance"``: seed §9 matrix score, the share ``R_i · m_i / Σ R_j · m_j`` that set the budget;
* ``"selected_score_sum"``: seed §10 layer importance, Σ S over the matrix's selected weights;
* ``"k"``: number of selected weights;
* ``"auto"``: §10 for a global selection, §9 otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .layers import block_prefix

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .frog.masks import Masks

__all__ = [
    "block_of",
    "plot_block_importance",
    "plot_importance",
    "plot_matrix_importance",
    "plot_strategy_comparison",
]

_LABELS = {
    "importance": "matrix score R·m (seed §9)",
    "selected_score_sum": "Σ S of selected weights (seed §10)",
    "k": "selected weights k",
}


def block_of(name: str) -> str:
    """Transformer block of a qualified name (``encoder.layer.3.attention.self.query`` ->
    ``encoder.layer.3``, :func:`frogwatch.layers.block_prefix`); names outside any numbered block
    are their own group."""
    return block_prefix(name) or name


def _value(masks: "Masks", value: str) -> str:
    if value == "auto":
        return "selected_score_sum" if masks.meta.get("strategy") == "global" else "importance"
    if value not in _LABELS:
        raise ValueError(f"value must be 'auto' or one of {tuple(_LABELS)}, got {value!r}")
    return value


def _by_block(df: pd.DataFrame, column: str) -> pd.Series:
    blocks = df["name"].map(block_of)
    return df[column].groupby(blocks, sort=False).sum()


def _new_figure(rows: int = 1, width: float = 10.0, height: float = 3.6) -> tuple[Figure, list["Axes"]]:
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _short(name: str) -> str:
    """Tick label: block number plus the path inside the block (``3.attention.self.query``)."""
    block = block_of(name)
    if block != name:
        return f"{block.rsplit('.', 1)[-1]}.{name[len(block) + 1:]}"
    parts = name.split(".")
    return ".".join(parts[-2:])


def _bars(ax: "Axes", labels: list[str], heights: np.ndarray, ylabel: str, title: str) -> None:
    x = np.arange(len(labels))
    ax.bar(x, heights, color="tab:green")
    ax.set_xticks(x, labels, rotation=90, fontsize=6 if len(labels) > 30 else 8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def _title(masks: "Masks") -> str:
    m = masks.meta
    return (
        f"FROG {m.get('strategy')} selection, budget {m.get('budget')}, "
        f"blend {m.get('blend')} ({m.get('direction')})"
    )


def plot_matrix_importance(masks: "Masks", *, value: str = "auto", ax: "Axes | None" = None) -> Figure:
    """Bar per targeted matrix, in model order (seed §9: x = layer, y = its score)."""
    column = _value(masks, value)
    df = masks.summary()
    fig, (ax,) = _new_figure() if ax is None else (ax.figure, [ax])
    _bars(ax, [_short(n) for n in df["name"]], df[column].to_numpy(float), _LABELS[column], _title(masks))
    return fig


def plot_block_importance(masks: "Masks", *, value: str = "auto", ax: "Axes | None" = None) -> Figure:
    """Bar per transformer block: the matrices' values summed (see :func:`block_of`)."""
    column = _value(masks, value)
    s = _by_block(masks.summary(), column)
    fig, (ax,) = _new_figure() if ax is None else (ax.figure, [ax])
    _bars(ax, list(s.index), s.to_numpy(float), _LABELS[column], "summed per block — " + _title(masks))
    return fig


def plot_importance(masks: "Masks", *, value: str = "auto") -> Figure:
    """Per-matrix bars above per-block bars; the figure ``frogwatch select --plot`` writes."""
    fig, (top, bottom) = _new_figure(rows=2)
    plot_matrix_importance(masks, value=value, ax=top)
    plot_block_importance(masks, value=value, ax=bottom)
    return fig


def plot_strategy_comparison(per_matrix: "Masks", global_: "Masks", *, by: str = "matrix") -> Figure:
    """Per-matrix and global selection side by side, as shares of their totals.

    Top panel: layer importance — §9 matrix score of the per-matrix selection beside the §10 sum of
    selected scores of the global one, each normalised to sum to 1. Bottom panel: share of the
    trainable weights each matrix (or block, ``by="block"``) receives.
    """
    if by not in ("matrix", "block"):
        raise ValueError(f"by must be 'matrix' or 'block', got {by!r}")
    a, b = per_matrix.summary(), global_.summary()
    if list(a["name"]) != list(b["name"]):
        raise ValueError("the two selections target different matrices; select both on the same model and targets")

    def series(df: pd.DataFrame, column: str) -> pd.Series:
        s = _by_block(df, column) if by == "block" else df.set_index("name")[column]
        total = s.sum()
        return s / total if total > 0 else s

    fig, axes = _new_figure(rows=2)
    panels = [
        ("share of layer importance\n(§9 score | §10 Σ selected S)", series(a, "importance"), series(b, "selected_score_sum")),
        ("share of trainable weights", series(a, "k"), series(b, "k")),
    ]
    for ax, (ylabel, left, right) in zip(axes, panels):
        x = np.arange(len(left))
        ax.bar(x - 0.2, left.to_numpy(float), width=0.4, label="per-matrix selection", color="tab:green")
        ax.bar(x + 0.2, right.to_numpy(float), width=0.4, label="global selection", color="tab:blue")
        labels = list(left.index) if by == "block" else [_short(n) for n in left.index]
        ax.set_xticks(x, labels, rotation=90, fontsize=6 if len(labels) > 30 else 8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].set_title(
        f"per-matrix vs global FROG selection, budget {per_matrix.meta.get('budget')} (by {by})", fontsize=10
    )
    return fig
