"""Helpers shared by the CLI subcommands: model arguments and checks made before any work."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .._io import atomic_write  # noqa: F401  (re-exported for the subcommands)


def add_model_argument(parser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model path: .safetensors file, sharded dir with its index, .bin/.pt, .gguf, or a Hugging "
        "Face model dir (default: the embedded pretrained all-MiniLM-L6-v2)",
    )


def resolve_model(arg: str | None) -> Any:
    """A path string as given, or the embedded default model when no path is given."""
    if arg is None:
        from ..sources import load_default_model

        return load_default_model()
    return arg


def check_model_path(arg: str | None, what: str = "model") -> None:
    """Fail now, not after minutes of work, when a model path does not exist."""
    if arg is not None and not Path(arg).exists():
        raise FileNotFoundError(f"{arg}: no such file or directory ({what})")


def check_input_file(arg: str | None, what: str) -> None:
    if arg is not None and not Path(arg).is_file():
        raise FileNotFoundError(f"{arg}: no such file ({what})")


def check_output(path: str | os.PathLike | None, *, directory: bool = False, option: str = "--out") -> None:
    """Raise if ``path`` cannot be written: a parent that is a file, a directory where a file
    should go (or the reverse), or a parent directory that is not writable."""
    if path is None:
        return
    p = Path(path)
    if p.exists():
        if directory and not p.is_dir():
            raise ValueError(f"{option} {str(p)!r} is an existing file, not a directory")
        if not directory and p.is_dir():
            raise ValueError(f"{option} {str(p)!r} is a directory; give a file name")
    parent = p if directory else p.parent
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise ValueError(f"{option} {str(p)!r}: {str(anc)!r} is a file, not a directory")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {str(p)!r}: cannot write in {str(anc)!r} (permission denied)")
            break


def check_figure_path(path: str | None, option: str) -> None:
    if path is None:
        return
    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"{option} {path!r} must end in .png, .svg or .pdf")
    check_output(path, option=option)


def _argument_type(name: str, convert, accept, kind: str, bound: str):
    """An argparse ``type``: ``convert(text)`` that ``accept`` holds for (argument errors exit 2
    before any work); ``kind`` names what cannot be parsed, ``bound`` what is out of range."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if not accept(v):
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text}")
        return v

    return parse


def fraction_in_unit_interval(name: str):
    """An argparse ``type`` for a float in [0, 1]."""
    return _argument_type(name, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "in [0, 1]")


def positive_int(name: str):
    """An argparse ``type`` for an integer >= 1."""
    return _argument_type(name, int, lambda v: v >= 1, "a positive integer", "a positive integer")


def stage_bar(stages: list[str], enabled: bool, desc: str):
    """A tqdm bar over the named stages of a long command (analyses, figures, ...)."""
    from tqdm.auto import tqdm

    return tqdm(total=len(stages), desc=desc, unit="step", disable=not enabled, leave=False)
