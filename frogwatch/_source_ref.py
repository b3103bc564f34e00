"""A light reference from an ``analyze`` table back to the model it came from.

``analyze`` stores one in ``df.attrs["source"]`` so that ``plot_esd(df.iloc[i])`` can recompute that
layer's eigenvalues exactly as ``analyze`` did. pandas deep-copies ``attrs`` on most operations;
this object copies as itself, holds a module only weakly (a table must not keep a model alive),
and pickles as an empty reference.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

__all__ = ["SourceRef"]


class SourceRef:
    """The model source of an ``analyze`` table and the options that shaped its spectra.

    Parameters
    ----------
    source : model source
        A path is kept as is; an object that supports weak references (an ``nn.Module``) is kept
        weakly; anything else (a plain state dict) is not kept.
    method : str
        ``analyze``'s eigenvalue method.
    pool : bool
        ``analyze``'s conv2d pooling.
    """

    def __init__(self, source: Any, method: str = "gram", pool: bool = True) -> None:
        self.method = method
        self.pool = pool
        self.is_path = isinstance(source, (str, os.PathLike))
        self._path = os.fspath(source) if self.is_path else None
        self._ref = None
        if not self.is_path:
            try:
                self._ref = weakref.ref(source)
            except TypeError:
                self._ref = None

    def get(self) -> Any:
        """The model source, or ``None`` when it is gone or was not kept."""
        if self.is_path:
            return self._path
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo: dict) -> "SourceRef":
        return self

    def __reduce__(self):
        return (SourceRef, (self._path, self.method, self.pool)) if self.is_path else (_empty, ())

    def __repr__(self) -> str:
        what = self._path if self.is_path else ("a model" if self.get() is not None else "nothing")
        return f"SourceRef({what!r}, method={self.method!r}, pool={self.pool})"


def _empty() -> SourceRef:
    return SourceRef(None)
