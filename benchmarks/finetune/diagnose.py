"""Why a selection adapts or not: the geometry of each scorer's mask, per task and budget.

``python benchmarks/finetune/diagnose.py [--tasks digits,planted_sparse,minilm] [--budgets 0.01,0.05]
[--out benchmarks/finetune/results-selection/diagnosis.csv]``

For every scorer of ``frogwatch.select`` (plus the benchmark's ``random`` baseline and the
data-aware ``grad`` reference), on the pretrained model of seed 0 of each task, with the same
per-matrix counts k_i (Frobenius allocation), over the targeted matrices (weighted by size):

* ``row_cov`` / ``col_cov`` — fraction of rows / columns holding at least one selected entry;
* ``struct_rank`` — the largest rank an update supported on the mask can reach: the maximum
  matching of the mask's bipartite row–column graph (a matrix with generic values on a support
  has exactly that rank), as a fraction of ``min(m, n)``, summed over matrices;
* ``top_leverage`` — mean over selected entries of ``m·‖U_r[i]‖² · n·‖V_r[j]‖² / r²`` with
  ``r = ⌈min(m, n)/16⌉`` top singular vectors: how much a unit update on the selected entries lies
  in the top-r singular subspaces, relative to a uniformly spread mask (1 = like random, larger =
  concentrated on the dominant directions).

The digits / planted tasks use one pretrained MLP per seed (seed 0 here); ``minilm`` is the real
all-MiniLM-L6-v2 (the same matrices as the ``pydoc`` and negation tasks). Adaptation and retention
per method come from the fine-tuning runs (``results.csv``); ``benchmarks/results_finetune.md``
puts them side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.sparse import csr_matrix  # noqa: E402
from scipy.sparse.csgraph import maximum_bipartite_matching  # noqa: E402

SCORERS = ("relevance", "balanced", "normalized", "bulk", "magnitude", "mix50", "random", "grad")


def struct_rank(mask: np.ndarray) -> int:
    """Maximum bipartite matching of the support (the generic rank of a matrix with this support)."""
    if not mask.any():
        return 0
    match = maximum_bipartite_matching(csr_matrix(mask.astype(np.int8)), perm_type="column")
    return int((match >= 0).sum())


def geometry(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, float]:
    rows = cols = n_rows = n_cols = rank = full = 0
    lev_num = lev_den = 0.0
    for name, mask in masks.items():
        M = mask.numpy().astype(bool)
        m, n = M.shape
        rows += int(M.any(1).sum())
        cols += int(M.any(0).sum())
        n_rows, n_cols = n_rows + m, n_cols + n
        rank += struct_rank(M)
        full += min(m, n)
        r = max(1, math.ceil(min(m, n) / 16))
        U, _, Vh = torch.linalg.svd(weights[name].double(), full_matrices=False)
        lu = (U[:, :r] ** 2).sum(1).numpy() * m / r
        lv = (Vh[:r] ** 2).sum(0).numpy() * n / r
        i, j = np.nonzero(M)
        lev_num += float((lu[i] * lv[j]).sum())
        lev_den += len(i)
    return {"row_cov": rows / n_rows, "col_cov": cols / n_cols, "struct_rank": rank / full,
            "top_leverage": lev_num / max(lev_den, 1)}


def masks_for(problem, scorer: str, budget: float, seed: int = 0) -> dict[str, torch.Tensor]:
    from methods import METHODS, select_masks

    if scorer in ("random", "grad"):
        return dict(METHODS[scorer].masks(problem, budget, seed))
    if scorer == "mix50":
        return dict(select_masks(problem, budget, seed, random_share=0.5, seeded=True).items())
    return dict(select_masks(problem, budget, seed, score=scorer).items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="digits,planted_sparse,minilm")
    ap.add_argument("--budgets", default="0.01,0.05")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--out", default=str(HERE / "results-selection" / "diagnosis.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from run import _problem

    rows = []
    for task in args.tasks.split(","):
        problem = _problem(task, 0, False)
        weights = {n: m.weight.detach() for n, m in problem.target_modules().items()}
        for b in (float(x) for x in args.budgets.split(",")):
            for scorer in args.scorers.split(","):
                g = geometry(masks_for(problem, scorer, b), weights)
                rows.append({"task": task, "budget": b, "scorer": scorer, **g})
                print(f"{task:15s} {b:<6g} {scorer:11s} " + " ".join(f"{k}={v:.3f}" for k, v in g.items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
