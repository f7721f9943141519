"""Per-lesion features for flagging segmentation errors: baseline and saliency feature sets.

Two feature sets are compared by :mod:`instance_saliency.flagging`, so that a claim that
saliency "helps identify segmentation errors" [1]_ is tested against what the model already
says about each lesion:

**(a) baseline** (:data:`BASELINE`) — what the segmentation alone gives, per predicted lesion:

* ``log_volume_mm3`` = ln(lesion volume in mm³) (``volume_mm3`` column);
* ``prob_mean``, ``prob_max`` = mean and maximum of the model's lesion probability over the
  lesion's voxels (written by :func:`instance_saliency.explain.explain`);
* ``brain_border_mm`` = distance (mm) from the lesion to the edge of the brain
  (:func:`brain_border_distance`), when the table has it (runs made since it exists).

A baseline feature whose source column is missing from the table is left out (not imputed).

**(b) baseline + saliency of one method** ``m`` (SmoothGrad, Grad-CAM++, any later method):
the baseline plus

* the *summary* numbers of every channel ``ch`` of ``m`` (:func:`summary_features`):
  ``{m}_{ch}_peak_max``, ``_peak_min``, ``_mean_in``, ``_rim_1_3mm`` (mean of the 1, 2 and
  3 mm outside shells) and, for two or more channels, the share ``{m}_{ch0}_share``;
* the *map* features of :func:`map_features`, written into ``instances.csv`` by ``explain``:
  first-order (intensity-histogram) statistics, grey-level co-occurrence (GLCM) and size-zone
  (GLSZM) texture of each channel's map inside the lesion and in its rim, the radiomics
  families RadiomXAI [2]_ reads from the saliency maps to flag false positives.

Map features (:func:`map_features`)
-----------------------------------
Regions, with ``d`` the signed distance from the lesion border in mm
(:func:`instance_saliency.quantify.signed_distance_mm`, positive outside):

* ``in``: the lesion voxels (``d < 0``);
* ``rim``: the shell ``0 < d <= rim_mm`` outside the border (default 3 mm, the rim of the
  seed paper's 1-3 mm analysis [1]_; RadiomXAI's "perilesional" region [2]_).

Grey levels (for the histogram entropy and the GLCM): the map of one channel is discretised
into ``levels`` (default 16) equal-width bins between its minimum and maximum over
``in`` ∪ ``rim`` of that lesion (a fixed bin *count*, as pyradiomics' ``binCount``); a
constant map gets level 0 everywhere. Relative discretisation makes texture independent of
the map's overall scale, which the first-order statistics keep.

First-order statistics of the values ``x_1..x_n`` of a region (``{m}_{ch}_fo_{region}_*``),
following the IBSI / pyradiomics first-order family [3]_:
``mean``; ``sd`` (population, ``ddof=0``); ``skew`` = ``m3 / m2^1.5``; ``kurt`` =
``m4 / m2^2 - 3`` (excess kurtosis; pyradiomics reports ``m4 / m2^2``); ``p10``, ``p50``,
``p90`` (percentiles, linear interpolation); ``iqr`` = ``p75 - p25``; ``rms`` =
``sqrt(mean(x^2))``; ``entropy`` = ``-sum_k q_k log2 q_k`` over the grey-level histogram
``q`` of the region. ``skew`` and ``kurt`` are NaN when ``m2 = 0``; every statistic is NaN for
an empty region.

GLCM texture (``{m}_{ch}_glcm_{region}_*``): co-occurrences of grey levels at distance
1 voxel along the 13 directions of the 26-neighbourhood, counting only pairs with *both*
voxels in the region, summed over the 13 directions into one symmetric matrix (IBSI's
"merged" 3D aggregation [3]_), normalised to probabilities ``P(i, j)``; properties by
:func:`skimage.feature.graycoprops` (Haralick et al. [4]_): ``contrast`` =
``sum P (i-j)^2``, ``dissimilarity`` = ``sum P |i-j|``, ``homogeneity`` =
``sum P / (1 + (i-j)^2)``, ``energy`` = ``sqrt(sum P^2)``, ``correlation`` =
``sum P (i-mu_i)(j-mu_j) / (sigma_i sigma_j)`` (1 when a marginal variance is 0). NaN when
the region holds no such pair (e.g. a one-voxel lesion).

GLSZM texture (``{m}_{ch}_glszm_{region}_*``, IBSI size-zone family [3]_, Thibault et al. [5]_):
zones are the 26-connected components of voxels of one grey level inside the region; with
``N_z`` zones, ``N_v`` voxels, ``s_z`` the size of zone ``z``, ``n_g`` the number of zones of
level ``g`` and ``m_s`` the number of zones of size ``s``: ``sze`` (small zone emphasis) =
``sum_z s_z^-2 / N_z``; ``lze`` (large zone emphasis) = ``sum_z s_z^2 / N_z``; ``glnn``
(normalised grey-level non-uniformity) = ``sum_g n_g^2 / N_z^2``; ``zsnn`` (normalised zone-size
non-uniformity) = ``sum_s m_s^2 / N_z^2``; ``zp`` (zone percentage) = ``N_z / N_v``. NaN for an
empty region.

Maps cropped to a box around the lesion work the same: only the region inside the array is
read, so a rim cut by the box edge is measured on its part inside the box.

References
----------
.. [1] F. Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
   segmentation", arXiv:2406.09335, 2024.
.. [2] F. Spagnolo et al., "Exploiting XAI maps to improve MS lesion segmentation and detection
   in MRI" (RadiomXAI: radiomic features of lesion-wise saliency maps, logistic regression of
   TP versus FP), arXiv:2409.03772, 2024.
.. [3] A. Zwanenburg et al., "The Image Biomarker Standardization Initiative", Radiology
   295(2), 328-338, 2020.
.. [4] R. M. Haralick, K. Shanmugam and I. Dinstein, "Textural features for image
   classification", IEEE Trans. SMC 3(6), 610-621, 1973.
.. [5] G. Thibault et al., "Texture indexes and gray level size zone matrix: application to
   cell nuclei classification", Pattern Recognition and Information Processing (PRIP), 2009.
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = [
    "BASELINE",
    "FIRST_ORDER",
    "GLCM",
    "GLSZM",
    "brain_border_distance",
    "REGIONS",
    "map_feature_columns",
    "map_features",
    "methods_in",
    "baseline_features",
    "summary_features",
    "feature_table",
    "lesion_features",
]

#: baseline feature names (lesion size and the model's own confidence)
BASELINE = ("log_volume_mm3", "prob_mean", "prob_max", "brain_border_mm")
#: first-order statistics of a region's values
FIRST_ORDER = ("mean", "sd", "skew", "kurt", "p10", "p50", "p90", "iqr", "rms", "entropy")
#: GLCM properties (:func:`skimage.feature.graycoprops` names)
GLCM = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
#: GLSZM features (IBSI size-zone family)
GLSZM = ("sze", "lze", "glnn", "zsnn", "zp")
#: regions of the map features: the lesion and its outside rim
REGIONS = ("in", "rim")
#: default rim width (mm) and number of grey levels
RIM_MM = 3.0
LEVELS = 16

_PEAK_RE = re.compile(r"^(.+)_peak_(max|min)$")
#: the 13 offsets of the 26-neighbourhood with one representative per direction
_OFFSETS = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
            if (a, b, c) > (0, 0, 0)]


# --------------------------------------------------------------------------------------------
# map features (computed by explain from each lesion's map)


def map_feature_columns(method: str = "smoothgrad",
                        channel_names: Sequence[str] = ("FLAIR", "MPRAGE")) -> list:
    """Column names of :func:`map_features`, in order.

    Returns
    -------
    list of str
        Per channel ``ch`` (lowercased) and region ``r`` in :data:`REGIONS`:
        ``{method}_{ch}_fo_{r}_{stat}`` for ``stat`` in :data:`FIRST_ORDER`, then
        ``{method}_{ch}_glcm_{r}_{prop}`` for ``prop`` in :data:`GLCM`, then
        ``{method}_{ch}_glszm_{r}_{f}`` for ``f`` in :data:`GLSZM`.
    """
    from .quantify import _names

    method, chs = _names(method, channel_names)
    cols = []
    for ch in chs:
        for r in REGIONS:
            cols += [f"{method}_{ch}_fo_{r}_{s}" for s in FIRST_ORDER]
        for r in REGIONS:
            cols += [f"{method}_{ch}_glcm_{r}_{p}" for p in GLCM]
        for r in REGIONS:
            cols += [f"{method}_{ch}_glszm_{r}_{f}" for f in GLSZM]
    return cols


def _first_order(x: np.ndarray, lv: np.ndarray, levels: int) -> dict:
    """First-order statistics of values ``x`` with grey levels ``lv`` (see module docs)."""
    out = dict.fromkeys(FIRST_ORDER, float("nan"))
    n = x.size
    if n == 0:
        return out
    mu = float(x.mean())
    c = x - mu
    m2 = float(np.mean(c ** 2))
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    q = np.bincount(lv, minlength=levels) / n
    q = q[q > 0]
    out.update(mean=mu, sd=float(np.sqrt(m2)), p10=float(p10), p50=float(p50),
               p90=float(p90), iqr=float(p75 - p25), rms=float(np.sqrt(np.mean(x ** 2))),
               entropy=float(-(q * np.log2(q)).sum()) + 0.0)
    if m2 > 0:
        out["skew"] = float(np.mean(c ** 3) / m2 ** 1.5)
        out["kurt"] = float(np.mean(c ** 4) / m2 ** 2 - 3.0)
    return out


def glcm_matrix(levels_3d: np.ndarray, region: np.ndarray, levels: int) -> np.ndarray:
    """Symmetric 3D grey-level co-occurrence counts, 13 directions merged.

    Parameters
    ----------
    levels_3d : ndarray of int, shape (X, Y, Z)
        Grey level of every voxel, in ``0 .. levels - 1``.
    region : ndarray of bool, shape (X, Y, Z)
        Voxels that count; a pair counts when both voxels are in it.
    levels : int

    Returns
    -------
    ndarray, int64, shape (levels, levels)
        ``C[i, j]`` = number of ordered neighbour pairs (distance 1 voxel, any of the 26
        neighbours) with levels ``i`` and ``j``; symmetric (each unordered pair counted in
        both orders).
    """
    L = np.where(region, levels_3d, -1).astype(np.int64)
    counts = np.zeros(levels * levels, dtype=np.int64)
    shape = L.shape
    for off in _OFFSETS:
        src, dst = [], []
        for o, n in zip(off, shape):
            src.append(slice(max(0, -o), n - max(0, o)))
            dst.append(slice(max(0, o), n - max(0, -o)))
        a, b = L[tuple(src)], L[tuple(dst)]
        ok = (a >= 0) & (b >= 0)
        if ok.any():
            counts += np.bincount(a[ok] * levels + b[ok], minlength=levels * levels)
    m = counts.reshape(levels, levels)
    return m + m.T


def _glcm_props(counts: np.ndarray) -> dict:
    from skimage.feature import graycoprops

    out = dict.fromkeys(GLCM, float("nan"))
    if counts.sum() == 0:
        return out
    P = (counts / counts.sum())[:, :, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for prop in GLCM:
            out[prop] = float(graycoprops(P, prop)[0, 0])
    return out


def glszm_features(levels_3d: np.ndarray, region: np.ndarray, levels: int) -> dict:
    """Size-zone features of the grey levels inside ``region`` (definitions: module docs).

    Parameters
    ----------
    levels_3d : ndarray of int, shape (X, Y, Z)
        Grey level of every voxel, in ``0 .. levels - 1``.
    region : ndarray of bool, shape (X, Y, Z)
    levels : int

    Returns
    -------
    dict
        ``sze``, ``lze``, ``glnn``, ``zsnn``, ``zp`` (NaN for an empty region).
    """
    from scipy import ndimage

    out = dict.fromkeys(GLSZM, float("nan"))
    n_v = int(region.sum())
    if n_v == 0:
        return out
    structure = np.ones((3, 3, 3), dtype=bool)
    sizes, zone_levels = [], []
    for g in np.unique(levels_3d[region]):
        lab, n = ndimage.label(region & (levels_3d == g), structure=structure)
        sz = np.bincount(lab.ravel())[1:]
        sizes.append(sz)
        zone_levels.append(np.full(n, g))
    s = np.concatenate(sizes).astype(np.float64)
    n_z = s.size
    _, per_level = np.unique(np.concatenate(zone_levels), return_counts=True)
    _, per_size = np.unique(s, return_counts=True)
    out.update(sze=float(np.mean(1.0 / s ** 2)), lze=float(np.mean(s ** 2)),
               glnn=float(np.sum(per_level.astype(float) ** 2) / n_z ** 2),
               zsnn=float(np.sum(per_size.astype(float) ** 2) / n_z ** 2), zp=n_z / n_v)
    return out


def brain_border_distance(image, spacing) -> np.ndarray:
    """Distance (mm) of every voxel to the edge of the brain.

    The brain is where any channel is non-zero (the inputs are skull-stripped and background
    stays 0 after normalisation), holes filled (:func:`scipy.ndimage.binary_fill_holes`);
    the distance is the Euclidean distance transform with the voxel spacing: a brain voxel's
    distance to the nearest non-brain voxel (voxel centres; the outermost brain voxels are at
    one voxel spacing), 0 outside the brain. The edge of the array counts as the brain's edge
    (a brain cut by the field of view). Per lesion, explain records the minimum over the
    lesion's voxels (``brain_border_mm``).

    Parameters
    ----------
    image : ndarray, shape (C, X, Y, Z)
        The input channels on the user grid.
    spacing : sequence of 3 float
        Voxel spacing in mm.

    Returns
    -------
    ndarray, float32, shape (X, Y, Z)
    """
    from scipy import ndimage

    brain = ndimage.binary_fill_holes(np.any(np.asarray(image) != 0, axis=0))
    padded = np.pad(brain, 1)  # the edge of the field of view counts as the brain's edge
    d = ndimage.distance_transform_edt(padded, sampling=tuple(float(v) for v in spacing))
    return d[1:-1, 1:-1, 1:-1].astype(np.float32)


def map_features(saliency, mask, spacing, channel_names: Sequence[str] = ("FLAIR", "MPRAGE"),
                 method: str = "smoothgrad", rim_mm: float = RIM_MM,
                 levels: int = LEVELS) -> dict:
    """First-order, GLCM and GLSZM features of one lesion's saliency map, lesion and rim.

    Definitions: see the module docstring (RadiomXAI's feature families [2]_, IBSI [3]_,
    Haralick [4]_).

    Parameters
    ----------
    saliency : array_like, shape (C, X, Y, Z)
        Saliency map of this lesion, one channel per input modality (or one for Grad-CAM++);
        the whole scan or any box around the lesion.
    mask : array_like of bool, shape (X, Y, Z)
        Binary mask of the lesion on the same grid.
    spacing : sequence of 3 float
        Voxel spacing in mm.
    channel_names : sequence of str, length C
    method : str
        Column prefix (lowercased).
    rim_mm : float
        Outer radius of the rim region (mm, > 0).
    levels : int
        Number of grey levels (>= 2).

    Returns
    -------
    dict
        Keys of :func:`map_feature_columns`, float values (NaN where undefined).

    Raises
    ------
    InputError
        Saliency not 4D, channel count or spatial shape differing, NaN/Inf saliency near the
        lesion, empty or non-binary mask, invalid spacing, ``rim_mm`` or ``levels``.
    """
    from .quantify import _names, _saliency_array, signed_distance_mm

    method, chs = _names(method, channel_names)
    s_full = _saliency_array(saliency, chs)
    if not (isinstance(levels, (int, np.integer)) and levels >= 2):
        raise InputError(f"levels must be an integer >= 2, got {levels!r}")
    try:
        rim_mm = float(rim_mm)
    except (TypeError, ValueError):
        rim_mm = float("nan")
    if not (np.isfinite(rim_mm) and rim_mm > 0):
        raise InputError(f"rim_mm must be a positive number (mm), got {rim_mm!r}")
    d, crop = signed_distance_mm(mask, spacing, max_distance_mm=rim_mm)
    if s_full.shape[1:] != np.shape(mask):
        raise InputError(f"saliency spatial shape {s_full.shape[1:]} differs from mask shape "
                         f"{np.shape(mask)}")
    s = np.asarray(s_full[(slice(None),) + crop], dtype=np.float64)
    regions = {"in": d < 0, "rim": (d > 0) & (d <= rim_mm)}
    both = regions["in"] | regions["rim"]
    if not np.isfinite(s[:, both]).all():
        raise InputError("saliency map has NaN or infinite values around the lesion")
    row = {}
    for c, ch in enumerate(chs):
        sc = s[c]
        vals = sc[both]
        lo, hi = float(vals.min()), float(vals.max())
        if hi > lo:
            lv = np.clip(np.floor((sc - lo) / (hi - lo) * levels), 0, levels - 1).astype(np.int64)
        else:
            lv = np.zeros(sc.shape, dtype=np.int64)
        fo, gl, gz = {}, {}, {}
        for r, reg in regions.items():
            fo[r] = _first_order(sc[reg], lv[reg], levels)
            gl[r] = _glcm_props(glcm_matrix(lv, reg, levels))
            gz[r] = glszm_features(lv, reg, levels)
        p = f"{method}_{ch}"
        for r in REGIONS:
            row.update({f"{p}_fo_{r}_{k}": v for k, v in fo[r].items()})
        for r in REGIONS:
            row.update({f"{p}_glcm_{r}_{k}": v for k, v in gl[r].items()})
        for r in REGIONS:
            row.update({f"{p}_glszm_{r}_{k}": v for k, v in gz[r].items()})
    return {k: row[k] for k in map_feature_columns(method, chs)}


# --------------------------------------------------------------------------------------------
# feature tables (from the per-lesion table)


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)


def methods_in(columns: Sequence[str]) -> list:
    """Saliency methods with per-lesion numbers in a table (a ``{m}_{ch}_peak_max`` column),
    in table order (e.g. ``["smoothgrad", "gradcampp"]``)."""
    out = []
    for c in columns:
        m = _PEAK_RE.match(str(c))
        if m and m.group(2) == "max":
            meth = m.group(1).split("_")[0]
            if meth not in out:
                out.append(meth)
    return out


def baseline_features(instances: pd.DataFrame) -> pd.DataFrame:
    """Baseline set (a): the columns of :data:`BASELINE` whose source is in the table.

    ``log_volume_mm3`` = ln(``volume_mm3``) (NaN when the volume is not positive);
    ``prob_mean``, ``prob_max``, ``brain_border_mm`` as written by explain. A feature whose
    source column is missing is left out, so that a flagger needing it refuses the table
    instead of imputing a whole column.
    """
    feats = {}
    if "volume_mm3" in instances:
        vol = _num(instances, "volume_mm3")
        with np.errstate(divide="ignore", invalid="ignore"):
            feats["log_volume_mm3"] = np.where(vol > 0, np.log(np.where(vol > 0, vol, 1)),
                                               np.nan)
    for c in BASELINE[1:]:
        if c in instances:
            feats[c] = _num(instances, c)
    return pd.DataFrame(feats, index=instances.index)


def summary_features(instances: pd.DataFrame, method: str | None = None,
                     rim_mm: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """Summary saliency numbers of ``method`` (all methods when None).

    For every prefix ``p = {method}_{ch}`` with a ``{p}_peak_max`` column: ``{p}_peak_max``,
    ``{p}_peak_min``, ``{p}_mean_in``, ``{p}_rim_1_3mm`` (unweighted mean of the outside shell
    means ``{p}_rim_out_{k}mm`` for ``k`` in ``rim_mm``, NaN shells skipped; named
    ``{p}_rim_mean`` for other ``rim_mm``), and every ``{method}_*_share`` of a method with at
    least two channels (a one-channel share is constant). NaNs are kept.
    """
    feats = {}
    prefixes = [m.group(1) for c in instances.columns
                if (m := _PEAK_RE.match(str(c))) and m.group(2) == "max"
                and (method is None or m.group(1).split("_")[0] == method)]
    by_method: dict = {}
    for p in prefixes:
        feats[f"{p}_peak_max"] = _num(instances, f"{p}_peak_max")
        for suffix in ("peak_min", "mean_in"):
            if f"{p}_{suffix}" in instances:
                feats[f"{p}_{suffix}"] = _num(instances, f"{p}_{suffix}")
        rc = [f"{p}_rim_out_{k:g}mm" for k in rim_mm if f"{p}_rim_out_{k:g}mm" in instances]
        if rc:
            v = np.column_stack([_num(instances, c) for c in rc])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN
                feats[f"{p}_rim_1_3mm" if tuple(rim_mm) == (1, 2, 3)
                      else f"{p}_rim_mean"] = np.nanmean(v, axis=1) if len(v) else v[:, 0]
        by_method.setdefault(p.split("_")[0], []).append(p)
    for meth, ps in by_method.items():
        if len(ps) >= 2:
            for c in instances.columns:
                if str(c).startswith(meth + "_") and str(c).endswith("_share"):
                    feats[str(c)] = _num(instances, str(c))
    return pd.DataFrame(feats, index=instances.index)


def _map_columns(columns: Sequence[str], method: str) -> list:
    pat = re.compile(rf"^{re.escape(method)}_.+_(fo|glcm|glszm)_({'|'.join(REGIONS)})_[a-z0-9]+$")
    return [str(c) for c in columns if pat.match(str(c))]


def feature_table(instances: pd.DataFrame, feature_set: str = "baseline",
                  method: str | None = None) -> pd.DataFrame:
    """The features of one set for every row of a per-lesion table.

    Parameters
    ----------
    instances : pandas.DataFrame
        Per-lesion table (``instances.csv`` of a run, or a pooled cohort table).
    feature_set : {"baseline", "saliency"}
        ``baseline``: :func:`baseline_features`; ``saliency``: the baseline plus
        :func:`summary_features` of ``method`` plus its map-feature columns
        (:func:`map_feature_columns`, those present in the table).
    method : str
        The saliency method of the ``saliency`` set.

    Returns
    -------
    pandas.DataFrame
        One row per input row (same index); NaN where a value is missing.

    Raises
    ------
    InputError
        Unknown ``feature_set``, or ``saliency`` without a method present in the table.
    """
    if feature_set not in ("baseline", "saliency"):
        raise InputError(f"feature set must be 'baseline' or 'saliency', got {feature_set!r}")
    base = baseline_features(instances)
    if feature_set == "baseline":
        return base
    if method is None or method not in methods_in(instances.columns):
        raise InputError(f"no per-lesion {method} saliency columns in the table; available: "
                         f"{', '.join(methods_in(instances.columns)) or 'none'}")
    summ = summary_features(instances, method)
    mp = _map_columns(instances.columns, method)
    maps = pd.DataFrame({c: _num(instances, c) for c in mp}, index=instances.index)
    return pd.concat([base, summ, maps], axis=1)


def lesion_features(instances: pd.DataFrame, include_log_volume: bool = False,
                    rim_mm: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """Features of the legacy all-saliency classifier (:func:`flagging.flag_errors`).

    :func:`summary_features` of every method, plus ``log_volume_mm3`` = ln(volume in mm³)
    when ``include_log_volume``. NaNs are kept (the classifier imputes them inside each
    training fold).

    Returns
    -------
    pandas.DataFrame
        One row per input row, same index.
    """
    feats = summary_features(instances, None, rim_mm)
    if include_log_volume and "volume_mm3" in instances:
        feats["log_volume_mm3"] = baseline_features(instances)["log_volume_mm3"]
    return feats
