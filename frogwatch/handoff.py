"""What travels with an ``analyze`` table, and the one check that a table is one.

:func:`frogwatch.analyze` returns a plain :class:`pandas.DataFrame`; everything else it knows is one
:class:`Analysis` object in ``df.attrs["frogwatch"]``:

* ``options`` - the keyword arguments analyze ran with (normalised: ``fit="tpl"`` -> ``"TPL"``);
* ``skipped`` - ``(name, reason)`` of each matrix left out (also in ``df.attrs["skipped"]``);
* ``source`` - the :class:`~frogwatch.sources.ResolvedSource`: the model source with its layer
  list (and, for files, every shard header) read once;
* ``version`` - the frogwatch version that computed the table.

Downstream functions (:func:`frogwatch.correlation_flow`, :func:`frogwatch.compare`,
:func:`frogwatch.report`, the plots) take the table and, where they need weights, the model as a
raw source, a ``ResolvedSource`` or an ``Analysis``; :func:`source_of` turns any of these into the
resolved source without reading a header twice.

pandas deep-copies ``attrs`` on almost every operation (``df.copy()``, ``df[mask]``,
``df.sort_values``...). ``Analysis`` is immutable, so its ``__deepcopy__`` returns itself: a copy of
the table shares the one resolved source instead of copying a model. It is a ``dict`` subclass
whose items are a JSON-safe summary (version, options, skipped), so ``df.to_parquet`` (which
writes ``attrs`` as JSON) and ``pickle`` (which drops the source) keep working.

:func:`check_table` is the one validation of "an analyze table": a DataFrame with the needed
columns, else :class:`NotATableError` (a ``TypeError`` for a non-table, a ``ValueError`` for
missing columns, both caught by either) with one message format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd

from . import __version__
from .sources import ResolvedSource, resolve_source

__all__ = ["ATTRS_KEY", "Analysis", "NotATableError", "analysis_of", "check_table", "source_of"]

ATTRS_KEY = "frogwatch"


class NotATableError(TypeError, ValueError):
    """A function that needs :func:`frogwatch.analyze`'s table got something else."""


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return getattr(value, "__qualname__", None) or type(value).__name__


@dataclass(frozen=True, eq=False)
class Analysis(dict):
    """What :func:`frogwatch.analyze` knew when it built a table (``df.attrs["frogwatch"]``).

    Attributes
    ----------
    options : dict
        Keyword arguments of ``analyze`` as used (after normalisation); ``hooks`` as a tuple.
    skipped : tuple of (str, str)
        ``(name, reason)`` of each matrix not analysed.
    source : ResolvedSource or None
        The resolved model source (``None`` after unpickling: a model is never pickled along).
    version : str
        frogwatch's version.
    """

    options: Mapping[str, Any]
    skipped: tuple[tuple[str, str], ...] = ()
    source: ResolvedSource | None = field(default=None, repr=False)
    version: str = __version__

    def __post_init__(self) -> None:
        dict.update(
            self,
            version=self.version,
            options=_json_safe(dict(self.options)),
            skipped=[list(s) for s in self.skipped],
        )

    @property
    def __frogwatch_source__(self) -> ResolvedSource | None:
        return self.source

    def __deepcopy__(self, memo: dict) -> "Analysis":
        return self  # immutable: copies of the table share it

    def __copy__(self) -> "Analysis":
        return self

    def __reduce__(self):
        return (Analysis, (dict(self.options), self.skipped, None, self.version))


def _describe(value: Any) -> str:
    if isinstance(value, pd.DataFrame):
        return "a DataFrame"
    return type(value).__name__


def check_table(
    df: Any,
    func: str,
    columns: Iterable[str] = ("name", "layer_type", "alpha"),
    *,
    name: str = "df",
    producer: str = "frogwatch.analyze()",
) -> pd.DataFrame:
    """Check that ``df`` is an :func:`frogwatch.analyze` table with ``columns``; return it.

    A table read back from CSV/parquet, filtered or copied passes too: the check is on the
    columns, not on ``attrs``.

    Raises
    ------
    NotATableError
        ``df`` is not a DataFrame, or lacks one of ``columns``. Message:
        ``"{func}: {name} must be a table from frogwatch.analyze() with columns [...], got ..."``
        (``producer`` names another producer, e.g. ``"frogwatch.compare()"``).
    """
    need = list(dict.fromkeys(columns))
    expected = f"a table from {producer} with columns {need}"
    if not isinstance(df, pd.DataFrame):
        raise NotATableError(f"{func}: {name} must be {expected}, got {_describe(df)}")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise NotATableError(f"{func}: {name} must be {expected}, got a DataFrame without {missing}")
    return df


def analysis_of(df: pd.DataFrame) -> Analysis | None:
    """The :class:`Analysis` that travels with an ``analyze`` table (``None`` when lost)."""
    found = df.attrs.get(ATTRS_KEY) if isinstance(df, pd.DataFrame) else None
    return found if isinstance(found, Analysis) else None


def source_of(model: Any = None, df: pd.DataFrame | None = None) -> ResolvedSource | None:
    """The resolved source of ``model`` (raw source, ``ResolvedSource`` or ``Analysis``).

    With ``model=None``, the source stored with ``df`` by ``analyze`` (or ``None``). Resolving is
    done once: a ``ResolvedSource`` (or an ``Analysis`` holding one) is returned as is.
    """
    if model is None:
        a = analysis_of(df) if df is not None else None
        return a.source if a is not None else None
    return resolve_source(model)
