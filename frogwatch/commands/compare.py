"""``frogwatch compare BASE TUNED [--out FILE]``: per-layer before/after table and model summary."""

from __future__ import annotations

import pandas as pd

from ._common import atomic_write

TABLE_COLUMNS = ["name", "alpha_base", "alpha_tuned", "alpha_change", "log_spectral_norm_change",
                 "alpha_weighted_change", "scale_collapse", "dW_fro", "dW_rel", "dW_alpha"]  # fmt: skip


def add_parser(sub):
    p = sub.add_parser("compare", help="compare two models layer by layer (e.g. before/after fine-tuning)")
    p.add_argument("base", metavar="BASE", help="the base model (path)")
    p.add_argument("tuned", metavar="TUNED", help="the tuned model (path), same architecture")
    p.add_argument("--out", metavar="FILE", help="write the full per-layer table as CSV")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def run(args) -> int:
    from ..comparison import compare
    from ..diagnostics.compare import compare_summary

    cmp = compare(args.base, args.tuned, progress=not args.quiet)
    with pd.option_context("display.width", 180, "display.max_rows", 500,
                           "display.float_format", "{:.4f}".format):  # fmt: skip
        if not args.quiet:
            print(cmp[TABLE_COLUMNS].to_string(index=False))
            print()
        print("model summary (base -> tuned):")
        print(compare_summary(cmp).to_string())
    flagged = cmp.loc[cmp["scale_collapse"], "name"].tolist()
    if flagged:
        print(f"scale collapse against the base: {', '.join(flagged)}")
    for key in ("base_only", "tuned_only"):
        names = cmp.attrs.get(key, [])
        if names:
            print(f"{key.replace('_', ' ')}: {', '.join(names)}")
    if args.out:
        atomic_write(args.out, lambda p: cmp.to_csv(p, index=False))
        print(f"wrote {args.out}")
    return 0
