"""Short text of numbers for titles, legends and Markdown tables (shared by stats and report)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fmt_number"]


def fmt_number(v, digits: int = 3) -> str:
    """Short text of a number ("–" for None or NaN).

    Integers are shown in full; other numbers with ``digits`` significant digits (one more
    at or above 1), in scientific notation below 1e-3 or from 1e4 on. Anything that is not
    a number is shown as ``str(v)``.
    """
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(v):
        return "–" if math.isnan(v) else str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}"
