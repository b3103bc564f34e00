"""Tables for ``benchmarks/results_finetune.md`` § "Selection must earn its place" (issue 10).

``python benchmarks/finetune/selection_summary.py`` reads the runs of the selection study and prints
markdown: per task and budget, mean ± sd of adaptation and retention per selector, the paired tests
against the random mask (per budget: paired t-test; pooled over budgets: Wilcoxon; Holm over each
table), and the mask geometry of ``diagnose.py`` next to them.

Inputs (each written by ``run.py``; ``runs.csv`` is used so that an interrupted run still counts:
its rows at the chosen lr are the ``selected`` ones):

* ``results-selection/`` — cheap tasks, seeds 0–4, every data-free scorer. Its method ``default``
  ran when ``select``'s default was still ``score="relevance"``: it is relabelled ``frog_pm``.
* ``results-lowrank/`` — planted_lowrank, seeds 0–4 (``default`` = the new default, balanced).
* ``results-unseen/`` — seeds 100–104, never used before: ``default`` (balanced) vs ``random``.
* ``results-pydoc/`` — the docstring task (``default`` = balanced), seeds 100–101.
* ``results-confirm/`` — the pre-registered confirmation (``results-confirm/PREREGISTRATION.md``)
  on seeds 300–304, never used before: ``random``, ``balanced``, ``sel_random0``
  (``select(score="random")``, default seed) on the cheap tasks; ``results-confirm-default/`` —
  ``default`` rerun after the decision (identical to ``sel_random0``, as it must be).
* ``results-pydoc300/`` (``random``), ``results-pydoc300-default/`` (``default``, seeds 300–304) and
  ``results-pydoc300-balanced/`` (seeds 300–302): the docstring task at 300 steps, batch 4,
  16 tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import _secondary, paired_tests  # noqa: E402


def load(name: str, relabel_default: str | None = None) -> pd.DataFrame:
    path = HERE / name / "runs.csv"
    if not path.exists():
        return pd.DataFrame()
    df = pd.read_csv(path)
    df = df[df["selected"]].copy()
    if relabel_default:
        df.loc[df["method"] == "default", "method"] = relabel_default
    df["study"] = name
    return df


def table(df: pd.DataFrame, task: str) -> str:
    d = df[df["task"] == task].assign(secondary=lambda x: _secondary(x))
    out = ["| method | budget | n | adaptation | retention |", "|---|---|---|---|---|"]
    for (m, b), g in d.groupby(["method", "budget"]):
        out.append(f"| {m} | {b:g} | {len(g)} | {g['target_metric'].mean():.3f} ± {g['target_metric'].std():.3f} "
                   f"| {g['secondary'].mean():.3f} ± {g['secondary'].std():.3f} |")
    return "\n".join(out)


def tests(df: pd.DataFrame, task: str, metric: str) -> str:
    d = df[df["task"] == task].assign(secondary=lambda x: _secondary(x))
    pairs = [(m, "random") for m in sorted(set(d["method"]) - {"random"})]
    t = paired_tests(d, task, metric, pairs)
    if t.empty:
        return "(no pairs)"
    cols = ["A", "B", "budget", "n", "gain", "A_wins", "p_t", "p_wilcoxon", "p_holm", "verdict"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in t[cols].iterrows():
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def confirmation(df: pd.DataFrame) -> None:
    """The decision table: default and balanced against random, per task and budget (adaptation)."""
    if df.empty:
        return
    print("## Confirmation, seeds 300-304: default and balanced against random (adaptation)\n")
    print("| task | budget | n | default | random | balanced | default − random: gain, wins, p (Holm) "
          "| balanced − random: gain, wins, p (Holm) |\n|---|---|---|---|---|---|---|---|")
    for task in sorted(df["task"].unique()):
        d = df[df["task"] == task]
        t = paired_tests(d, task, "target_metric", [("default", "random"), ("balanced", "random")])
        budgets = sorted(d["budget"].unique())
        for bud in [*budgets, "pooled"] if len(budgets) > 1 else budgets:
            label = "pooled" if bud == "pooled" else f"{100 * bud:g}%"
            means = []
            for m in ("default", "random", "balanced"):
                v = d[d["method"] == m] if bud == "pooled" else d[(d["method"] == m) & np.isclose(d["budget"], bud)]
                means.append(f"{v['target_metric'].mean():.3f}" if len(v) else "—")
            cells = []
            for a in ("default", "balanced"):
                r = t[(t["A"] == a) & (t["budget"] == label)] if not t.empty else t
                cells.append("—" if r.empty else
                             f"{r['gain'].iloc[0]:+.4f}, {r['A_wins'].iloc[0]}/{r['n'].iloc[0]}, {r['p_holm'].iloc[0]:.2g}")
            n = d[d["method"] == "random"].shape[0] if bud == "pooled" else int(
                ((d["method"] == "random") & np.isclose(d["budget"], bud)).sum())
            print(f"| {task} | {label} | {n} | " + " | ".join(means) + " | " + " | ".join(cells) + " |")
    print("\ngain > 0: better than random (accuracy up, MSE ratio down). Per budget: paired t-test; pooled: "
          "Wilcoxon; Holm over each task's tests.\n")


def main() -> None:
    studies = {
        "seeds 0-4 (selection study)": pd.concat([load("results-selection", "frog_pm"), load("results-lowrank")]),
        # its frog_pm ran after the default switched and before frog_pm was pinned to relevance: a
        # duplicate of default, dropped
        "seeds 100-104 (never used before)": load("results-unseen").query("method != 'frog_pm'"),
        "pydoc (real text), seeds 100-101": load("results-pydoc"),
        "seeds 300-304 (pre-registered confirmation)": pd.concat(
            [load("results-confirm"), load("results-confirm-default"), load("results-pydoc300"),
             load("results-pydoc300-default"), load("results-pydoc300-balanced")]),
    }
    confirmation(studies["seeds 300-304 (pre-registered confirmation)"])
    for title, df in studies.items():
        if df.empty:
            continue
        print(f"## {title}\n")
        for task in sorted(df["task"].unique()):
            print(f"### {task}\n\n{table(df, task)}\n")
            for metric in ("target_metric", "secondary"):
                print(f"Paired tests vs random ({'adaptation' if metric == 'target_metric' else 'retention'}):\n")
                print(tests(df, task, metric) + "\n")
    diag = [HERE / "results-selection" / f for f in ("diagnosis_mlp.csv", "diagnosis_minilm.csv")]
    frames = [pd.read_csv(p) for p in diag if p.exists()]
    if frames:
        g = pd.concat(frames)
        print("## Mask geometry (diagnose.py)\n")
        scorers = list(dict.fromkeys(g["scorer"]))
        for value in ("row_cov", "col_cov", "struct_rank", "top_leverage"):
            p = g.pivot_table(index=["task", "budget"], columns="scorer", values=value)[scorers]
            print(f"{value}:\n\n| task | budget | " + " | ".join(scorers) + " |\n|" + "---|" * (len(scorers) + 2))
            for (task, b), r in p.iterrows():
                print(f"| {task} | {b:g} | " + " | ".join(f"{v:.2f}" for v in r) + " |")
            print()


if __name__ == "__main__":
    main()
