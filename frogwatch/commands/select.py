"""``frogwatch select``: choose the weights FROG fine-tunes and write the masks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import (
    add_model_argument,
    atomic_write,
    check_figure_path,
    check_input_file,
    check_model_path,
    check_output,
    fraction_in_unit_interval,
    positive_int,
    resolve_model,
)

__all__ = ["add_parser", "check", "parse_budget", "run"]

_COLUMNS = ["name", "shape", "k", "fraction", "R", "importance", "selected_score_sum", "alpha", "multiplier"]


def parse_budget(text: str) -> float | int:
    """``"1%"`` -> 0.01, ``"0.01"`` -> 0.01, ``"5000"`` -> 5000 (a count). ``"1"`` is one weight;
    write ``"1.0"`` or ``"100%"`` for all of them. A fraction outside (0, 1] or a count below 1 is
    an argument error (exit status 2), found before the model is loaded."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            value: float | int = float(s[:-1]) / 100.0
        elif s.lstrip("+").isdigit():
            value = int(s)
        else:
            value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid budget {text!r}: use a percentage (1%), a fraction (0.01) or a count (5000)"
        ) from None
    if isinstance(value, int):
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"budget must be a count >= 1 or a fraction in (0, 1] (e.g. 1%), got {text!r}"
            )
    elif not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"budget must be a fraction in (0, 1] or a percentage in (0%, 100%], got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from ..frog.scores import DIRECTIONS, METHODS
    from ..frog.select import DEFAULT_SCORE, SCORES, STRATEGIES

    p = subparsers.add_parser(
        "select",
        help="choose the weights to fine-tune (Frobenius budgets, α blend; random entries by default, --score relevance for FROG's SVD relevance)",
        description=(
            "Split the budget over the targeted matrices by Frobenius share (per_matrix) or rank all "
            "weights at once (global), optionally tilted by each layer's α; pick the entries by --score "
            "(default random: no data-free score beat a random mask in the benchmark; FROG's SVD "
            "relevance with --score relevance); print the per-matrix summary and write the masks."
        ),
    )
    add_model_argument(p)
    p.add_argument("--budget", type=parse_budget, default=0.01, help="1%%, 0.01 or a count (default 1%%)")
    p.add_argument("--strategy", choices=STRATEGIES, default="per_matrix")
    p.add_argument("--score", choices=SCORES, default=DEFAULT_SCORE,
                   help=f"which entries of a matrix to pick (default {DEFAULT_SCORE}: a seeded random mask; "
                        "relevance = FROG's SVD relevance; see README 'Does FROG help?')")
    p.add_argument("--random-share", type=float, default=0.0, metavar="RHO",
                   help="share of each matrix's count drawn at random, the rest by --score (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of --score random and --random-share (default 0)")
    p.add_argument("--min-per-matrix", type=int, default=0, metavar="N",
                   help="give every targeted matrix at least N weights (default 0: none)")
    p.add_argument("--blend", type=fraction_in_unit_interval("--blend"), default=0.0, help="α blend strength λ in [0, 1] (default 0: plain FROG)")
    p.add_argument("--direction", choices=DIRECTIONS, default="undertrained-first")
    p.add_argument(
        "--alpha",
        metavar="CSV",
        help="per-layer α table with columns name,alpha[,status] (default with --blend: run frogwatch analyze)",
    )
    p.add_argument(
        "--targets",
        nargs="+",
        metavar="REGEX",
        help="module-name regexes to target (default: all linear layers but the output head); put MODEL first",
    )
    p.add_argument("--method", choices=METHODS, default="exact", help="how S is computed (default exact SVD)")
    p.add_argument("--rank", type=positive_int("--rank"), help="rank of a truncated / randomized S")
    p.add_argument("--out", metavar="PATH", help="write the masks (safetensors)")
    p.add_argument("--plot", metavar="PNG", help="write the layer-importance chart (per matrix and per block)")
    p.add_argument(
        "--compare-plot",
        metavar="PNG",
        help="also run the other strategy and chart per-matrix and global selection side by side",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _save_figure(fig: Any, path: str) -> None:
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    print(f"wrote {path}")


def _format_summary(masks: Any) -> str:
    df = masks.summary()[_COLUMNS]
    body = df.to_string(
        index=False,
        formatters={
            "fraction": "{:.4%}".format,
            "R": "{:.4f}".format,
            "importance": "{:.4f}".format,
            "selected_score_sum": "{:.4g}".format,
            "alpha": "{:.3f}".format,
            "multiplier": "{:.3f}".format,
        },
    )
    return f"{body}\n{masks!r}"


def check(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model is loaded."""
    check_model_path(args.model)
    check_input_file(args.alpha, "--alpha table")
    check_output(args.out)
    check_figure_path(args.plot, "--plot")
    check_figure_path(args.compare_plot, "--compare-plot")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..frog.select import select

    alpha = None
    if args.alpha:
        alpha = pd.read_csv(args.alpha)
        missing = {"name", "alpha"} - set(alpha.columns)
        if missing:
            raise ValueError(f"--alpha {args.alpha}: the table lacks column(s) {sorted(missing)}")
    model = resolve_model(args.model)
    kwargs = dict(
        targets=args.targets or "all-linear",
        blend=args.blend,
        alpha=alpha,
        direction=args.direction,
        method=args.method,
        rank=args.rank,
        progress=not args.no_progress,
        score=args.score,
        random_share=args.random_share,
        seed=args.seed,
        min_per_matrix=args.min_per_matrix,
    )
    if args.strategy == "global" and args.score == "balanced":  # before any reading
        raise ValueError("--score balanced needs --strategy per_matrix")
    masks = select(model, args.budget, strategy=args.strategy, **kwargs)
    print(_format_summary(masks))
    starved = sum(1 for k in masks.counts().values() if k == 0)
    if starved:
        print(f"note: {starved} of {len(masks)} matrices got no weights; --min-per-matrix N gives each at least N")
    if args.out:
        masks.save(args.out)
        print(f"wrote {args.out}")
    if args.plot or args.compare_plot:
        from ..plots_frog import plot_importance, plot_strategy_comparison

        if args.plot:
            _save_figure(plot_importance(masks), args.plot)
        if args.compare_plot:
            other_strategy = "global" if args.strategy == "per_matrix" else "per_matrix"
            df = masks.summary()
            kwargs["alpha"] = dict(zip(df["name"], df["alpha"]))  # reuse α: analyze runs once
            if kwargs["score"] == "balanced":
                kwargs["score"] = None  # balanced is per-matrix only: the other strategy gets the default
            other = select(model, args.budget, strategy=other_strategy, **kwargs)
            pm, gl = (masks, other) if args.strategy == "per_matrix" else (other, masks)
            _save_figure(plot_strategy_comparison(pm, gl, by="block"), args.compare_plot)
    return 0
