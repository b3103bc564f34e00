"""``frogwatch describe [MODEL] [--device DEV]``: the layers analyze would see, and the run's cost."""

from __future__ import annotations

import pandas as pd

from ._common import add_model_argument, check_model_path, resolve_model


def add_parser(sub):
    p = sub.add_parser("describe", help="list the layers that would be analysed, why any is skipped, "
                       "and estimate the run's time and memory")  # fmt: skip
    add_model_argument(p)
    p.add_argument("--device", default=None, help="estimate for this torch device, e.g. cuda")
    return p


def check(args) -> None:
    check_model_path(args.model)


def run(args) -> int:
    from ..analyze import describe

    df = describe(resolve_model(args.model), device=args.device)
    with pd.option_context("display.width", 160, "display.max_rows", 1000,
                           "display.float_format", "{:.3g}".format):  # fmt: skip
        print(df.to_string(index=False))
    print(f"\n{int(df['analyzed'].sum())} of {len(df)} matrices would be analysed")
    est = df.attrs["estimate"]
    print(f"estimate on {est['device']} with {est['workers']} worker(s): about "
          f"{est['wall_seconds']:.0f} s, peak memory about {est['peak_memory_mb']:.0f} MB above "
          "the process's own (rough: measured rates of a small matrix, BENCHMARKS.md §9)")  # fmt: skip
    too_big = df.loc[df["analyzed"] & ~df["fits_device"], "name"]
    for name in too_big:
        print(f"would not fit {args.device}: {name}")
    return 0
