"""``frogwatch analyze [MODEL] [--out DIR] [--format csv|parquet|json] [--quiet]``."""

from __future__ import annotations

import pandas as pd

from ..analyze import analyze, summary
from ._common import add_model_argument, atomic_write, resolve_model

TABLE_COLUMNS = ["name", "layer_type", "M", "N", "alpha", "D", "log_spectral_norm",
                 "log_norm", "alpha_weighted", "stable_rank", "warning", "status"]  # fmt: skip
FORMATS = ("csv", "parquet", "json")


def add_parser(sub):
    p = sub.add_parser("analyze", help="per-layer spectral diagnostics (alpha, norms, ranks)")
    add_model_argument(p)
    p.add_argument("--out", metavar="DIR", help="write the per-layer table and summary here")
    p.add_argument("--format", choices=FORMATS, default="csv", help="table format (default csv)")
    p.add_argument("--fit", choices=("PL", "TPL"), default="PL", help="tail fit (default PL)")
    p.add_argument("--fix-fingers", choices=("clip_xmax",), default=None)
    p.add_argument("--device", default=None,
                   help="compute on this torch device, e.g. cuda (default: LAPACK on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p


def write_table(df: pd.DataFrame, path, fmt: str) -> None:
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("--format parquet needs pyarrow: pip install pyarrow") from None
    writers = {
        "csv": lambda p: df.to_csv(p, index=False),
        "parquet": lambda p: df.to_parquet(p, index=False),
        "json": lambda p: df.to_json(p, orient="records", indent=1),
    }
    atomic_write(path, writers[fmt])


def run(args) -> int:
    from ..distributed import init_from_env

    started = init_from_env(args.device)  # under torchrun: one share of the matrices per rank
    try:
        return _run(args, distributed=started)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, distributed: bool) -> int:
    from ..distributed import is_rank_zero

    model = resolve_model(args.model)
    df = analyze(model, fit=args.fit, fix_fingers=args.fix_fingers, device=args.device,
                 progress=not args.quiet and is_rank_zero(), distributed=distributed)  # fmt: skip
    if not is_rank_zero():
        return 0
    s = summary(df)
    if not args.quiet:
        with pd.option_context("display.width", 160, "display.max_rows", 500,
                               "display.float_format", "{:.3f}".format):  # fmt: skip
            print(df[TABLE_COLUMNS].to_string(index=False))
    for name, reason in df.attrs.get("skipped", []):  # also with --quiet: skips stay visible
        print(f"skipped {name}: {reason}")
    if not args.quiet:
        print()
    print("summary (mean over analysed non-embedding layers; alpha_weighted = alpha-hat):")
    print(s.to_string(float_format="{:.4f}".format))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        table = out / f"analyze.{args.format}"
        write_table(df, table, args.format)
        atomic_write(out / "summary.json", lambda p: s.to_json(p, indent=1))
        print(f"wrote {table} and {out / 'summary.json'}")
    return 0
