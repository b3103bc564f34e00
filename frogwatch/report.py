"""One self-contained HTML report of a model's diagnostics, plus the tables as CSV.

``report(model, base=None, out_dir=...)`` writes into ``out_dir``:

* ``index.html`` - summary, findings, correlation flow, figures (embedded as base64 PNG, so the
  page needs no other file and no network), the per-layer table and, with ``base``, the
  before/after comparison. No JavaScript.
* ``layers.csv``, ``summary.csv``, ``flow.csv``, ``flow_pairs.csv`` and, with ``base``,
  ``compare.csv`` and ``compare_summary.csv``.

Everything is computed in memory first; each file is then written to a temporary file and moved
into place, ``index.html`` last, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from ._io import atomic_write_bytes
from ._validation import check_bool, fail_type, fail_value
from .analyze import analyze, check_options, summary
from .diagnostics.compare import compare_summary, compare_tables
from .diagnostics.flow import ERRATIC_DISPERSION, TREND_SLOPE, correlation_flow
from .layers import ALPHA_HIGH, ALPHA_LOW
from .rules import TRUST_MAX_D, TRUST_MIN_TAIL
from .sources import ResolvedSource, resolve_source
from .diagnostics.traps import find_layer, layer_spectrum
from .plots import (
    figure_bytes,
    plot_alpha_depth,
    plot_compare,
    plot_esd,
    plot_randomized_esd,
)

__all__ = ["report", "model_label"]

LAYER_TABLE_COLUMNS = [
    "name", "layer_id", "layer_type", "M", "N", "alpha", "D", "num_pl_spikes",
    "log_spectral_norm", "log_norm", "alpha_weighted", "stable_rank", "num_spikes",
    "mp_softrank", "rand_num_spikes", "rand_distance", "warning", "overparameterized",
    "scale_collapse", "status",
]  # fmt: skip
COMPARE_TABLE_COLUMNS = [
    "name", "role", "alpha_base", "alpha_tuned", "alpha_change", "log_spectral_norm_change",
    "alpha_weighted_change", "scale_collapse", "dW_fro", "dW_rel", "dW_stable_rank", "dW_alpha",
]  # fmt: skip

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
.scroll{overflow-x:auto}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.88em}
ul.findings li{margin:.2em 0}.flag{color:#b00020;font-weight:600}.ok{color:#1b7f3a}
code{background:#f4f4f4;padding:0 3px}
"""


def model_label(model: Any) -> str:
    """A short human-readable name for a model source (raw, resolved, or an ``Analysis``)."""
    carried = getattr(model, "__frogwatch_source__", None)
    if isinstance(carried, ResolvedSource):
        model = carried
    if isinstance(model, ResolvedSource):
        model = model.model
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    cfg = getattr(model, "config", None)
    path = getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "")
    name = type(model).__name__
    if path:
        short = "/".join(Path(str(path)).parts[-2:]) or str(path)
        return f"{name} ({short})"
    return name


def _fmt(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            return ""
        ax = abs(float(x))
        return f"{x:.3g}" if (ax >= 1e4 or (0 < ax < 1e-3)) else f"{x:.3f}"
    return str(x)


def _table(df: pd.DataFrame, index: bool = False) -> str:
    """An HTML table (escaped), numbers right-aligned, text left-aligned."""
    cols = list(df.columns)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in cols]
    head = ([""] if index else []) + [str(c) for c in cols]
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for idx, row in zip(df.index, df.itertuples(index=False, name=None)):
        out.append("<tr>")
        if index:
            out.append(f'<th class="row">{html.escape(str(idx))}</th>')
        for v, num in zip(row, numeric):
            cls = ' class="num"' if num else ""
            out.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = html.escape(caption)
    return f'<figure><img alt="{cap}" src="data:image/png;base64,{data}"><figcaption>{cap}</figcaption></figure>'


