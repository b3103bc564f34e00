"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result into place, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
