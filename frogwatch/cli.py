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

COMMANDS = ("analyze", "describe", "select", "compare", "report")


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
    except (SourceError, ValueError, OSError) as e:  # OSError: missing file, full disk, read-only
        _close_progress_bars()
        print(f"frogwatch {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """Clear any progress bar an exception left open, so the message gets a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
