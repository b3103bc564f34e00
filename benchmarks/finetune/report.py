"""Tables, paired tests and plots from ``results.csv`` (written by :mod:`run`).

``python benchmarks/finetune/report.py DIR`` rewrites ``DIR/summary.md`` and the plots.

Statistics
----------
For a comparison A vs B on a task, the unit is a seed: both methods ran on the same data split,
pretrained model and batch order for that seed, so the per-seed differences are paired.

* Per budget: paired t-test (``scipy.stats.ttest_rel``) and Wilcoxon signed-rank
  (``scipy.stats.wilcoxon``; with 5 seeds its smallest two-sided p is 0.0625, so it can never
  reach 0.05 alone — it is shown as a robustness check).
* Pooled over budgets: Wilcoxon signed-rank over all (budget, seed) pairs (20 with 4 budgets × 5
  seeds), the main "does it help in general" test.
* Multiple comparisons: Holm-Bonferroni over all tests of one table (one task, one metric, one
  family of comparisons). A difference "holds up" when its Holm-adjusted p < 0.05.

Signs: ``gain`` is oriented so that positive means the *first* method (FROG per-matrix against a
baseline; the variant against plain FROG) is better — higher accuracy, lower relative MSE, higher
kept similarity.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["make_report", "paired_tests"]

ALPHA = 0.05
BASELINES = ("random", "magnitude", "lift", "lora", "full")
VARIANTS = ("frog_global", "frog_blend_under", "frog_blend_over", "frog_init", "frog_noise", "frog_init_noise")
UNBUDGETED = ("pretrained", "head_only", "full")
SWEEP_METHODS = ("pretrained", "head_only", "full", "frog_pm", "frog_blend_under", "frog_blend_over", "random", "magnitude",
                 "lift", "lora", "default", "balanced")
METHOD_ORDER = (
    "pretrained", "head_only", "full", "frog_pm", "frog_global", "frog_blend_under", "frog_blend_over",
    "frog_init", "frog_noise", "frog_init_noise", "random", "magnitude", "lift", "lora",
    "default", "balanced", "normalized", "bulk", "mix50", "sel_random", "grad", "balanced_blend_under",
    "balanced_blend_over", "mix50_blend_under", "mix50_blend_over", "sel_random_blend_under", "sel_random_blend_over",
)
#: Within-matrix selectors compared against the random mask (same per-matrix counts).
SELECTORS = METHOD_ORDER[METHOD_ORDER.index("default"):] + ("frog_pm", "magnitude", "lift")
TASK_TEXT = {
    "digits": ("target-domain test accuracy (higher is better)", "source-domain test accuracy kept (higher is better)"),
    "planted_sparse": ("test MSE / untuned MSE (lower is better)", "cosine(ΔW, planted D) (higher is better)"),
    "planted_lowrank": ("test MSE / untuned MSE (lower is better)", "cosine(ΔW, planted D) (higher is better)"),
    "minilm": ("test accuracy (higher is better)", "Spearman of held-out sentence similarities vs pretrained (higher is better)"),
    "pydoc": ("test accuracy (higher is better)", "Spearman of held-out sentence similarities vs pretrained (higher is better)"),
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _secondary(df: pd.DataFrame) -> pd.Series:
    """The task's second metric: source_metric, or delta_cos for the planted tasks."""
    return df["delta_cos"].where(df["task"].str.startswith("planted"), df["source_metric"])


