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
    fig.savefig(buf, format=fmt, dpi=dpi)  # figures are laid out by tight_layout already
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
    evals_or_layer_result: Any,
    fit: PowerLawFit | Mapping | None = None,
    *,
    title: str | None = None,
    bins: int = 60,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The empirical spectral density of a layer on log-log axes, with its power-law fit.

    Parameters
    ----------
    evals_or_layer_result : array, Spectrum or 2-D matrix
        Eigenvalues of ``W^T W``, a :class:`frogwatch.spectra.Spectrum`
        (e.g. :func:`frogwatch.diagnostics.layer_spectrum`), or a weight matrix.
    fit : PowerLawFit or mapping, optional
        The fit to draw: a :class:`PowerLawFit`, or a row of ``analyze``'s table (anything with
        ``alpha`` and ``xmin``, optionally ``D``). Fitted here when omitted.
    title : str, optional
    bins : int
        Logarithmic histogram bins.
    path : str or Path, optional
        Save as PNG or SVG.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_args("plot_esd", title=title, path=path, bins=bins)
    ev = _evals_of(evals_or_layer_result)
    if fit is None:
        fit = fit_power_law(ev)
    if isinstance(fit, PowerLawFit):
        alpha, xmin, D, ok = fit.alpha, fit.xmin, fit.D, fit.status == "success"
    elif isinstance(fit, (Mapping, pd.Series)):
        alpha, xmin = float(fit["alpha"]), float(fit["xmin"])
        D = float(fit.get("D", math.nan))
        ok = math.isfinite(alpha) and math.isfinite(xmin)
    else:
        raise ValueError(f"fit must be a PowerLawFit or a mapping with alpha and xmin, got {type(fit).__name__}")
    x = ev[ev > EVALS_THRESH]
    if x.size == 0:
        raise ValueError(f"no eigenvalue above {EVALS_THRESH:g} to plot")
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    edges = _log_bins(x, bins)
    ax.hist(x, bins=edges, density=True, color="#4c72b0", alpha=0.55, label=f"ESD ({x.size} eigenvalues)")
    if ok:
        tail = x[x >= xmin]
        frac = tail.size / x.size
        xs = np.logspace(math.log10(xmin), math.log10(x.max()), 200)
        ys = frac * (alpha - 1.0) / xmin * (xs / xmin) ** (-alpha)
        label = rf"power law $\alpha$ = {alpha:.2f}" + (f", D = {D:.3f}" if math.isfinite(D) else "")
        ax.plot(xs, ys, color="#d62728", lw=2.0, label=label)
        ax.axvline(xmin, color="#d62728", ls="--", lw=1.2, label=rf"$x_{{min}}$ = {xmin:.3g} ({tail.size} in tail)")
    else:
        ax.text(0.03, 0.05, "power-law fit failed", transform=ax.transAxes, color="#d62728")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"eigenvalue $\lambda$ of $W^TW$")
    ax.set_ylabel("density")
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
    """Alpha of each layer against its depth (module order), coloured by layer kind.

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
    ax.set_xlabel("depth (module order" + (", embeddings excluded)" if not include_embeddings else ")"))
    ax.set_ylabel(r"power-law exponent $\alpha$")
    ax.set_ylim(0, max(ALPHA_HIGH + 1.5, float(d["alpha"].max()) * 1.08))
    ax.set_title(title or r"Correlation flow: $\alpha$ against depth")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def plot_compare(
    cmp: pd.DataFrame, *, title: str | None = None, path: str | os.PathLike | None = None
) -> Figure:
    """Alpha per layer before and after fine-tuning, and the change of the spectral norm.

    Top: ``alpha_base`` (open circles) and ``alpha_tuned`` (filled) joined per layer, with the
    2-6 band. Bottom: change of ``log_spectral_norm``, with the -0.3 dex collapse threshold and
    the layers flagged ``scale_collapse`` in red.

    Parameters
    ----------
    cmp : DataFrame
        Output of :func:`frogwatch.compare`.
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
    ax.scatter(x, ab, facecolors="none", edgecolors="#1f77b4", s=28, label="base", zorder=3)
    ax.scatter(x, at, color="#ff7f0e", s=16, label="tuned", zorder=4)
    ax.set_ylabel(r"$\alpha$")
    ax.set_title(title or r"Before / after: $\alpha$ per layer")
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=2)
    ax.grid(True, alpha=0.25)
    ax2.bar(x, dl, color=np.where(col, "#d62728", "#7f7f7f"), width=0.8)
    ax2.axhline(-REFERENCE_DROP_DEX, color="#d62728", ls="--", lw=1.0)
    ax2.axhline(0, color="black", lw=0.6)
    ax2.set_ylabel(r"$\Delta\log_{10}\lambda_{max}$")
    ax2.set_xlabel("layer (base model order); red: scale collapse")
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
    ax1.hist(ev[ev > EVALS_THRESH], bins=edges, density=True, color="#4c72b0", alpha=0.6)
    ax1.axvline(ev.max(), color="#4c72b0", ls=":", lw=1.0)
    ax1.set_title("W")
    ax2.hist(rev[rev > EVALS_THRESH], bins=edges, density=True, color="#9467bd", alpha=0.6)
    if mp.sigma_mp > 0:
        xs = np.linspace(mp.bulk_min, mp.bulk_max, 400)[1:-1]
        # density of the eigenvalues in their own units: rho(x * scale) * scale
        ax2.plot(xs, mp_density(xs * mp.scale, mp.Q, mp.sigma_mp) * mp.scale, color="black", lw=1.2,
                 label=rf"MP fit, $\sigma$ = {mp.sigma_mp:.3f}")  # fmt: skip
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
    ax1.set_ylabel("density")
    fig.suptitle(title or (f"Correlation traps: {name}" if name else "Correlation traps"))
    fig.tight_layout()
    return _finish(fig, path)
