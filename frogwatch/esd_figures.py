"""One ESD figure per analysed layer, saved into a folder (``analyze(..., savefig=DIR)``).

Each figure is :func:`frogwatch.plots.plot_esd` of the layer's eigenvalues with the fit analyze
used, written atomically as ``DIR/<layer name>.png`` (characters other than letters, digits, ``.``,
``_``, ``-`` and ``[]`` become ``_``). The path is reported in the ``esd_figure`` column.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Callable

__all__ = ["esd_figure_hook", "figure_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-\[\]]")


def figure_name(layer_name: str, fmt: str = "png") -> str:
    """File name of a layer's figure: the layer name made safe for every file system."""
    return f"{_UNSAFE.sub('_', layer_name) or 'layer'}.{fmt}"


def esd_figure_hook(folder: str | os.PathLike, fmt: str = "png") -> Callable:
    """An :func:`frogwatch.analyze` hook that saves each layer's ESD figure into ``folder``.

    Parameters
    ----------
    folder : path
        Created if missing.
    fmt : {"png", "svg"}

    Returns
    -------
    callable
        The hook; it adds the column ``esd_figure`` (the file written).
    """
    if fmt not in ("png", "svg"):
        raise ValueError(f"esd_figure_hook: fmt must be 'png' or 'svg', got {fmt!r}")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"analyze: savefig must be a folder path, got {type(folder).__name__!r}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    # analyze runs layers in threads; matplotlib's mathtext parser (pyparsing) is not thread-safe
    lock = threading.Lock()

    def hook(layer, matrices, spec, fit) -> dict:
        from .plots import plot_esd  # matplotlib only when figures are asked for

        path = out / figure_name(layer.name, fmt)
        title = f"{layer.name} ({layer.kind}, {spec.N}x{spec.M})"
        with lock:
            plot_esd(spec, fit, title=title, path=path)
        return {"esd_figure": str(path)}

    return hook
