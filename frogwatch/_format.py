"""Number formatting shared by the command line, the HTML report and the figures.

One rule everywhere: an exact zero prints as ``0`` and a value that rounds to zero never prints
with a minus sign (no ``-0.0000``); NaN prints as an empty string (tables) or ``nan`` (text).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["fmt_number", "fmt_fixed", "float_formatter"]


def fmt_fixed(x: Any, digits: int = 4, nan: str = "nan") -> str:
    """``x`` with ``digits`` decimals; values that round to zero print as ``0`` with no sign."""
    v = float(x)
    if not math.isfinite(v):
        return nan if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v == 0.0:
        return "0"
    s = f"{v:.{digits}f}"
    if float(s) == 0.0:  # -0.00001 -> "-0.0000": drop the sign of a rounded zero
        return s.lstrip("-")
    return s


def fmt_number(x: Any, nan: str = "") -> str:
    """Compact text of one table cell: ints as ints, floats with 3 decimals or 3 significant
    digits when very large or small, booleans as ``yes``/empty, NaN as ``nan`` (default empty)."""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if not math.isfinite(v):
            return nan
        if v == 0.0:
            return "0"
        ax = abs(v)
        if ax >= 1e4 or ax < 1e-3:
            return f"{v:.3g}"
        return fmt_fixed(v, 3)
    return str(x)


def float_formatter(digits: int = 4):
    """A ``float_format`` callable for pandas' ``to_string``: no ``-0.0000``."""
    return lambda v: fmt_fixed(v, digits)
