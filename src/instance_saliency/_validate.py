"""Argument checks shared by several modules (each raises :class:`InputError`)."""

from __future__ import annotations

import math

from .errors import InputError

__all__ = ["check_spacing"]


def check_spacing(spacing, name: str = "spacing") -> tuple:
    """Return ``spacing`` as a tuple of 3 floats, refusing anything but 3 positive finite numbers.

    Raises
    ------
    InputError
        ``"{name} must be 3 positive numbers (mm), got ..."``.
    """
    try:
        s = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 positive numbers (mm), got {spacing!r}") from None
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise InputError(f"{name} must be 3 positive numbers (mm), got {spacing!r}")
    return s
