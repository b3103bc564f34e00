"""``frogwatch analyze [MODEL] [--out DIR] [--format csv|parquet|json] [--fit PL|TPL] [--quiet]``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .._format import float_formatter, fmt_fixed
from ._common import add_model_argument, atomic_write, check_model_path, check_output, resolve_model

TABLE_COLUMNS = ["name", "layer_type", "M", "N", "alpha", "D", "log_spectral_norm",
                 "log_norm", "alpha_weighted", "stable_rank", "warning", "status"]  # fmt: skip
FORMATS = ("csv", "parquet", "json")


def add_parser(sub):
    p = sub.add_parser("analyze", help="per-layer spectral diagnostics (alpha, norms, ranks)")
    add_model_argument(p)
    p.add_argument("--out", metavar="DIR", help="write the per-layer table and summary.json here")
    p.add_argument("--format", choices=FORMATS, default="csv", help="table format (default csv; parquet needs pyarrow)")
    p.add_argument("--fit", choices=("PL", "TPL"), default="PL",
                   help="tail fit: power law (default) or truncated power law")  # fmt: skip
    p.add_argument("--fix-fingers", choices=("clip_xmax", "xmin_peak"), default=None,
                   help="clip_xmax: clip up to 9 outlying top eigenvalues when that lowers alpha by "
                        "more than 1; xmin_peak: search xmin around the ESD's peak")  # fmt: skip
    p.add_argument("--detX", action="store_true", help="add the detX/ERG columns (WeightWatcher's)")
    p.add_argument("--vectors", action="store_true", help="add eigenvector-localisation columns")
    p.add_argument("--tail-tests", action="store_true",
                   help="add power law vs lognormal/exponential likelihood-ratio columns")
    p.add_argument("--farms", action="store_true", help="add alpha_farms (aspect-ratio-free alpha)")
    p.add_argument("--savefig", metavar="DIR", help="save one ESD figure per layer into DIR")
    p.add_argument("--peft", choices=("adapter", "merged"),
                   help="MODEL is a LoRA adapter dir: analyse each B.A alone, or merged with --base")
    p.add_argument("--base", metavar="PATH", help="base model of the adapter (for --peft merged)")
    p.add_argument("--device", default=None,
                   help="compute on this torch device, e.g. cuda (default: LAPACK on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p


def check(args) -> None:
    """Checks made before the model is loaded: the path, the output directory, pyarrow."""
    check_model_path(args.model)
    check_output(args.out, directory=True)
    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("--format parquet needs pyarrow: pip install pyarrow") from None


def write_table(df: pd.DataFrame, path, fmt: str) -> None:
    writers = {
        "csv": lambda p: df.to_csv(p, index=False),
        "parquet": lambda p: df.to_parquet(p, index=False),
        "json": lambda p: df.to_json(p, orient="records", indent=1),
    }
    atomic_write(path, writers[fmt])


def format_summary(s: pd.Series) -> str:
    """The summary as text: counts as integers, means with 4 decimals, no ``-0.0000``."""
    width = max(len(str(k)) for k in s.index)
    lines = []
    for k, v in s.items():
        text = str(int(v)) if str(k).startswith("num_") else fmt_fixed(v, 4)
        lines.append(f"{str(k):<{width}}  {text:>10}")
    return "\n".join(lines)


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
    from ..analyze import analyze, summary
    from ..distributed import is_rank_zero

    model = resolve_model(args.model)
    df = analyze(model, fit=args.fit, fix_fingers=args.fix_fingers, device=args.device,
                 progress=not args.quiet and is_rank_zero(), distributed=distributed,
                 detX=args.detX, vectors=args.vectors, tail_tests=args.tail_tests, farms=args.farms,
                 savefig=args.savefig, peft={"adapter": True}.get(args.peft, args.peft or False),
                 base=args.base)  # fmt: skip
    if not is_rank_zero():
        return 0
    s = summary(df)
    if not args.quiet:
        with pd.option_context("display.width", 160, "display.max_rows", 500,
                               "display.float_format", float_formatter(3)):  # fmt: skip
            print(df[TABLE_COLUMNS].to_string(index=False))
    for name, reason in df.attrs.get("skipped", []):  # also with --quiet: skips stay visible
        print(f"skipped {name}: {reason}")
    if not args.quiet:
        print()
    if args.fit == "TPL":
        print("fit TPL: alpha is the exponent of x^-alpha exp(-Lambda x); the 2-6 reading and the "
              "over-/under-trained labels apply to the plain power law only (docs/method.md#tpl)")  # fmt: skip
    print("summary (mean over analysed non-embedding layers; alpha_weighted = alpha-hat):")
    print(format_summary(s))
    if args.out:
        out = Path(args.out)
        table = out / f"analyze.{args.format}"
        write_table(df, table, args.format)
        atomic_write(out / "summary.json", lambda p: s.to_json(p, indent=1))
        print(f"wrote {table} and {out / 'summary.json'}")
    return 0
