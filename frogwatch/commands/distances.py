"""``frogwatch distances A B [--k K] [--out FILE]``: per-layer distances between two models."""

from __future__ import annotations

import pandas as pd

from ._common import atomic_write


def add_parser(sub):
    p = sub.add_parser("distances", help="per-layer distances between two models of the same shapes")
    p.add_argument("a", metavar="A", help="reference model (path)")
    p.add_argument("b", metavar="B", help="other model (path), same layer shapes")
    p.add_argument("--k", type=int, default=10, help="top singular subspaces compared (default 10)")
    p.add_argument("--out", metavar="FILE", help="write the table as CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p


def run(args) -> int:
    from ..model_distances import distances

    df = distances(args.a, args.b, k=args.k, progress=not args.quiet)
    if not args.quiet:
        with pd.option_context("display.width", 180, "display.max_rows", 500,
                               "display.float_format", "{:.4g}".format):  # fmt: skip
            print(df.to_string(index=False))
    print(f"{len(df)} layers: mean rel {df['rel'].mean():.4g}, mean cka {df['cka'].mean():.4f}, "
          f"max angle (out/in) {df['angle_out_max'].max():.1f}/{df['angle_in_max'].max():.1f} deg")
    for key in ("a_only", "b_only", "mismatched"):
        if df.attrs.get(key):
            print(f"{key.replace('_', ' ')}: {', '.join(df.attrs[key])}")
    if args.out:
        atomic_write(args.out, lambda p: df.to_csv(p, index=False))
        print(f"wrote {args.out}")
    return 0
