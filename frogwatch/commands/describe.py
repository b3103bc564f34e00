"""``frogwatch describe [MODEL]``: the layers analyze would see, without any SVD."""

from __future__ import annotations

import pandas as pd

from ._common import add_model_argument, check_model_path, resolve_model


def add_parser(sub):
    p = sub.add_parser("describe", help="list the layers that would be analysed, and why any is skipped")
    add_model_argument(p)
    return p


def check(args) -> None:
    check_model_path(args.model)


def run(args) -> int:
    from ..analyze import describe

    df = describe(resolve_model(args.model))
    with pd.option_context("display.width", 160, "display.max_rows", 1000):
        print(df.to_string(index=False))
    print(f"\n{int(df['analyzed'].sum())} of {len(df)} matrices would be analysed")
    return 0
