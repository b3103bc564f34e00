"""How concentrated FROG's selection is: rows / columns touched vs a random mask of the same size.

``python benchmarks/finetune/mask_geometry.py [--budgets 0.001,0.01]`` (about 10 s on 2 CPU cores).

On the real all-MiniLM-L6-v2 (the 36 ``nn.Linear`` matrices of its 6 encoder layers, the targets of
the MiniLM task), for FROG per-matrix masks and for uniformly random masks with the same k_i:

* the fraction of rows and of columns, over all targeted matrices, that hold at least one
  selected entry;
* for FROG, the share of a matrix's selected entries that lie in its 5 % most-selected rows
  (median over matrices).

Used in ``benchmarks/results_finetune.md`` to explain why FROG's selection adapts less per trainable
weight than a random mask: S = |U| Σ |V|ᵀ is dominated by the leading singular triplet, so its top
entries pile up in the rows and columns where |u₁| and |v₁| are large.
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def geometry(masks: dict[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Rows/columns touched by ``masks`` and by random masks with the same counts."""
    gen = torch.Generator().manual_seed(seed)
    rows = cols = rows_r = cols_r = n_rows = n_cols = 0
    top_share = []
    for mask in masks.values():
        k = int(mask.sum())
        m, n = mask.shape
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=gen)[:k]] = True
        rnd = flat.reshape(mask.shape)
        rows += int(mask.any(1).sum())
        cols += int(mask.any(0).sum())
        rows_r += int(rnd.any(1).sum())
        cols_r += int(rnd.any(0).sum())
        n_rows += m
        n_cols += n
        per_row = mask.sum(1).sort(descending=True).values
        top_share.append(float(per_row[: max(1, m // 20)].sum()) / max(k, 1))
    top_share.sort()
    return {
        "frog_rows": rows / n_rows, "frog_cols": cols / n_cols,
        "random_rows": rows_r / n_rows, "random_cols": cols_r / n_cols,
        "frog_top5pct_rows_share": top_share[len(top_share) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="0.001,0.01")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from frogwatch.frog.select import select
    from frogwatch.sources import load_default_model

    model = load_default_model()
    for b in (float(x) for x in args.budgets.split(",")):
        masks = select(model, b, targets=[r"^encoder\.layer\.\d+\."], progress=False)
        g = geometry(dict(masks.items()))
        print(f"budget {100 * b:g}%: FROG touches {g['frog_rows']:.0%} of rows, {g['frog_cols']:.0%} of columns; "
              f"random (same k_i) {g['random_rows']:.0%} / {g['random_cols']:.0%}; "
              f"median share of FROG's entries in the 5% most-selected rows: {g['frog_top5pct_rows_share']:.0%}")


if __name__ == "__main__":
    main()
