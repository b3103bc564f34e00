"""``frogwatch smooth MODEL OUT [--layers NAME ...] [--keep tail|INT|FRACTION]``: SVD smoothing."""

from __future__ import annotations

import pandas as pd


def _keep(text: str):
    if text == "tail":
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--keep must be 'tail', an int or a fraction, got {text!r}") from None


def add_parser(sub):
    p = sub.add_parser("smooth", help="rank-reduce layers (default: the over-parameterized ones, keeping their tail)")
    p.add_argument("model", metavar="MODEL", help=".safetensors file or checkpoint directory")
    p.add_argument("out", metavar="OUT", help="new file or directory to write (must not exist)")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="layer names or regexes (default: over-parameterized)")
    p.add_argument("--keep", default="tail", help="'tail' (power-law tail), an int, or a fraction (default tail)")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args) -> int:
    from ..smoothing import smoothing_plan, svd_smoothing

    keep = _keep(args.keep)
    plan = smoothing_plan(args.model, layers=args.layers, keep=keep)
    if plan.empty:
        print("nothing to smooth: no layer selected (no over-parameterized layer by default)")
        return 0
    if not args.quiet:
        with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
            print(plan.to_string(index=False))
    path = svd_smoothing(args.model, layers=args.layers, keep=keep, out=args.out, progress=not args.quiet)
    print(f"wrote {path} ({len(plan)} layers rank-reduced); see what it did: frogwatch compare {args.model} {path}")
    return 0
