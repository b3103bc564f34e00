"""``frogwatch`` command line: one subcommand per public API function, thin over the API.

Each subcommand lives in ``frogwatch/commands/<name>.py`` and provides ``add_parser(subparsers)``
and ``run(args) -> int``; it may also provide ``check(args)``, run before any model is loaded, so
that a bad path or option fails in a second instead of after the analysis.

Errors a user sees are one line on stderr, never a traceback:

* a mistyped command line (unknown option, bad value, out-of-range ``--budget``/``--blend``)
  exits with status 2 after a one-line usage;
* anything else (a missing file, an unreadable model, ``--out`` under an existing file, a
  missing optional package) exits with status 1.

Set ``FROGWATCH_TRACEBACK=1`` to see the full traceback of a runtime error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

COMMANDS = ("analyze", "describe", "select", "compare", "report", "merge", "distances", "smooth")


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: one usage line and one error line, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        usage = f"usage: {self.prog} ... (see {self.prog} --help)"
        if self.prog == "frogwatch":
            usage = f"usage: frogwatch {{{','.join(COMMANDS)}}} ... (see frogwatch --help)"
        self.exit(2, f"{usage}\n{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="frogwatch",
        description="Data-free spectral diagnostics and FROG sparse fine-tuning for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"frogwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"frogwatch.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"frogwatch.commands.{name}":
                continue
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run, _check=getattr(module, "check", None), _parser=p)
    return parser


def error_message(e: BaseException) -> str:
    """One line saying what went wrong, without a traceback."""
    from .sources import SourceError

    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, (ValueError, TypeError, SourceError)) and msg:
        return msg  # frogwatch's own messages already say what and where
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        if args._check is not None:
            args._check(args)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FROGWATCH_TRACEBACK"):
            raise
        _close_progress_bars()
        print(f"frogwatch {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 1


def _close_progress_bars() -> None:
    """Clear any progress bar an exception left open, so the message gets a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
