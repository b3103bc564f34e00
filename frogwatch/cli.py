"""``frogwatch`` command line: one subcommand per public API function, thin over the API.

Each subcommand lives in ``frogwatch/commands/<name>.py`` and provides ``add_parser(subparsers)``
and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .sources import SourceError

COMMANDS = ("analyze", "describe", "select", "compare", "report", "distances", "smooth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frogwatch",
        description="Data-free spectral diagnostics and FROG sparse fine-tuning for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"frogwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"frogwatch.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"frogwatch.commands.{name}":
                continue
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (SourceError, ValueError, FileNotFoundError) as e:
        print(f"frogwatch {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
