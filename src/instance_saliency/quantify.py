"""Per-instance numbers from a saliency map: peaks, lesion means and rim (shell) profiles.

Everything is expressed against the *signed distance* from the lesion border, in mm (see
:func:`signed_distance_mm`): positive outside the lesion, negative inside. Rims are 1 mm thick
shells of that distance, as in the instance-level saliency analysis of Spagnolo et al. [1]_,
which reads saliency inside the lesion and in the few millimetres of tissue around it.

All computations run on a crop around the lesion (its bounding box padded by the largest
distance needed, plus one voxel), never on the whole scan; results are identical to a
whole-volume computation (see :func:`signed_distance_mm`).

References
----------
.. [1] F. Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
   segmentation", arXiv:2406.09335, 2024.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ._validate import check_spacing as _check_spacing
from .errors import InputError

__all__ = [
    "signed_distance_mm",
    "shell_means",
    "distance_profile",
    "quantify_instance",
    "quantify_columns",
]

DEFAULT_OUTSIDE_MM = (1, 2, 3, 4, 5)
DEFAULT_INSIDE_MM = (1, 2)


# --------------------------------------------------------------------------------------------
# validation and cropping


def _check_lesion_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 3:
        raise InputError(f"lesion mask must be a 3D array (X, Y, Z), got shape {m.shape}")
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise InputError(f"lesion mask must be boolean or numeric, got dtype {m.dtype}")
        if not ((m == 0) | (m == 1)).all():
            raise InputError("lesion mask is not binary: values other than 0/1 found")
        m = m != 0
    return m


def _check_distance(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a non-negative number (mm), got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{name} must be a non-negative number (mm), got {value!r}")
    return v


def _check_shells(values, name: str) -> tuple:
    try:
        ks = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a sequence of positive distances (mm), "
                         f"got {values!r}") from None
    if not all(math.isfinite(k) and k > 0 for k in ks):
        raise InputError(f"{name} must be a sequence of positive distances (mm), got {values!r}")
    return ks


def _bbox(mask: np.ndarray) -> tuple:
    """Tight bounding box of a non-empty 3D boolean mask, as 3 slices."""
    box = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            raise InputError("lesion mask is empty")
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def _padded_crop(box: tuple, shape: tuple, spacing: tuple, max_distance_mm: float) -> tuple:
    """``box`` grown by ceil(max_distance_mm / spacing) + 1 voxels per axis, clipped."""
    out = []
    for sl, n, sp in zip(box, shape, spacing):
        pad = int(math.ceil(max_distance_mm / sp - 1e-9)) + 1
        out.append(slice(max(sl.start - pad, 0), min(sl.stop + pad, n)))
    return tuple(out)


def _signed_distance(m: np.ndarray, spacing: tuple) -> np.ndarray:
    """Signed distance (mm) on a whole array; see :func:`signed_distance_mm`."""
    if not m.any():
        raise InputError("lesion mask is empty")
    outside = ndimage.distance_transform_edt(~m, sampling=spacing)
    if m.all():  # no background voxel anywhere: inside distance undefined
        return np.full(m.shape, -np.inf)
    inside = ndimage.distance_transform_edt(m, sampling=spacing)
    return outside - inside


def _prepare(mask, spacing, max_distance_mm):
    """Validated mask, spacing, crop slices and the signed distance on the crop."""
    m = _check_lesion_mask(mask)
    sp = _check_spacing(spacing)
    crop = _padded_crop(_bbox(m), m.shape, sp, max_distance_mm)
    return m, sp, crop, _signed_distance(m[crop], sp)


def _check_map3d(saliency_3d, shape: tuple, crop: tuple) -> np.ndarray:
    s = np.asarray(saliency_3d)
    if s.shape != shape:
        raise InputError(f"saliency map shape {s.shape} differs from mask shape {shape}")
    c = np.asarray(s[crop], dtype=np.float64)
    if not np.isfinite(c).all():
        raise InputError("saliency map has NaN or infinite values around the lesion")
    return c


# --------------------------------------------------------------------------------------------
# public functions


def signed_distance_mm(mask, spacing, max_distance_mm: float | None = None):
    """Signed Euclidean distance (mm) from the border of one lesion, on a crop around it.

    Parameters
    ----------
    mask : array_like of bool, shape (X, Y, Z)
        Binary mask of one lesion (any other voxel, including other lesions, is background).
    spacing : sequence of 3 float
        Voxel spacing in mm along the array axes.
    max_distance_mm : float, optional
        Largest outside distance the caller needs. The crop is the lesion's bounding box
        grown by ``ceil(max_distance_mm / spacing[i]) + 1`` voxels along axis ``i`` (clipped
        to the array), which contains every voxel at distance <= ``max_distance_mm``. None
        computes on the whole array.

    Returns
    -------
    distance : ndarray, float64, shape of the crop
        Signed distance ``d`` in mm between voxel centres:

        * outside the lesion, ``d = +`` distance to the nearest lesion voxel (so at 1 mm
          isotropic spacing the face neighbours of the lesion are at 1 mm, edge neighbours at
          sqrt(2) mm);
        * inside, ``d = -`` distance to the nearest background voxel (the outermost lesion
          voxels are at -1 mm at 1 mm spacing).

        ``d`` is never 0. Every value in the crop is the exact whole-array value (also beyond
        ``max_distance_mm``; voxels outside the crop are all farther than
        ``max_distance_mm``). Voxels outside the array are not background: a lesion touching
        the array border measures inside distances to in-array background only. A lesion
        filling the whole array gets ``-inf`` inside.
    crop : tuple of 3 slice
        Where the crop lies in the full array: ``distance`` pairs with ``array[crop]``.

    Raises
    ------
    InputError
        Mask not 3D, not binary or empty; invalid spacing or ``max_distance_mm``.
    """
    m = _check_lesion_mask(mask)
    sp = _check_spacing(spacing)
    if max_distance_mm is None:
        crop = tuple(slice(0, n) for n in m.shape)
        return _signed_distance(m, sp), crop
    md = _check_distance(max_distance_mm, "max_distance_mm")
    crop = _padded_crop(_bbox(m), m.shape, sp, md)
    return _signed_distance(m[crop], sp), crop


def _shell_masks(d: np.ndarray, outside_mm: tuple, inside_mm: tuple):
    outs = [(d > max(k - 1.0, 0.0)) & (d <= k) for k in outside_mm]
    ins = [(d >= -k) & (d < -max(k - 1.0, 0.0)) for k in inside_mm]
    return outs, ins


def _mean(values: np.ndarray, sel: np.ndarray) -> float:
    n = int(sel.sum())
    return float(values[sel].sum() / n) if n else float("nan")


def shell_means(saliency_3d, mask, spacing, outside_mm=DEFAULT_OUTSIDE_MM,
                inside_mm=DEFAULT_INSIDE_MM):
    """Mean saliency in 1 mm shells outside and inside one lesion.

    Parameters
    ----------
    saliency_3d : array_like, shape (X, Y, Z)
        Saliency of one channel (any units).
    mask : array_like of bool, shape (X, Y, Z)
        Binary mask of the lesion.
    spacing : sequence of 3 float
        Voxel spacing in mm.
    outside_mm : sequence of float
        Outer radii ``k`` (mm, > 0) of the outside shells. With ``d`` the signed distance of
        :func:`signed_distance_mm`, outside shell ``k`` holds the voxels with
        ``max(k-1, 0) < d <= k``.
    inside_mm : sequence of float
        Depths ``k`` (mm, > 0) of the inside shells: inside shell ``k`` holds the voxels with
        ``-k <= d < -max(k-1, 0)``.

    Returns
    -------
    outside : ndarray, float64, shape (len(outside_mm),)
        Mean saliency per outside shell; NaN for an empty shell.
    inside : ndarray, float64, shape (len(inside_mm),)
        Mean saliency per inside shell; NaN for an empty shell.

    Raises
    ------
    InputError
        Shapes differ, mask empty or not binary, NaN/Inf saliency near the lesion, invalid
        spacing or shell radii.

    Notes
    -----
    At 1 mm isotropic spacing, outside shell 1 is the lesion's face neighbours (d = 1),
    shell 2 holds d in (1, 2] (edge and corner neighbours at sqrt(2), sqrt(3), the second
    face layer at 2), and so on. With coarser spacing along an axis, a shell may hold no
    voxel along that axis (e.g. 2 mm slices: the first slice above the lesion is at d = 2).
    """
    outside_mm = _check_shells(outside_mm, "outside_mm")
    inside_mm = _check_shells(inside_mm, "inside_mm")
    m, sp, crop, d = _prepare(mask, spacing, max(outside_mm, default=0.0))
    s = _check_map3d(saliency_3d, m.shape, crop)
    outs, ins = _shell_masks(d, outside_mm, inside_mm)
    return (np.array([_mean(s, o) for o in outs], dtype=np.float64),
            np.array([_mean(s, i) for i in ins], dtype=np.float64))


def distance_profile(saliency_3d, mask, spacing, bins_mm):
    """Mean saliency per signed-distance bin around one lesion (for profile plots).

    Parameters
    ----------
    saliency_3d : array_like, shape (X, Y, Z)
        Saliency of one channel.
    mask : array_like of bool, shape (X, Y, Z)
        Binary mask of the lesion.
    spacing : sequence of 3 float
        Voxel spacing in mm.
    bins_mm : sequence of float, length B+1
        Strictly increasing bin edges in mm of signed distance (negative = inside, see
        :func:`signed_distance_mm`), e.g. ``np.arange(-3, 6)``. Each bin is closed on the side
        away from the lesion border, matching :func:`shell_means`: a bin with edges
        ``e0 < e1`` holds ``e0 < d <= e1`` when ``e0 >= 0``, ``e0 <= d < e1`` when ``e1 <= 0``,
        and ``e0 <= d <= e1`` when it straddles 0. Voxels outside all bins are ignored.

    Returns
    -------
    centres : ndarray, float64, shape (B,)
        Bin centres, mm.
    means : ndarray, float64, shape (B,)
        Mean saliency per bin; NaN for an empty bin.
    counts : ndarray, int64, shape (B,)
        Number of voxels per bin.

    Raises
    ------
    InputError
        Fewer than 2 edges, edges not finite and strictly increasing, shapes differ, mask
        empty or not binary, NaN/Inf saliency near the lesion, invalid spacing.
    """
    try:
        edges = np.asarray(bins_mm, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"bins_mm must be increasing numbers (mm), got {bins_mm!r}") from None
    if edges.size < 2 or not np.isfinite(edges).all() or not (np.diff(edges) > 0).all():
        raise InputError("bins_mm must hold at least 2 finite, strictly increasing edges (mm)")
    m, sp, crop, d = _prepare(mask, spacing, max(float(edges[-1]), 0.0))
    s = _check_map3d(saliency_3d, m.shape, crop)
    nb = edges.size - 1
    idx = np.where(d > 0, np.searchsorted(edges, d, side="left") - 1,
                   np.searchsorted(edges, d, side="right") - 1)
    ok = (idx >= 0) & (idx < nb)
    counts = np.bincount(idx[ok], minlength=nb).astype(np.int64)
    sums = np.bincount(idx[ok], weights=s[ok], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return (edges[:-1] + edges[1:]) / 2, means, counts


def _saliency_array(saliency, chs) -> np.ndarray:
    """``saliency`` as a ``(C, X, Y, Z)`` array with one channel per name in ``chs``.

    Raises
    ------
    InputError
        Not 4D, or a channel count that differs from the names.
    """
    s_full = np.asarray(saliency)
    if s_full.ndim != 4:
        raise InputError(f"saliency must have shape (C, X, Y, Z), got {s_full.shape}")
    if s_full.shape[0] != len(chs):
        raise InputError(f"saliency has {s_full.shape[0]} channels but {len(chs)} channel "
                         f"names were given")
    return s_full


def _names(method: str, channel_names) -> tuple:
    if not isinstance(method, str) or not method.strip():
        raise InputError(f"method must be a non-empty name, got {method!r}")
    if isinstance(channel_names, str):
        channel_names = (channel_names,)
    chs = tuple(str(c).strip().lower() for c in channel_names)
    if not chs or any(not c for c in chs) or len(set(chs)) != len(chs):
        raise InputError(f"channel_names must be distinct non-empty names, got {channel_names!r}")
    return method.strip().lower(), chs


def quantify_columns(method: str = "smoothgrad", channel_names=("FLAIR", "MPRAGE"),
                     outside_mm=DEFAULT_OUTSIDE_MM, inside_mm=DEFAULT_INSIDE_MM) -> list:
    """Column names produced by :func:`quantify_instance`, in order.

    Returns
    -------
    list of str
        For each channel ``ch`` (lowercased): ``{method}_{ch}_peak_max``, ``_peak_min``,
        ``_mean_in``, ``_sum_in``, ``_sum_abs``, ``_rim_out_{k}mm`` for ``k`` in ``outside_mm``,
        ``_rim_in_{k}mm`` for ``k`` in ``inside_mm`` (``k`` formatted with ``%g``); then,
        for two or more channels only, ``{method}_{ch0}_share`` (a single channel's share
        would always be 1).
    """
    method, chs = _names(method, channel_names)
    outside_mm = _check_shells(outside_mm, "outside_mm")
    inside_mm = _check_shells(inside_mm, "inside_mm")
    cols = []
    for ch in chs:
        p = f"{method}_{ch}"
        cols += [f"{p}_peak_max", f"{p}_peak_min", f"{p}_mean_in", f"{p}_sum_in",
                 f"{p}_sum_abs"]
        cols += [f"{p}_rim_out_{k:g}mm" for k in outside_mm]
        cols += [f"{p}_rim_in_{k:g}mm" for k in inside_mm]
    if len(chs) >= 2:
        cols.append(f"{method}_{chs[0]}_share")
    return cols


def quantify_instance(saliency, mask, spacing, channel_names=("FLAIR", "MPRAGE"),
                      method: str = "smoothgrad", share_margin_mm: float = 2.0,
                      peak_margin_mm: float = 3.0, outside_mm=DEFAULT_OUTSIDE_MM,
                      inside_mm=DEFAULT_INSIDE_MM) -> dict:
    """Per-instance saliency numbers for one lesion, all channels.

    Parameters
    ----------
    saliency : array_like, shape (C, X, Y, Z)
        Signed saliency map of this instance, one channel per input modality.
    mask : array_like of bool, shape (X, Y, Z)
        Exact binary mask of the instance (e.g. :func:`instance_saliency.instances.instance_mask`).
    spacing : sequence of 3 float
        Voxel spacing in mm.
    channel_names : sequence of str, length C
        Channel names, used lowercased in the keys.
    method : str
        Saliency method name, used lowercased as key prefix (``"smoothgrad"``, ``"gradcampp"``).
    share_margin_mm : float
        The channel share is computed over the lesion dilated by this margin (voxels with
        signed distance ``d <= share_margin_mm``).
    peak_margin_mm : float
        Peaks are taken over the lesion's neighbourhood: voxels with ``d <= peak_margin_mm``
        (the lesion dilated by 3 mm by default), since the paper reads peak saliency around,
        not only inside, the lesion.
    outside_mm, inside_mm : sequence of float
        Shell radii, see :func:`shell_means`.

    Returns
    -------
    dict
        Keys from :func:`quantify_columns`, values float. Per channel ``ch``:

        * ``{method}_{ch}_peak_max`` / ``_peak_min``: max / min saliency with
          ``d <= peak_margin_mm``;
        * ``_mean_in`` / ``_sum_in``: mean / sum over the lesion voxels;
        * ``_sum_abs``: sum of ``|S|`` over ``d <= share_margin_mm`` (the region of the
          share below; the magnitude compared between modalities);
        * ``_rim_out_{k}mm``: mean over outside shell ``max(k-1,0) < d <= k``;
        * ``_rim_in_{k}mm``: mean over inside shell ``-k <= d < -max(k-1,0)``;

        and, for two or more channels, ``{method}_{ch0}_share`` = sum|S_ch0| / sum over all
        channels of sum|S_c|, over ``d <= share_margin_mm`` (for FLAIR + MPRAGE: the FLAIR
        share; no share for a single channel such as Grad-CAM++ ``cam``). Empty shells and a
        share with all-zero saliency are NaN.

    Raises
    ------
    InputError
        Saliency not 4D, spatial shape differing from the mask, channel count differing from
        ``channel_names``, NaN/Inf saliency near the lesion, empty or non-binary mask, invalid
        spacing, margins or shell radii.

    Notes
    -----
    Computed on a crop around the lesion (bounding box padded by the largest distance
    needed plus one voxel); identical to a whole-volume computation.

    References
    ----------
    .. [1] F. Spagnolo et al., arXiv:2406.09335, 2024.
    """
    method, chs = _names(method, channel_names)
    outside_mm = _check_shells(outside_mm, "outside_mm")
    inside_mm = _check_shells(inside_mm, "inside_mm")
    share_margin_mm = _check_distance(share_margin_mm, "share_margin_mm")
    peak_margin_mm = _check_distance(peak_margin_mm, "peak_margin_mm")
    s_full = _saliency_array(saliency, chs)
    max_d = max(max(outside_mm, default=0.0), share_margin_mm, peak_margin_mm)
    m, sp, crop, d = _prepare(mask, spacing, max_d)
    if s_full.shape[1:] != m.shape:
        raise InputError(f"saliency spatial shape {s_full.shape[1:]} differs from mask shape "
                         f"{m.shape}")
    s = np.asarray(s_full[(slice(None),) + crop], dtype=np.float64)
    if not np.isfinite(s).all():
        raise InputError("saliency map has NaN or infinite values around the lesion")

    inside = d < 0
    peak_region = d <= peak_margin_mm
    share_region = d <= share_margin_mm
    outs, ins = _shell_masks(d, outside_mm, inside_mm)
    n_in = int(inside.sum())
    row = {}
    abs_sums = []
    for c, ch in enumerate(chs):
        sc = s[c]
        p = f"{method}_{ch}"
        vals = sc[peak_region]
        row[f"{p}_peak_max"] = float(vals.max())
        row[f"{p}_peak_min"] = float(vals.min())
        sum_in = float(sc[inside].sum())
        row[f"{p}_sum_in"] = sum_in
        row[f"{p}_mean_in"] = sum_in / n_in
        for k, o in zip(outside_mm, outs):
            row[f"{p}_rim_out_{k:g}mm"] = _mean(sc, o)
        for k, i in zip(inside_mm, ins):
            row[f"{p}_rim_in_{k:g}mm"] = _mean(sc, i)
        abs_sums.append(float(np.abs(sc[share_region]).sum()))
        row[f"{p}_sum_abs"] = abs_sums[-1]
    if len(chs) >= 2:
        total = sum(abs_sums)
        row[f"{method}_{chs[0]}_share"] = abs_sums[0] / total if total > 0 else float("nan")
    cols = quantify_columns(method, chs, outside_mm, inside_mm)
    return {k: row[k] for k in cols}