def _ordered(methods: Iterable[str]) -> list[str]:
    ms = list(dict.fromkeys(methods))
    return sorted(ms, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def _budget_label(b: float) -> str:
    return f"{100 * b:g}%"


def holm(p: Iterable[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN)."""
    p = np.asarray(list(p), dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    order = np.argsort(q)
    m = len(q)
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * q[i]))
        adj[i] = running
    out[ok] = adj
    return out


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(t-test p, Wilcoxon p) of paired samples; NaN when undefined."""
    d = a - b
    if len(d) < 2 or np.allclose(d, 0):
        return (1.0, 1.0) if len(d) >= 2 else (math.nan, math.nan)
    t_p = float(stats.ttest_rel(a, b).pvalue) if np.std(d) > 0 else 0.0
    try:
        w_p = float(stats.wilcoxon(a, b).pvalue)
    except ValueError:
        w_p = math.nan
    return t_p, w_p


def _values(df: pd.DataFrame, method: str, budget: float | None, metric: str) -> pd.Series:
    sub = df[df["method"] == method]
    if method not in UNBUDGETED and budget is not None:
        sub = sub[np.isclose(sub["budget"], budget)]
    return sub.set_index("seed")[metric]


def paired_tests(df: pd.DataFrame, task: str, metric: str, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Per-budget and pooled paired tests of ``A`` vs ``B`` for each pair, Holm-adjusted together."""
    d = df[df["task"] == task].copy()
    higher = bool(d["higher_is_better"].iloc[0]) if metric == "target_metric" else True
    sign = 1.0 if higher else -1.0
    budgets = sorted(d.loc[~d["method"].isin(UNBUDGETED), "budget"].unique())
    rows = []
    for a, b in pairs:
        if a not in set(d["method"]) or b not in set(d["method"]):
            continue
        pooled_a, pooled_b = [], []
        n_budgets = 0
        for bud in budgets:
            va, vb = _values(d, a, bud, metric), _values(d, b, bud, metric)
            seeds = va.index.intersection(vb.index)
            x, y = va.loc[seeds].to_numpy(float), vb.loc[seeds].to_numpy(float)
            ok = ~(np.isnan(x) | np.isnan(y))
            x, y = x[ok], y[ok]
            if len(x) == 0:
                continue
            n_budgets += 1
            pooled_a.extend(x)
            pooled_b.extend(y)
            t_p, w_p = _paired(x, y)
            gain = sign * (x - y)
            rows.append({"A": a, "B": b, "budget": _budget_label(bud), "n": len(x), "gain": gain.mean(),
                         "gain_sd": gain.std(ddof=1) if len(x) > 1 else math.nan,
                         "A_wins": int((gain > 0).sum()), "p_t": t_p, "p_wilcoxon": w_p})
        if len(pooled_a) > 1 and n_budgets > 1:
            x, y = np.asarray(pooled_a), np.asarray(pooled_b)
            gain = sign * (x - y)
            _, w_p = _paired(x, y)
            t_p, _ = _paired(x, y)
            rows.append({"A": a, "B": b, "budget": "pooled", "n": len(x), "gain": gain.mean(),
                         "gain_sd": gain.std(ddof=1), "A_wins": int((gain > 0).sum()), "p_t": t_p, "p_wilcoxon": w_p})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    # Holm over the per-budget t-tests, and separately over the pooled Wilcoxon tests.
    per = out["budget"] != "pooled"
    out["p_holm"] = np.nan
    out.loc[per, "p_holm"] = holm(out.loc[per, "p_t"])
    out.loc[~per, "p_holm"] = holm(out.loc[~per, "p_wilcoxon"])

    def verdict(r) -> str:
        if not (r["p_holm"] < ALPHA):
            return "no clear difference"
        return f"{r['A']} better" if r["gain"] > 0 else f"{r['B']} better"

    out["verdict"] = out.apply(verdict, axis=1)
    return out


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def summary_table(df: pd.DataFrame, task: str, metric: str, digits: int = 3) -> pd.DataFrame:
    """Mean ± std over seeds: rows = methods, columns = budgets (unbudgeted methods: one column)."""
    d = df[df["task"] == task]
    budgets = sorted(d.loc[~d["method"].isin(UNBUDGETED), "budget"].unique())
    rows = {}
    for m in _ordered(d["method"]):
        sub = d[d["method"] == m]
        cells = {}
        if m in UNBUDGETED:
            v = sub[metric].astype(float)
            cells["any"] = _fmt(v.mean(), v.std(ddof=1), digits)
        else:
            for b in budgets:
                v = sub.loc[np.isclose(sub["budget"], b), metric].astype(float)
                cells[_budget_label(b)] = _fmt(v.mean(), v.std(ddof=1), digits) if len(v) else ""
        rows[m] = cells
    cols = ["any"] + [_budget_label(b) for b in budgets]
    t = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=cols).astype(object).fillna("")
    t.index.name = "method"
    return t


def _md(df: pd.DataFrame, index: bool = True, floatfmt: str = ".3g") -> str:
    """Markdown table without the tabulate dependency."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]

    def cell(v) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "—"
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines)


def _budget_notes(df: pd.DataFrame, task: str) -> str:
    d = df[(df["task"] == task) & (df["method"] == "lora")]
    if d.empty:
        return ""
    notes = []
    for b, sub in d.groupby("budget"):
        target = b * sub["n_targeted"].iloc[0]
        tr = int(sub["trainable"].iloc[0])
        ratio = tr / target
        flag = " (**over budget**)" if ratio > 1.25 else ""
        notes.append(f"{_budget_label(b)}: {sub['config'].iloc[0]}, {tr:,} params = {ratio:.2f}× the budget{flag}")
    return "LoRA ranks: " + "; ".join(notes) + "."


def _test_table(t: pd.DataFrame) -> str:
    if t.empty:
        return "_no pairs_\n"
    show = t[["A", "B", "budget", "n", "gain", "gain_sd", "A_wins", "p_t", "p_wilcoxon", "p_holm", "verdict"]].copy()
    return _md(show, index=False, floatfmt=".3g")


def _holds(t: pd.DataFrame) -> list[str]:
    if t.empty:
        return []
    sig = t[t["p_holm"] < ALPHA]
    return [f"{r.A} vs {r.B} at {r.budget}: {r.verdict} (gain {r.gain:+.3g}, {r.A_wins}/{r.n} pairs, Holm p = {r.p_holm:.2g})"
            for r in sig.itertuples()]


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _plot_task(df: pd.DataFrame, task: str, out: Path) -> list[str]:
    d = df[df["task"] == task]
    budgets = sorted(d.loc[~d["method"].isin(UNBUDGETED), "budget"].unique())
    files = []
    groups = {
        "baselines": ["frog_pm", "random", "magnitude", "lift", "lora"],
        "variants": ["frog_pm", "frog_global", "frog_blend_under", "frog_blend_over", "frog_init", "frog_noise", "frog_init_noise"],
    }
    labels = TASK_TEXT.get(task, ("target_metric", "source_metric"))
    d = d.assign(secondary=_secondary(d))
    for gname, methods in groups.items():
        methods = [m for m in methods if m in set(d["method"])]
        if len(methods) < 2 or not budgets:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, label in zip(axes, ("target_metric", "secondary"), labels):
            if d[metric].isna().all():
                ax.set_visible(False)
                continue
            for m in methods:
                g = d[d["method"] == m].groupby("budget")[metric].agg(["mean", "std"]).reindex(budgets)
                ax.errorbar(np.array(budgets) * 100, g["mean"], yerr=g["std"], marker="o", capsize=3, label=m)
            for m, style in (("full", "--"), ("pretrained", ":"), ("head_only", "-.")):
                v = d.loc[d["method"] == m, metric]
                if len(v) and not v.isna().all():
                    ax.axhline(v.mean(), ls=style, color="gray", label=m)
            ax.set_xscale("log")
            ax.set_xticks(np.array(budgets) * 100, [_budget_label(b) for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("budget (% of targeted weights)")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{task}: FROG {gname} (mean ± std over seeds)")
        fig.tight_layout()
        name = f"{task}_{gname}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    if d["secondary"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in _ordered(d["method"]):
            g = d[d["method"] == m].groupby("budget")[["target_metric", "secondary"]].mean()
            ax.plot(g["target_metric"], g["secondary"], marker="o", ls="-" if len(g) > 1 else "", label=m)
        ax.set_xlabel(labels[0], fontsize=8)
        ax.set_ylabel(labels[1], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{task}: adaptation vs kept knowledge (means; one point per budget)", fontsize=9)
        fig.tight_layout()
        name = f"{task}_tradeoff.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _plot_sweep(runs: pd.DataFrame, task: str, out: Path) -> list[str]:
    """Every lr of the sweep (mean over seeds): adaptation vs kept knowledge, one line per (method, budget).

    The lr chosen on validation decides where on this curve a method lands; the curve shows whether
    a method keeps more at *equal* adaptation, which the chosen-lr tables cannot.
    """
    s = runs[runs["task"] == task]
    s = s.assign(secondary=_secondary(s))
    if s.empty or s["secondary"].isna().all():
        return []
    n_seeds = s["seed"].nunique()
    s = (s.groupby(["method", "budget", "lr"], as_index=False)
          .agg(target_metric=("target_metric", "mean"), secondary=("secondary", "mean"), selected=("selected", "all")))
    budgets = sorted(s.loc[~s["method"].isin(UNBUDGETED), "budget"].unique())
    labels = TASK_TEXT.get(task, ("target_metric", "source_metric"))
    shown = [m for m in _ordered(s["method"]) if m in SWEEP_METHODS]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for i, m in enumerate(shown):
            g = s[(s["method"] == m) & (np.isclose(s["budget"], b) | s["method"].isin(UNBUDGETED))].sort_values("lr")
            if g.empty:
                continue
            ax.plot(g["target_metric"], g["secondary"], marker="o", ms=3, color=colors[i % 10],
                    ls="--" if m in UNBUDGETED else "-", label=m)
            best = g[g["selected"]]
            ax.plot(best["target_metric"], best["secondary"], marker="*", ms=10, color=colors[i % 10], ls="")
        ax.set_title(f"budget {_budget_label(b)} (★ = lr chosen on val)", fontsize=8)
        ax.set_xlabel(labels[0], fontsize=7)
        ax.set_ylabel(labels[1], fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{task}: lr sweep, mean over {n_seeds} seeds", fontsize=9)
    fig.tight_layout()
    name = f"{task}_sweep.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def make_report(out: Path, meta: dict | None = None) -> Path:
    """Write ``summary.md`` (tables, tests, what holds up) and the plots into ``out``."""
    out = Path(out)
    meta_path = out / "meta.json"
    if meta:
        meta_path.write_text(json.dumps(meta, indent=1))
    elif meta_path.exists():
        meta = json.loads(meta_path.read_text())
    df = pd.read_csv(out / "results.csv")
    runs = pd.read_csv(out / "runs.csv") if (out / "runs.csv").exists() else None
    lines = ["# FROG fine-tuning benchmark — generated summary", ""]
    if meta:
        lines += [f"- command: `{meta.get('command', '')}`",
                  f"- wall time: {meta.get('wall_seconds')} s (CPU time of all processes: {meta.get('cpu_seconds', '?')} s)",
                  f"- machine: {meta.get('machine', '')}; load average at the end: {meta.get('load_average', '')}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()), ""]
    lines += ["Cells: mean ± std over seeds at the lr chosen on validation. Budget = fraction of the "
              "targeted weights; `any` = methods without a budget (full fine-tuning, no fine-tuning, head only).", "",
              "Paired-test columns: `gain` = mean over pairs of (A − B), signed so that positive means A is better; "
              "`A_wins` = pairs where A is better; `p_t` = paired t-test; `p_wilcoxon` = Wilcoxon signed-rank "
              "(cannot go below 0.0625 with 5 pairs); `p_holm` = Holm-adjusted over the table: per-budget rows "
              "adjust `p_t`, `pooled` rows (all budgets × seeds) adjust `p_wilcoxon`. A verdict other than "
              "'no clear difference' means p_holm < 0.05.", ""]
    holds_all: list[str] = []
    for task in [t for t in ("digits", "planted_sparse", "planted_lowrank", "minilm", "pydoc") if t in set(df["task"])] + \
            sorted(set(df["task"]) - set(TASK_TEXT)):
        d = df[df["task"] == task].assign(secondary=lambda x: _secondary(x))
        labels = TASK_TEXT.get(task, ("target_metric", "source_metric"))
        seeds = sorted(d["seed"].unique())
        lines += [f"## {task}", "", f"Seeds: {', '.join(map(str, seeds))}. Targeted weights T = {int(d['n_targeted'].iloc[0]):,}.", ""]
        lines += [f"### {labels[0]}", "", _md(summary_table(d, task, "target_metric")), ""]
        if d["secondary"].notna().any():
            lines += [f"### {labels[1]}", "", _md(summary_table(d, task, "secondary")), ""]
        note = _budget_notes(d, task)
        if note:
            lines += [note, ""]
        edge = d.groupby(["method", "budget"])["lr_at_edge"].first()
        n_edge = int(edge.sum())
        lines += [f"lr chosen at an edge of its grid in {n_edge} of {len(edge)} cells"
                  + (": " + ", ".join(f"{m}@{_budget_label(b)}" for (m, b), v in edge.items() if v) if 0 < n_edge <= 12 else "") + ".", ""]
        cost_cols = [c for c in ("seconds", "cpu_seconds", "peak_mem_mb", "state_mb") if c in d.columns]
        cost = d.groupby(["method", "budget"])[cost_cols].median()
        lines += ["Cost per run, median over seeds: wall and CPU seconds of setup + training (evaluation "
                  "excluded); peak RSS increase over the run in MB (process-level, noisy: freed memory is reused "
                  "between runs); exact trainable state in MB (params + grads + AdamW moments + FROG index/noise buffers).", "",
                  _md(cost.round(3)), ""]
        budget_pairs = [("frog_pm", b) for b in BASELINES]
        variant_pairs = [(v, "frog_pm") for v in VARIANTS]
        random_pairs = [(m, "random") for m in SELECTORS if m in set(d["method"])]
        for title, pairs, metric in (
            ("selectors vs the random mask — " + labels[0], random_pairs, "target_metric"),
            ("selectors vs the random mask — " + labels[1], random_pairs, "secondary"),
            ("FROG per-matrix vs baselines — " + labels[0], budget_pairs, "target_metric"),
            ("FROG variants vs plain FROG per-matrix — " + labels[0], variant_pairs, "target_metric"),
            ("FROG per-matrix vs baselines — " + labels[1], budget_pairs, "secondary"),
            ("FROG variants vs plain FROG per-matrix — " + labels[1], variant_pairs, "secondary"),
        ):
            if metric == "secondary" and d["secondary"].isna().all():
                continue
            t = paired_tests(d, task, metric, pairs)
            if t.empty:
                continue
            lines += [f"### Paired tests: {title}", "", _test_table(t), ""]
            held = _holds(t)
            lines += ["Holds up (Holm p < 0.05): " + ("; ".join(held) if held else "nothing."), ""]
            holds_all += [f"[{task}, {'target' if metric == 'target_metric' else 'secondary'}] {h}" for h in held]
        for f in _plot_task(df, task, out) + (_plot_sweep(runs, task, out) if runs is not None else []):
            lines += [f"![{f}]({f})", ""]
    lines += ["## Every difference that holds up (Holm-adjusted p < 0.05)", ""]
    lines += [f"- {h}" for h in holds_all] or ["- none"]
    if runs is not None:
        lines += ["", f"Runs in total (lr sweeps included): {len(runs)}; summed train time {runs['seconds'].sum():.0f} s."]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    make_report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results"))
