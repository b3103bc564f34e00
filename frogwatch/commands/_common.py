"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

from typing import Any

from .._io import atomic_write  # noqa: F401  (re-exported for the subcommands)


def add_model_argument(parser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model path: .safetensors file, sharded dir with its index, .bin/.pt, or a Hugging "
        "Face model dir (default: the embedded pretrained all-MiniLM-L6-v2)",
    )


def resolve_model(arg: str | None) -> Any:
    """A path string as given, or the embedded default model when no path is given."""
    if arg is None:
        from ..sources import load_default_model

        return load_default_model()
    return arg
