"""Figures for frogwatch's diagnostics (matplotlib, headless).

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, no window,
nothing shown) and returns it; pass ``path`` ending in ``.png`` or ``.svg`` to also save it. Files
are written atomically (a temporary file moved into place).

* :func:`plot_esd` - a layer's ESD on log-log axes with its fitted power law and ``xmin``.
* :func:`plot_alpha_depth` - alpha against depth, coloured by layer kind, with the 2 and 6 bands.
* :func:`plot_compare` - alpha per layer before and after fine-tuning, and the change of the
  spectral norm with scale collapse marked.
* :func:`plot_randomized_esd` - a matrix's ESD beside the ESD of its shuffled entries, with the
  Marchenko-Pastur bulk edge and the correlation traps above it.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ._io import atomic_write_bytes
from ._validation import check_bool, check_int, fail_type
from .handoff import check_table
from .layers import ALPHA_HIGH, ALPHA_LOW, ROLES, block_of, layer_role
from .diagnostics.mp import fit_mp, mp_density
from .diagnostics.traps import layer_rng, shuffle_entries
from .plot_inputs import is_table_row, lambda_of, row_order, row_spectrum
from .powerlaw_fit import EVALS_THRESH, PowerLawFit, fit_power_law
from .spectra import Spectrum, eigenvalues

__all__ = [
    "plot_esd",
    "plot_alpha_depth",
    "plot_compare",
    "plot_randomized_esd",
    "figure_bytes",
    "KIND_COLORS",
]

KIND_COLORS = dict(
    zip(
        ROLES,
        ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#d62728", "#9467bd", "#8c564b",
         "#e377c2", "#7f7f7f", "#bcbd22"],
    )
)  # fmt: skip
_BAND_COLOR = "#2ca02c"
_FORMATS = {".png": "png", ".svg": "svg"}


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure rendered as PNG or SVG bytes."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt must be 'png' or 'svg', got {fmt!r}")
    buf = io.BytesIO()
    # no version or date in the file: the same data gives the same bytes
    meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
    fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)  # laid out by tight_layout already
    return buf.getvalue()


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fmt = _FORMATS.get(Path(path).suffix.lower())
        if fmt is None:
            raise ValueError(f"path must end in .png or .svg, got {str(path)!r}")
        atomic_write_bytes(path, figure_bytes(fig, fmt))
    return fig


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _evals_of(x: Any) -> np.ndarray:
    """Eigenvalues from an array of eigenvalues, a Spectrum, or a 2-D weight matrix."""
    if isinstance(x, Spectrum):
        return np.asarray(x.evals, dtype=np.float64)
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        return eigenvalues(a)
    if a.ndim != 1:
        raise ValueError(f"expected eigenvalues (1-D), a Spectrum or a 2-D matrix; got shape {a.shape}")
    if a.size == 0:
        raise ValueError("no eigenvalues to plot")
    if not np.isfinite(a).all():
        raise ValueError("eigenvalues contain NaN or Inf")
    return np.sort(a)


def _log_bins(x: np.ndarray, bins: int) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        lo, hi = lo / 1.5, hi * 1.5
    edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
    edges[0], edges[-1] = lo, hi  # exact ends: round-off must not drop the extreme eigenvalues
    return edges


def _log_density_bars(ax: Any, x: np.ndarray, edges: np.ndarray, color: str) -> None:
    """Histogram of ``x`` on log bins as the density of ``log10 x`` (integrates to 1 over
    decades), so narrow low bins are not inflated the way a density in ``x`` inflates them."""
    counts, _ = np.histogram(x, bins=edges)
    dens = counts / (max(x.size, 1) * np.diff(np.log10(edges)))
    ax.bar(edges[:-1], dens, width=np.diff(edges), align="edge", color=color, alpha=0.6)


def _as_matrix(W: Any) -> np.ndarray:
    if isinstance(W, torch.Tensor):
        W = W.detach().to("cpu", torch.float64).numpy()
    A = np.asarray(W, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError("the matrix contains NaN or Inf")
    return A


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def plot_esd(
    layer: Any,
    fit: PowerLawFit | Mapping | None = None,
    *,
    model: Any = None,
    title: str | None = None,
    bins: int = 60,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A layer's empirical spectral density on log-log axes, with its power-law fit.

    The histogram is the density of ``log10 λ`` (counts per logarithmic bin, normalised), so each
    bar's height is the share of eigenvalues in it per decade, whatever the bin's width; the
    fitted tail is drawn in the same units.

    Parameters
    ----------
    layer : row of ``analyze``'s table, array, Spectrum or 2-D matrix
        ``df.iloc[i]`` (or ``df.loc[...]`` with the ``name`` column): the row gives the fit, and
        the eigenvalues are recomputed exactly as ``analyze`` computed them (same scaling,
        method and pooling) from ``model`` or, when ``model`` is not given, from the source the
        table remembers (a path, or a module still alive). Otherwise: eigenvalues of ``WᵀW``
        (shape ``(n,)``), a :class:`frogwatch.spectra.Spectrum` (e.g.
        :func:`frogwatch.diagnostics.layer_spectrum`), or a weight matrix (out × in).
    fit : PowerLawFit or mapping, optional
        The fit to draw: a :class:`PowerLawFit`, or a row of ``analyze``'s table (``alpha`` and
        ``xmin``; ``D`` and ``num_pl_spikes`` when present). Default: the row given as ``layer``,
        else a plain power-law fit made here.
    model : model source, optional
        The model a table row came from (anything ``analyze`` reads).
    title : str, optional
        Default: the row's layer name, or "Empirical spectral density".
    bins : int
        Number of logarithmic histogram bins.
    path : str or Path, optional
        Save as PNG or SVG.

    Returns
    -------
    matplotlib.figure.Figure
        The tail drawn holds exactly ``num_pl_spikes`` eigenvalues when the fit gives it, so the
        legend's tail count equals the table's.
    """
    _check_args("plot_esd", title=title, path=path, bins=bins)
    if is_table_row(layer):
        if fit is None:
            fit = layer
        if title is None:
            title = str(layer["name"])
        ev = np.asarray(row_spectrum(layer, model).evals, dtype=np.float64)
    else:
        ev = _evals_of(layer)
    if fit is None:
        fit = fit_power_law(ev)
    n_tail: int | None = None
    if isinstance(fit, PowerLawFit):
        alpha, xmin, D, ok = fit.alpha, fit.xmin, fit.D, fit.status == "success"
        n_tail = fit.num_pl_spikes if ok else None
    elif isinstance(fit, (Mapping, pd.Series)):
        alpha, xmin = float(fit["alpha"]), float(fit["xmin"])
        D = float(fit.get("D", math.nan))
        ok = math.isfinite(alpha) and math.isfinite(xmin) and str(fit.get("status", "success")) == "success"
        k = fit.get("num_pl_spikes", None)
        n_tail = int(k) if ok and k is not None and math.isfinite(float(k)) and float(k) > 0 else None
    else:
        raise ValueError(f"fit must be a PowerLawFit or a mapping with alpha and xmin, got {type(fit).__name__}")
    x = ev[ev > EVALS_THRESH]
    if x.size == 0:
        raise ValueError(f"no eigenvalue above {EVALS_THRESH:g} to plot")
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    edges = _log_bins(x, bins)
    log_edges = np.log10(edges)
    counts, _ = np.histogram(x, bins=edges)
    dens = counts / (x.size * np.diff(log_edges))  # density of log10(lambda): per decade
    ax.bar(edges[:-1], dens, width=np.diff(edges), align="edge", color="#4c72b0", alpha=0.55,
           label=f"ESD ({x.size} eigenvalues)")  # fmt: skip
    if ok:
        # the tail is the top n_tail eigenvalues: the same count as the table, immune to the
        # last-bit differences of recomputed eigenvalues around xmin
        tail = x[-min(n_tail, x.size):] if n_tail else x[x >= xmin]
        frac = tail.size / x.size
        xs = np.logspace(math.log10(xmin), math.log10(x.max()), 200)
        lam = lambda_of(fit)
        if lam > 0:  # truncated power law x^-alpha exp(-lam x), normalised numerically on [xmin, inf)
            grid = np.logspace(math.log10(xmin), math.log10(xmin + 60.0 / lam), 4000)
            z = np.trapezoid(grid ** (-alpha) * np.exp(-lam * (grid - xmin)) * xmin**alpha, grid)
            pdf = (xs / xmin) ** (-alpha) * np.exp(-lam * (xs - xmin)) / z
            name = rf"truncated power law $\alpha$ = {alpha:.2f}, $\Lambda$ = {lam:.3g}"
        else:  # p(x) = (alpha-1)/xmin (x/xmin)^-alpha
            pdf = (alpha - 1.0) / xmin * (xs / xmin) ** (-alpha)
            name = rf"power law $\alpha$ = {alpha:.2f}"
        ys = frac * pdf * xs * math.log(10.0)  # as a density of log10 x
        label = name + (f", D = {D:.3f}" if math.isfinite(D) else "")
        ax.plot(xs, ys, color="#d62728", lw=2.0, label=label)
        ax.axvline(xmin, color="#d62728", ls="--", lw=1.2, label=rf"$x_{{min}}$ = {xmin:.3g} ({tail.size} in tail)")
    else:
        ax.text(0.03, 0.05, "power-law fit failed", transform=ax.transAxes, color="#d62728")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"eigenvalue $\lambda$ of $W^TW$")
    ax.set_ylabel(r"density of $\log_{10}\lambda$ (per decade)")
    ax.set_title(title or "Empirical spectral density")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    ax.grid(True, which="major", alpha=0.25)
    fig.tight_layout()
    return _finish(fig, path)


