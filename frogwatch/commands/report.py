"""``frogwatch report [MODEL] [--base BASE] [--out DIR]``: one self-contained HTML page + CSVs."""

from __future__ import annotations

from ._common import add_model_argument, check_model_path, check_output, resolve_model


def add_parser(sub):
    p = sub.add_parser(
        "report",
        help="HTML report: summary, correlation flow, traps, figures (and before/after with --base)",
    )
    add_model_argument(p)
    p.add_argument("--base", metavar="BASE", help="the model before fine-tuning, for a before/after section")
    p.add_argument("--out", metavar="DIR", default="frogwatch-report",
                   help="output directory (default frogwatch-report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight shuffles (correlation traps)")
    p.add_argument("--no-randomize", action="store_true", help="skip the correlation-trap analysis")
    p.add_argument("--no-mp-fit", action="store_true", help="skip the Marchenko-Pastur fit")
    p.add_argument("--device", default=None, help="compute eigenvalues on this device (e.g. cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check(args) -> None:
    check_model_path(args.model)
    check_model_path(args.base, "--base")
    check_output(args.out, directory=True)


def run(args) -> int:
    from ..html_report import report

    model = resolve_model(args.model)
    path = report(
        model,
        base=args.base,
        out_dir=args.out,
        randomize=not args.no_randomize,
        mp_fit=not args.no_mp_fit,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"wrote {path}")
    return 0
