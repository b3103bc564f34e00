"""Is ``default`` at least as good as ``random`` on unseen seeds? (issue 10, second confirmation)

``python benchmarks/finetune/confirm_default.py DIR [DIR ...]`` reads each ``DIR/runs.csv``
written by ``run.py`` and applies the rule fixed in ``results-confirm2/PREREGISTRATION.md``
before the runs: for every task, at its largest budget in the run, the paired difference
d = default − random per seed (signed so that positive means ``default`` is better),

* the literal reading: mean d ≥ 0 (reported, not deciding: for two draws of one distribution it
  passes on five tasks with probability about 3 %);
* the deciding reading, non-inferiority: a one-sided paired t-test of "default is worse"
  (H1: mean d < 0), Holm-adjusted over the tasks, does not reject at 0.05.

It prints one markdown table (also the retention metric, two-sided, for information) and the
verdict, and exits 0 whatever the verdict (it reports; it does not gate).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import _md, _secondary, holm  # noqa: E402

ALPHA = 0.05


def paired_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, seed) at each task's largest budget: default's and random's metrics."""
    sel = runs[runs["selected"] & runs["method"].isin(["default", "random"])]
    sel = sel.assign(secondary=_secondary(sel))
    out = []
    for task, d in sel.groupby("task"):
        b = d["budget"].max()
        d = d[np.isclose(d["budget"], b)]
        wide = d.pivot_table(index="seed", columns="method", values=["target_metric", "secondary"])
        sign = 1.0 if bool(d["higher_is_better"].iloc[0]) else -1.0
        for seed, r in wide.iterrows():
            out.append({"task": task, "budget": b, "seed": int(seed),
                        "d_target": sign * (r[("target_metric", "default")] - r[("target_metric", "random")]),
                        "d_secondary": r[("secondary", "default")] - r[("secondary", "random")],
                        "default": r[("target_metric", "default")], "random": r[("target_metric", "random")],
                        "lr_default": d.loc[d["method"] == "default", "lr"].iloc[0],
                        "lr_random": d.loc[d["method"] == "random", "lr"].iloc[0]})
    return pd.DataFrame(out)


def verdicts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per task: means, mean d, one-sided p (H1: default worse), Holm over tasks, the two readings."""
    rows = []
    for task, g in pairs.groupby("task"):
        d = g["d_target"].to_numpy()
        p_worse = float(stats.ttest_1samp(d, 0.0, alternative="less").pvalue) if np.std(d) > 0 else (
            0.0 if d.mean() < 0 else 1.0)
        ds = g["d_secondary"].dropna().to_numpy()
        p_sec = float(stats.ttest_1samp(ds, 0.0).pvalue) if len(ds) > 1 and np.std(ds) > 0 else float("nan")
        rows.append({"task": task, "budget": g["budget"].iloc[0], "n": len(d),
                     "lr default / random": f"{g['lr_default'].iloc[0]:g} / {g['lr_random'].iloc[0]:g}",
                     "default": g["default"].mean(), "random": g["random"].mean(), "mean d": d.mean(),
                     "default ahead": int((d > 0).sum()), "p (default worse)": p_worse,
                     "retention mean d": ds.mean() if len(ds) else float("nan"), "retention p (2-sided)": p_sec})
    t = pd.DataFrame(rows)
    t["p Holm"] = holm(t["p (default worse)"])
    t["literal: mean d ≥ 0"] = t["mean d"] >= 0
    t["non-inferior"] = ~(t["p Holm"] < ALPHA)
    return t


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1])
        return 2
    runs = pd.concat([pd.read_csv(Path(a) / "runs.csv") for a in argv], ignore_index=True)
    t = verdicts(paired_rows(runs))
    print(_md(t, index=False, floatfmt=".4g"))
    print()
    print(f"literal reading (mean d >= 0 on every task): {'holds' if t['literal: mean d ≥ 0'].all() else 'fails'} "
          f"({int(t['literal: mean d ≥ 0'].sum())}/{len(t)} tasks)")
    print(f"non-inferiority (no task rejects 'default worse' at Holm {ALPHA}): "
          f"{'holds' if t['non-inferior'].all() else 'fails'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