def _check_args(func: str, *, title: Any = None, path: Any = None, bins: Any = 1) -> None:
    """The arguments every plot takes, checked before anything is drawn."""
    if title is not None and not isinstance(title, str):
        raise fail_type(func, "title", "a str or None", title)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise fail_type(func, "path", "a str, os.PathLike or None", path)
    check_int(bins, "bins", func, low=1)


def _block_ticks(ax: Any, names: list[str], depth: np.ndarray) -> None:
    """Label the x axis by block (first number in the name) when the names have blocks."""
    firsts: dict[str, float] = {}
    for n, x in zip(names, depth):
        b = block_of(n)
        if b is not None and str(b) not in firsts:
            firsts[str(b)] = float(x)
    if not 2 <= len(firsts) <= 60:
        return
    ticks = list(firsts.values())
    for t in ticks[1:]:
        ax.axvline(t - 0.5, color="#cccccc", lw=0.8, zorder=0)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"block {b}" for b in firsts], rotation=0 if len(firsts) <= 12 else 90, fontsize=8)


def plot_alpha_depth(
    df: pd.DataFrame,
    *,
    title: str | None = None,
    include_embeddings: bool = False,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Alpha of each layer against its depth (the table's row order), coloured by layer kind.

    The x axis is the row order of ``analyze``'s table: module order for a module or a state
    dict, natural name order (``layer.2`` before ``layer.10``) for files; the axis label says which.

    The band 2 <= alpha <= 6 is shaded; layers flagged ``overparameterized`` are ringed in black;
    failed fits are left out.

    Parameters
    ----------
    df : DataFrame
        Output of :func:`frogwatch.analyze`.
    include_embeddings : bool
        Also plot embedding matrices (left out by default, as from the model averages).
    path : str or Path, optional
        Save as PNG or SVG.
    """
    check_table(df, "plot_alpha_depth")
    _check_args("plot_alpha_depth", title=title, path=path)
    include_embeddings = check_bool(include_embeddings, "include_embeddings", "plot_alpha_depth")
    d = df.sort_values("layer_id", kind="stable") if "layer_id" in df.columns else df
    d = d.assign(kind=[layer_role(n, t) for n, t in zip(d["name"], d["layer_type"])])
    if not include_embeddings:
        d = d[d["kind"] != "embedding"]
    d = d.assign(depth=np.arange(len(d)), alpha=pd.to_numeric(d["alpha"], errors="coerce"))
    if "status" in d.columns:
        d = d[d["status"] == "success"]
    d = d[np.isfinite(d["alpha"])]
    if d.empty:
        raise ValueError("plot_alpha_depth(): no layer with a successful fit to plot")
    fig = Figure(figsize=(8.0, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.axhspan(ALPHA_LOW, ALPHA_HIGH, color=_BAND_COLOR, alpha=0.08, lw=0)
    for y in (ALPHA_LOW, ALPHA_HIGH):
        ax.axhline(y, color=_BAND_COLOR, ls="--", lw=1.0)
    for kind in [k for k in ROLES if k in set(d["kind"])]:
        s = d[d["kind"] == kind]
        ax.plot(s["depth"], s["alpha"], "-", color=KIND_COLORS[kind], lw=0.8, alpha=0.5)
        ax.scatter(s["depth"], s["alpha"], color=KIND_COLORS[kind], s=30, label=kind, zorder=3)
    if "overparameterized" in d.columns:
        s = d[d["overparameterized"].astype(bool)]
        if len(s):
            ax.scatter(s["depth"], s["alpha"], facecolors="none", edgecolors="black", s=110,
                       lw=1.3, label=r"over-parameterized ($\alpha$>6, trusted fit)", zorder=4)  # fmt: skip
    ax.text(1.0, ALPHA_HIGH, r" $\alpha$ = 6", color=_BAND_COLOR, va="center", ha="left",
            transform=ax.get_yaxis_transform(), fontsize=8)  # fmt: skip
    ax.text(1.0, ALPHA_LOW, r" $\alpha$ = 2", color=_BAND_COLOR, va="center", ha="left",
            transform=ax.get_yaxis_transform(), fontsize=8)  # fmt: skip
    _block_ticks(ax, list(d["name"]), d["depth"].to_numpy())
    ax.set_xlabel(f"depth ({row_order(df)}" + (", embeddings excluded)" if not include_embeddings else ")"))
    ax.set_ylabel(r"power-law exponent $\alpha$")
    ax.set_ylim(0, max(ALPHA_HIGH + 1.5, float(d["alpha"].max()) * 1.08))
    ax.set_title(title or r"Correlation flow: $\alpha$ against depth")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def plot_compare(
    cmp: pd.DataFrame,
    *,
    title: str | None = None,
    base_label: str = "base",
    tuned_label: str = "tuned",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Alpha per layer before and after fine-tuning, and the change of the spectral norm.

    Top: ``alpha_base`` (open circles) and ``alpha_tuned`` (filled) joined per layer, with the
    2-6 band. Bottom: change of ``log_spectral_norm`` as a bar per layer, on a y axis scaled to
    the changes themselves (a fine-tune typically moves them by 1e-4 dex, far from the -0.3 dex
    collapse threshold, which is drawn when in range and otherwise named in the panel); layers
    flagged ``scale_collapse`` are red.

    Parameters
    ----------
    cmp : DataFrame
        Output of :func:`frogwatch.compare`.
    title : str, optional
    base_label, tuned_label : str
        Legend names of the two models.
    path : str or Path, optional
        Save as PNG or SVG.
    """
    check_table(
        cmp, "plot_compare", ("name", "alpha_base", "alpha_tuned", "log_spectral_norm_change", "scale_collapse"),
        name="cmp", producer="frogwatch.compare()",
    )  # fmt: skip
    _check_args("plot_compare", title=title, path=path)
    if cmp.empty:
        raise ValueError("plot_compare(): empty comparison")
    from .diagnostics.collapse import REFERENCE_DROP_DEX

    x = np.arange(len(cmp))
    ab = pd.to_numeric(cmp["alpha_base"], errors="coerce").to_numpy(dtype=float)
    at = pd.to_numeric(cmp["alpha_tuned"], errors="coerce").to_numpy(dtype=float)
    dl = pd.to_numeric(cmp["log_spectral_norm_change"], errors="coerce").to_numpy(dtype=float)
    col = cmp["scale_collapse"].astype(bool).to_numpy()
    fig = Figure(figsize=(9.0, 5.6))
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1.0]})
    ax.axhspan(ALPHA_LOW, ALPHA_HIGH, color=_BAND_COLOR, alpha=0.08, lw=0)
    for y in (ALPHA_LOW, ALPHA_HIGH):
        ax.axhline(y, color=_BAND_COLOR, ls="--", lw=1.0)
    ax.vlines(x, np.fmin(ab, at), np.fmax(ab, at), color="#999999", lw=1.0)
    ax.scatter(x, ab, facecolors="none", edgecolors="#1f77b4", s=28, label=base_label, zorder=3)
    ax.scatter(x, at, color="#ff7f0e", s=16, label=tuned_label, zorder=4)
    ax.set_ylabel(r"$\alpha$")
    ax.set_title(title or r"Before / after: $\alpha$ per layer")
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=2)
    ax.grid(True, alpha=0.25)
    colors = np.where(col, "#d62728", "#4c72b0")
    ax2.bar(x, dl, color=colors, width=0.8)
    ax2.axhline(0, color="black", lw=0.6)
    finite = dl[np.isfinite(dl)]
    span = float(np.max(np.abs(finite))) if finite.size else 0.0
    span = span if span > 0 else 1e-6
    lo, hi = -1.25 * span, 1.25 * span
    if -REFERENCE_DROP_DEX >= lo:  # the threshold is within the data's scale: draw it
        lo = min(lo, -1.15 * REFERENCE_DROP_DEX)
        ax2.axhline(-REFERENCE_DROP_DEX, color="#d62728", ls="--", lw=1.0)
    else:
        ax2.text(0.995, 0.04, f"collapse threshold -{REFERENCE_DROP_DEX:g} dex is off this scale",
                 transform=ax2.transAxes, ha="right", va="bottom", fontsize=7, color="#d62728")  # fmt: skip
    ax2.set_ylim(lo, hi)
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax2.set_ylabel(r"$\Delta\log_{10}\lambda_{max}$")
    ax2.set_xlabel(f"layer (order of {base_label}); red: scale collapse")
    ax2.grid(True, alpha=0.25)
    if len(cmp) <= 60:
        short = [str(n).replace("encoder.", "").replace("layer.", "L") for n in cmp["name"]]
        ax2.set_xticks(x)
        ax2.set_xticklabels(short, rotation=90, fontsize=6)
    fig.tight_layout()
    return _finish(fig, path)