def _findings(df: pd.DataFrame, flow: Any) -> list[str]:
    items = []
    op = df.loc[df["overparameterized"], "name"].tolist()
    items.append(
        f'<span class="flag">{len(op)} over-parameterized</span> layer(s) (alpha &gt; {ALPHA_HIGH:g}, '
        f"trusted fit): {html.escape(', '.join(op))}" if op
        else '<span class="ok">no over-parameterized layer</span>'
    )  # fmt: skip
    sc = df.loc[df["scale_collapse"], "name"].tolist()
    items.append(
        f'<span class="flag">{len(sc)} scale-collapsed</span> layer(s): {html.escape(", ".join(sc))}'
        if sc else '<span class="ok">no scale collapse</span> among layers of the same kind and shape'
    )  # fmt: skip
    if "rand_num_spikes" in df.columns:
        tr = df[pd.to_numeric(df["rand_num_spikes"], errors="coerce") > 0]
        desc = ", ".join(f"{n} ({int(k)})" for n, k in zip(tr["name"], tr["rand_num_spikes"]))
        items.append(
            f'<span class="flag">{len(tr)} layer(s) with correlation traps</span>: {html.escape(desc)}'
            if len(tr) else '<span class="ok">no correlation trap</span>'
        )  # fmt: skip
    failed = df[df["status"] != "success"]
    if len(failed):
        desc = "; ".join(f"{n}: {r}" for n, r in zip(failed["name"], failed["reason"]))
        items.append(f'<span class="flag">{len(failed)} failed fit(s)</span>: {html.escape(desc)}')
    skipped = df.attrs.get("skipped", [])
    if skipped:
        desc = "; ".join(f"{n} ({r})" for n, r in skipped)
        items.append(f"{len(skipped)} matrix(es) skipped: {html.escape(desc)}")
    items.append(f"correlation flow of the model: <b>{html.escape(flow.verdict)}</b>")
    return items


def _pick_esd_layers(df: pd.DataFrame) -> list[str]:
    ok = df[(df["status"] == "success") & (df["layer_type"] != "embedding")]
    if ok.empty:
        return []
    a = pd.to_numeric(ok["alpha"], errors="coerce")
    picks = [ok.loc[a.idxmin(), "name"], ok.loc[a.idxmax(), "name"]]
    return list(dict.fromkeys(picks))


