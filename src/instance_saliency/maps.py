"""Per-lesion saliency maps on disk: cropped ("compact") or full-grid NIfTI files.

A lesion's saliency map is non-zero over the network windows that touch the lesion, but every
number the tool reports (``instances.csv``, ``profiles.csv``) and every figure it draws reads the
map only near the lesion. :func:`map_box` gives the box that is written by default (``--maps
crop``): the lesion's bounding box grown by a margin in mm. The written file keeps the voxel
grid of the input (same spacing, orientation and voxel centres); only its affine's translation
changes (:func:`crop_affine`), so any NIfTI viewer overlays a cropped map on the input in the
right place. The input header's qform and sform are both translated and keep their codes
(:func:`crop_header`).

The numbers are always computed from the full in-memory maps before cropping
(:func:`instance_saliency.explain.explain`), so ``--maps crop``, ``--maps full`` and ``--maps
none`` give the same tables, byte for byte.
"""

from __future__ import annotations

import gzip
import io
import math
import os

import numpy as np

from .errors import InputError

__all__ = ["MAP_MODES", "FIGURE_WINDOW_MM", "default_margin_mm", "map_box", "crop_affine",
           "crop_header", "save_lesion_map", "nifti_gz_bytes"]

#: values of ``--maps``
MAP_MODES = ("crop", "full", "none")
#: side (mm) of the per-lesion PNG figure window centred on the lesion centroid
#: (:func:`instance_saliency.report.instance_figure`, ``crop_mm``); drawn from the full map
FIGURE_WINDOW_MM = 40.0


def default_margin_mm(cfg) -> float:
    """Margin (mm) around the lesion bounding box that holds every voxel any number reads.

    The farthest signed distance from the lesion border that a reported number uses: the
    outside rims (:data:`instance_saliency.quantify.DEFAULT_OUTSIDE_MM`, up to 5 mm), the peak
    and share margins (3 and 2 mm) and the last edge of the distance-profile bins
    (``profile_bins_mm``, 8 mm). With the defaults this is 8 mm: every value of
    ``instances.csv`` and ``profiles.csv`` can be recomputed from the cropped files. (The PNG
    figures show a 40 mm window around the centroid, drawn from the full in-memory map; for
    files holding that whole window use ``--maps-margin-mm 20`` or ``--maps full``.)

    Parameters
    ----------
    cfg : ExplainConfig

    Returns
    -------
    float
        Margin in mm.
    """
    from .quantify import DEFAULT_OUTSIDE_MM

    bins = [float(b) for b in cfg.profile_bins_mm] or [0.0]
    return float(max(max(DEFAULT_OUTSIDE_MM), cfg.peak_margin_mm, cfg.share_margin_mm,
                     max(bins)))


def map_box(bbox_start, bbox_stop, shape, spacing, margin_mm: float) -> tuple:
    """The box written for one lesion: its bounding box grown by ``margin_mm``, clipped.

    Parameters
    ----------
    bbox_start, bbox_stop : sequence of 3 int
        Lesion bounding box in voxel indices (``stop`` exclusive).
    shape : sequence of 3 int
        Spatial shape ``(X, Y, Z)`` of the scan.
    spacing : sequence of 3 float
        Voxel spacing in mm.
    margin_mm : float
        Margin in mm; along axis ``i`` the box grows by ``ceil(margin_mm / spacing[i])``
        voxels on each side, so it holds every voxel whose centre lies within ``margin_mm``
        (per axis) of the bounding box.

    Returns
    -------
    tuple of 3 slice
        The box, inside ``[0, shape)``.

    Raises
    ------
    InputError
        Negative or non-finite margin, or an empty/out-of-range bounding box.
    """
    try:
        m = float(margin_mm)
    except (TypeError, ValueError):
        raise InputError(f"map margin must be a number of mm, got {margin_mm!r}") from None
    if not (math.isfinite(m) and m >= 0):
        raise InputError(f"map margin must be a finite number of mm >= 0, got {margin_mm!r}")
    box = []
    for a, b, n, sp in zip(bbox_start, bbox_stop, shape, spacing):
        a, b, n = int(a), int(b), int(n)
        if not (0 <= a < b <= n):
            raise InputError(f"lesion bounding box {tuple(bbox_start)}..{tuple(bbox_stop)} "
                             f"does not lie inside the scan of shape {tuple(shape)}")
        pad = int(math.ceil(m / float(sp) - 1e-9))
        box.append(slice(max(a - pad, 0), min(b + pad, n)))
    return tuple(box)


