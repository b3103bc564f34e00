"""``frogwatch compare BASE TUNED [--out FILE]``: per-layer before/after table and model summary."""

from __future__ import annotations

import pandas as pd

from .._format import float_formatter
from ._common import atomic_write, check_model_path, check_output, stage_bar

TABLE_COLUMNS = ["name", "alpha_base", "alpha_tuned", "alpha_change", "log_spectral_norm_change",
                 "alpha_weighted_change", "scale_collapse", "dW_fro", "dW_rel", "dW_alpha"]  # fmt: skip


def add_parser(sub):
    p = sub.add_parser("compare", help="compare two models layer by layer (e.g. before/after fine-tuning)")
    p.add_argument("base", metavar="BASE", help="the base model (path)")
    p.add_argument("tuned", metavar="TUNED", help="the tuned model (path), same architecture")
    p.add_argument("--out", metavar="FILE", help="write the full per-layer table as CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only the summary")
    return p


def check(args) -> None:
    """Both paths and the output are checked before the base is analysed."""
    check_model_path(args.base, "BASE")
    check_model_path(args.tuned, "TUNED")
    check_output(args.out)


def run(args) -> int:
    from ..analyze import analyze
    from ..diagnostics.compare import compare_summary, compare_tables
    from ..sources import resolve_source

    progress = not args.quiet
    # frogwatch.compare's steps, one stage each, so a 30-45 s run shows where it is
    with stage_bar(["base", "tuned", "dW"], progress, "frogwatch compare") as bar:
        bar.set_postfix_str("analyze BASE")
        src_b = resolve_source(args.base)
        df_b = analyze(src_b, progress=progress)
        bar.update()
        bar.set_postfix_str("analyze TUNED")
        src_t = resolve_source(args.tuned)
        df_t = analyze(src_t, progress=progress)
        bar.update()
        bar.set_postfix_str("spectra of dW = TUNED - BASE")
        cmp = compare_tables(df_b, df_t, src_b, src_t)
        bar.update()
    with pd.option_context("display.width", 180, "display.max_rows", 500,
                           "display.float_format", float_formatter(4)):  # fmt: skip
        if not args.quiet:
            print(cmp[TABLE_COLUMNS].to_string(index=False))
            print()
        print("model summary (base -> tuned):")
        print(compare_summary(cmp).to_string(na_rep=""))
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