def plot_randomized_esd(
    W: Any,
    *,
    seed: int = 0,
    name: str = "",
    bins: int = 60,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A matrix's ESD beside the ESD of the same entries shuffled (correlation traps).

    The right panel shows the Marchenko-Pastur density fitted to the shuffled spectrum, its bulk
    edge plus Tracy-Widom margin (dashed), and the traps above it (red ticks).

    Parameters
    ----------
    W : 2-D tensor or array
        The weight matrix.
    seed, name : int, str
        The shuffle uses the same generator as ``analyze(randomize=True, seed=seed)`` for the
        layer called ``name``, so the picture matches the table's ``rand_num_spikes``.
    path : str or Path, optional
        Save as PNG or SVG.
    """
    _check_args("plot_randomized_esd", title=title, path=path, bins=bins)
    seed = check_int(seed, "seed", "plot_randomized_esd", low=0)
    if not isinstance(name, str):
        raise fail_type("plot_randomized_esd", "name", "a str", name)
    A = _as_matrix(W)
    N, M = max(A.shape), min(A.shape)
    ev = eigenvalues(A)
    rev = eigenvalues(shuffle_entries(A, layer_rng(seed, name)))
    mp = fit_mp(rev, N, M)
    pos = np.concatenate([ev[ev > EVALS_THRESH], rev[rev > EVALS_THRESH]])
    if pos.size == 0:
        raise ValueError("the matrix has no eigenvalue above the plotting threshold")
    edges = _log_bins(pos, bins)
    fig = Figure(figsize=(10.0, 4.0))
    ax1, ax2 = fig.subplots(1, 2, sharex=True, sharey=True)
    _log_density_bars(ax1, ev[ev > EVALS_THRESH], edges, "#4c72b0")
    ax1.axvline(ev.max(), color="#4c72b0", ls=":", lw=1.0)
    ax1.set_title("W")
    _log_density_bars(ax2, rev[rev > EVALS_THRESH], edges, "#9467bd")
    if mp.sigma_mp > 0:
        xs = np.linspace(mp.bulk_min, mp.bulk_max, 400)[1:-1]
        # density of the eigenvalues in their own units, rho(x * scale) * scale, then of log10 x
        rho = mp_density(xs * mp.scale, mp.Q, mp.sigma_mp) * mp.scale * xs * math.log(10.0)
        ax2.plot(xs, rho, color="black", lw=1.2, label=rf"MP fit, $\sigma$ = {mp.sigma_mp:.3f}")
    ax2.axvline(mp.threshold, color="#d62728", ls="--", lw=1.2, label="bulk edge + TW margin")
    traps = rev[rev > mp.threshold]
    for i, t in enumerate(traps):
        ax2.axvline(t, color="#d62728", lw=2.0, alpha=0.8, label="trap" if i == 0 else None)
    ax2.set_title(f"W with entries shuffled: {traps.size} trap{'s' if traps.size != 1 else ''}")
    ax2.legend(loc="lower left", fontsize=8, frameon=False)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(r"eigenvalue $\lambda$")
        ax.grid(True, alpha=0.25)
    ax1.set_ylabel(r"density of $\log_{10}\lambda$ (per decade)")
    fig.suptitle(title or (f"Correlation traps: {name}" if name else "Correlation traps"))
    fig.tight_layout()
    return _finish(fig, path)