def crop_affine(affine, start) -> np.ndarray:
    """Affine of a crop whose voxel ``(0, 0, 0)`` is voxel ``start`` of the source grid.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Voxel-to-world affine of the source grid (mm).
    start : sequence of 3 int
        First voxel of the crop in the source grid.

    Returns
    -------
    ndarray, float64, shape (4, 4)
        ``affine @ T(start)``: same rotation, zooms and shear; translation moved by
        ``affine[:3, :3] @ start``.
    """
    a = np.array(affine, dtype=np.float64)
    out = a.copy()
    out[:3, 3] = a[:3, :3] @ np.asarray(start, dtype=np.float64) + a[:3, 3]
    return out


def crop_header(header, start):
    """A copy of a NIfTI header whose qform and sform are translated to a crop at ``start``.

    Both matrices keep their codes (a code of 0 stays 0; its matrix is translated too, so a
    reader that ignores the codes still places the crop right). Zooms, units and intent are
    kept.

    Parameters
    ----------
    header : nibabel.Nifti1Header
    start : sequence of 3 int

    Returns
    -------
    nibabel.Nifti1Header
    """
    hdr = header.copy()
    qcode = int(hdr["qform_code"])
    scode = int(hdr["sform_code"])
    hdr.set_qform(crop_affine(hdr.get_qform(), start), int(qcode))
    hdr.set_sform(crop_affine(hdr.get_sform(), start), int(scode))
    return hdr


def _spatial_last(data: np.ndarray) -> np.ndarray:
    """``(C, X, Y, Z)`` -> ``(X, Y, Z, C)`` (C > 1) or ``(X, Y, Z)`` (C = 1)."""
    return np.moveaxis(data, 0, -1) if data.shape[0] > 1 else data[0]


def save_lesion_map(path: str | os.PathLike, dense: np.ndarray, affine, header, mode: str,
                    box: tuple | None = None) -> tuple | None:
    """Write one lesion's map, cropped or full-grid, as float32 NIfTI (atomic write).

    Parameters
    ----------
    path : path
        ``.nii.gz`` file to write.
    dense : ndarray, float32, shape (C, X, Y, Z)
        The map on the input grid (signed; not modified).
    affine : array_like, shape (4, 4)
        Input affine.
    header : nibabel.Nifti1Header
        Input header (qform/sform codes kept; translated for a crop).
    mode : {"crop", "full", "none"}
        ``crop`` writes ``dense[:, box]`` with :func:`crop_affine`; ``full`` the whole grid;
        ``none`` nothing.
    box : tuple of 3 slice
        The crop (:func:`map_box`); needed for ``crop``.

    Returns
    -------
    tuple of 3 int or None
        The first voxel of the written array in the input grid (``(0, 0, 0)`` for ``full``),
        or None when nothing was written. A C > 1 map is 4D ``(X, Y, Z, C)`` on disk, a
        single-channel map 3D.

    Raises
    ------
    InputError
        Unknown ``mode``, or ``crop`` without ``box``.
    OutputError
        The file cannot be written.
    """
    from .io import save_map

    if mode not in MAP_MODES:
        raise InputError(f"--maps must be one of {', '.join(MAP_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "full":
        save_map(path, _spatial_last(dense), affine, header)
        return (0, 0, 0)
    if box is None:
        raise InputError("a cropped map needs its box")
    start = tuple(int(s.start) for s in box)
    crop = dense[(slice(None),) + tuple(box)]
    save_map(path, _spatial_last(crop), crop_affine(affine, start),
             crop_header(header, start) if header is not None else None)
    return start


def nifti_gz_bytes(data: np.ndarray, affine, dtype, slope: float | None = None,
                   header=None, intent: str | None = None) -> bytes:
    """A gzip-compressed NIfTI-1 file in memory (for embedding in the HTML viewer).

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z)
        Values already in ``dtype``'s range (stored as they are).
    affine : array_like, shape (4, 4)
        Written as sform and qform (code 1 = scanner) unless ``header`` gives the codes.
    dtype : numpy dtype
        Stored type (e.g. ``np.uint8``, ``np.int8``).
    slope : float, optional
        ``scl_slope``: readers show ``stored * slope`` (real units for quantised maps).
    header : nibabel.Nifti1Header, optional
        Source header whose qform/sform codes are kept.
    intent : str, optional
        NIfTI intent name, e.g. ``"label"`` (NiiVue then draws the volume as a label atlas).

    Returns
    -------
    bytes
        ``.nii.gz`` content (deterministic: gzip time stamp 0).
    """
    import nibabel as nib

    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_data_dtype(dtype)
    qcode = scode = 1
    if header is not None:
        qcode = int(header["qform_code"]) or 1
        scode = int(header["sform_code"]) or 1
    img.set_qform(np.asarray(affine, dtype=np.float64), qcode)
    img.set_sform(np.asarray(affine, dtype=np.float64), scode)
    if slope is not None:
        img.header.set_slope_inter(float(slope), 0.0)
    if intent is not None:
        img.header.set_intent(intent)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as f:
        f.write(raw)
    return buf.getvalue()