def report(
    model: Any,
    base: Any = None,
    out_dir: str | os.PathLike = "frogwatch-report",
    *,
    randomize: bool = True,
    mp_fit: bool = True,
    seed: int = 0,
    title: str | None = None,
    progress: bool = False,
    **analyze_kwargs: Any,
) -> Path:
    """Write the HTML report (and CSVs) of ``model``, compared with ``base`` when given.

    Parameters
    ----------
    model : model source
        Anything :func:`frogwatch.analyze` reads, or a source resolved by
        :func:`frogwatch.sources.resolve_source`. Resolved once: a sharded checkpoint's headers
        are read once for the whole report.
    base : model source, optional
        The model before fine-tuning (same architecture); adds the before/after section.
    out_dir : str or Path
        Output directory (created if needed).
    randomize, mp_fit, seed :
        Passed to ``analyze`` (correlation traps and MP fit are on by default here).
    title : str, optional
        Page title; defaults to the model's name.
    **analyze_kwargs
        Other ``analyze`` options (``layers``, ``fit``, ``device``...).

    Returns
    -------
    Path
        The ``index.html`` written.

    Raises
    ------
    TypeError, ValueError
        A bad argument (checked before any model is read).
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise fail_type("report", "out_dir", "a str or os.PathLike", out_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise fail_value("report", "out_dir", "a directory or a new path", str(out))
    if title is not None and not isinstance(title, str):
        raise fail_type("report", "title", "a str or None", title)
    if model is None:
        raise fail_type("report", "model", "a model source", model)
    kw = check_options(
        "report", **analyze_kwargs, randomize=randomize, mp_fit=mp_fit, seed=seed,
        progress=check_bool(progress, "progress", "report"),
    )  # fmt: skip
    seed = kw["seed"]
    label = model_label(model)
    model = resolve_source(model)
    base = resolve_source(base) if base is not None else None
    df = analyze(model, **kw)
    s = summary(df)
    flow = correlation_flow(df, model)

    figs: list[str] = []
    row_of = df.set_index("name")
    matrix_names = set(model.by_name)
    esd_layers = _pick_esd_layers(df)
    if esd_layers:  # at least one successful fit
        png = figure_bytes(plot_alpha_depth(df, title=rf"{label}: $\alpha$ against depth"))
        figs.append(_figure(png, "Alpha against depth, coloured by layer kind; the shaded band is 2 <= alpha <= 6."))
    for name in esd_layers:
        if name not in matrix_names:
            continue  # an unpooled conv slice: no matrix of that name
        spec = layer_spectrum(model, name)
        png = figure_bytes(plot_esd(spec, row_of.loc[name], title=name))
        figs.append(_figure(png, f"ESD of {name} with its power-law fit (alpha = {row_of.loc[name, 'alpha']:.2f})."))
    if kw["randomize"] and "rand_num_spikes" in df.columns:
        traps = pd.to_numeric(df["rand_num_spikes"], errors="coerce").fillna(0)
        name = df.loc[traps.idxmax(), "name"] if (traps > 0).any() else None
        if name is not None and name in matrix_names:
            lm = find_layer(model, name)
            if len(lm.shape) == 2:
                png = figure_bytes(plot_randomized_esd(lm.load(), seed=seed, name=name))
                cap = f"Correlation traps of {name}: its ESD beside the ESD of its shuffled entries."
                figs.append(_figure(png, cap))

    cmp = cmp_sum = None
    if base is not None:
        df_base = analyze(base, **kw)
        cmp = compare_tables(df_base, df, base, model)
        cmp_sum = compare_summary(cmp)
        png = figure_bytes(plot_compare(cmp, title=f"{model_label(base)} -> {label}"))
        figs.append(_figure(png, "Alpha per layer before (open) and after (filled); below, the change "
                                 "of log10 lambda_max (red: scale collapse)."))

    # ---- page
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page_title = title or f"frogwatch report: {label}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(page_title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(page_title)}</h1>",
        f'<p class="meta">frogwatch {__version__} &middot; {now} &middot; {len(df)} matrices analysed'
        + (f" &middot; compared with {html.escape(model_label(base))}" if base is not None else "")
        + "</p>",
        "<h2>Findings</h2><ul class=\"findings\">",
        *[f"<li>{item}</li>" for item in _findings(df, flow)],
        "</ul>",
        "<h2>Summary</h2>",
        "<p>Means over the analysed non-embedding layers with a successful fit "
        "(<code>alpha_weighted</code> is the model's alpha-hat).</p>",
        _table(s.to_frame("value"), index=True),
        "<h2>Correlation flow</h2>",
        f"<p>Per layer kind and for the model: share of layers with {ALPHA_LOW:g} &le; alpha &le; "
        f"{ALPHA_HIGH:g}, Theil-Sen slope of alpha over normalised depth (95 % interval), median "
        f"|&Delta;alpha| between neighbours. Verdict: <i>rising/falling</i> if |slope| &ge; "
        f"{TREND_SLOPE:g} with an interval excluding 0, else <i>erratic</i> if the dispersion "
        f"exceeds {ERRATIC_DISPERSION:g}, else <i>flat</i>. Over-parameterized: alpha &gt; "
        f"{ALPHA_HIGH:g} with at least {TRUST_MIN_TAIL} tail eigenvalues and D &le; {TRUST_MAX_D:g}.</p>",
        _table(flow.groups, index=True),
    ]
    if flow.pairs is not None and len(flow.pairs):
        parts += [
            "<p>Between consecutive matrices (the first's output feeds the second): overlap of "
            "their top-k singular subspaces (mean squared cosine of the principal angles); "
            "<code>baseline</code> = k/d is the expectation for random subspaces.</p>",
            _table(flow.pairs),
        ]
    parts += ["<h2>Figures</h2>", *figs]
    if cmp is not None:
        parts += [
            "<h2>Before / after</h2>",
            f"<p>Base: {html.escape(model_label(base))}. Scale collapse: log10 lambda_max falls by "
            "more than 0.3 while alpha does not improve. dW = W_tuned - W_base.</p>",
            _table(cmp_sum, index=True),
            _table(cmp[[c for c in COMPARE_TABLE_COLUMNS if c in cmp.columns]]),
        ]
    parts += [
        "<h2>Layers</h2>",
        _table(df[[c for c in LAYER_TABLE_COLUMNS if c in df.columns]]),
        "<p class=\"meta\">All columns are in layers.csv beside this page.</p>",
        "</body></html>",
    ]
    page = "\n".join(parts)

    pairs = flow.pairs if flow.pairs is not None else pd.DataFrame()
    files: list[tuple[str, bytes]] = [
        ("layers.csv", df.to_csv(index=False).encode()),
        ("summary.csv", s.to_frame("value").to_csv(index_label="metric").encode()),
        ("flow.csv", flow.groups.to_csv().encode()),
        ("flow_pairs.csv", pairs.to_csv(index=False).encode()),
    ]
    if cmp is not None:
        files.append(("compare.csv", cmp.to_csv(index=False).encode()))
        files.append(("compare_summary.csv", cmp_sum.to_csv(index_label="metric").encode()))
    files.append(("index.html", page.encode("utf-8")))
    for fname, data in files:
        atomic_write_bytes(out / fname, data)
    return out / "index.html"
