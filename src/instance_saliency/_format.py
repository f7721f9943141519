"""Short text of numbers for titles, legends and Markdown tables (shared by stats and report)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fmt_number", "round_table"]


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


#: significant digits of saliency quantities in the CSV tables (see :func:`round_table`)
SALIENCY_DIGITS = 4


def _sig(v, digits: int):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if not math.isfinite(f) or f == 0:
        return f
    return float(f"{f:.{digits}g}")


def round_table(table):
    """A copy of a lesion table with every number rounded to what it supports.

    * Saliency quantities (``{method}_{channel}_peak_max``, ``_mean_in``, rim and profile
      means, ...) and any other float column: :data:`SALIENCY_DIGITS` significant digits. The
      maps are float32 (about 7 digits) and SmoothGrad's Monte-Carlo error with N noise
      samples is of the order of 1/sqrt(N) of the map, far above 1e-4 relative.
    * Probabilities (``prob_*``, ``flagger_prob_fp``, ...), ``iou`` and shares (``*_share``):
      4 decimals.
    * Positions (``centroid_*``) and ``distance_mm``: 0.01 (voxel or mm).
    * Volumes (``*_mm3``): 0.001 mm^3.
    * Integers, text and booleans are left as they are.

    Parameters
    ----------
    table : pandas.DataFrame

    Returns
    -------
    pandas.DataFrame
        Same shape and columns; full-precision values are kept only in the input.
    """
    import pandas as pd

    out = table.copy()
    for col in out.columns:
        s = out[col]
        if not pd.api.types.is_float_dtype(s):
            continue
        name = str(col)
        if "prob" in name.split("_") or name == "iou" or name.endswith("_share"):
            out[col] = s.round(4)
        elif name.startswith("centroid_") or name == "distance_mm":
            out[col] = s.round(2)
        elif name.endswith("_mm3"):
            out[col] = s.round(3)
        else:
            out[col] = [_sig(v, SALIENCY_DIGITS) for v in s]
    return out
