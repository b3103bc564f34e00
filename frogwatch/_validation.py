"""Parameter validation for every public function, in the scikit-learn manner.

A wrong *type* raises ``TypeError``, a value of the right type that is out of range or not one of
the options raises ``ValueError``. Both use one message format::

    {func}: {name} must be {expected}, got {value!r}

Each checker returns the value normalised to a plain Python type (``np.int64(3)`` -> ``3``), so
callers can store and serialise it without further conversion.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, TypeVar

import numpy as np

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_float",
    "check_int",
    "fail_type",
    "fail_value",
]

T = TypeVar("T")


def _message(func: str, name: str, expected: str, value: Any) -> str:
    shown = value if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return f"{func}: {name} must be {expected}, got {shown!r}"


def fail_type(func: str, name: str, expected: str, value: Any) -> TypeError:
    """The ``TypeError`` for a wrong type (returned, so that callers write ``raise fail_type(...)``)."""
    return TypeError(_message(func, name, expected, value))


def fail_value(func: str, name: str, expected: str, value: Any) -> ValueError:
    """The ``ValueError`` for a bad value of the right type."""
    return ValueError(_message(func, name, expected, value))


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def _in_range(x: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (x <= low if low_open else x < low):
        return False
    if high is not None and (x >= high if high_open else x > high):
        return False
    return True


def check_int(
    value: Any,
    name: str,
    func: str,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """An integer (Python or NumPy, never ``bool``) in ``[low, high]``.

    Raises
    ------
    TypeError
        ``value`` is not an integer (``True``, ``1.0`` and ``"1"`` are not).
    ValueError
        ``value`` is outside ``[low, high]``.
    """
    if value is None and allow_none:
        return None
    expected = "an int" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail_type(func, name, expected, value)
    value = int(value)
    if not _in_range(value, low, high, False, False):
        raise fail_value(func, name, f"an int {_range_text(low, high, False, False)}", value)
    return value


def check_float(
    value: Any,
    name: str,
    func: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A finite real number (int or float, Python or NumPy, never ``bool``) in the given range.

    Raises
    ------
    TypeError
        ``value`` is not a real number.
    ValueError
        ``value`` is NaN, infinite or outside the range.
    """
    if value is None and allow_none:
        return None
    expected = "a number" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail_type(func, name, expected, value)
    value = float(value)
    if not math.isfinite(value):
        raise fail_value(func, name, "a finite number", value)
    if not _in_range(value, low, high, low_open, high_open):
        raise fail_value(func, name, f"a number {_range_text(low, high, low_open, high_open)}", value)
    return value


def check_bool(value: Any, name: str, func: str) -> bool:
    """``True`` or ``False`` (NumPy's ``bool_`` too); ``0``/``1`` and strings are refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise fail_type(func, name, "a bool", value)


def check_choice(
    value: Any,
    name: str,
    func: str,
    options: Iterable[T],
    *,
    normalize: Callable[[str], str] | None = None,
    allow_none: bool = False,
) -> T | None:
    """One of ``options`` (strings); ``normalize`` (e.g. ``str.upper``) is applied first.

    Raises
    ------
    TypeError
        ``value`` is not a string.
    ValueError
        ``value`` is not one of the options.
    """
    options = tuple(options)
    shown = ", ".join(repr(o) for o in options) + (" or None" if allow_none else "")
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise fail_type(func, name, f"one of {shown}", value)
    key = normalize(value) if normalize else value
    if key not in options:
        raise fail_value(func, name, f"one of {shown}", value)
    return key


def check_callable(value: Any, name: str, func: str, *, allow_none: bool = False) -> Any:
    """A callable (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise fail_type(func, name, "a callable" + (" or None" if allow_none else ""), value)
    return value
