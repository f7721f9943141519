"""NIfTI input/output, validation and intensity normalisation.

The model's input space is defined here: FLAIR and MPRAGE are stacked as channels of one
``(C, X, Y, Z)`` float32 array and normalised per channel by :func:`zscore_nonzero`. Saliency is
measured in that space (units: logit per unit of normalised intensity).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, OutputError

#: affines of co-registered inputs may differ by at most this much (mm, elementwise)
AFFINE_TOL_MM = 1e-3
CHANNELS = ("FLAIR", "MPRAGE")
#: a mask voxel may differ from 0 or 1 by at most this much (float storage noise)
MASK_TOL = 1e-3


@dataclass
class Subject:
    """One scan: stacked input channels, optional lesion mask, and the grid they live on.

    Attributes
    ----------
    image : ndarray, shape (C, X, Y, Z), float32
        Raw (un-normalised) intensities, channel order ``channels``.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS mm) affine of the first channel's file.
    spacing : tuple of 3 float
        Voxel spacing in mm.
    mask : ndarray, shape (X, Y, Z), uint8, or None
        Binary lesion mask (0/1) when given.
    header : nibabel.Nifti1Header
        Header of the first channel's file; its spatial fields are reused when saving maps.
    paths : dict
        The files read, by role (``flair``, ``mprage`` or the channel's name lowercased,
        ``mask``).
    channels : tuple of str
        Channel names, in order (default :data:`CHANNELS`).
    """

    image: np.ndarray
    affine: np.ndarray
    spacing: tuple
    header: nib.Nifti1Header
    mask: np.ndarray | None = None
    paths: dict = field(default_factory=dict)
    channels: tuple = CHANNELS

    @property
    def shape(self) -> tuple:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(self.image.shape[1:])

    @property
    def orientation(self) -> str:
        """Axis codes of the affine, e.g. ``"LAS"``."""
        return "".join(nib.aff2axcodes(self.affine))


def load_volume(path: str | os.PathLike, role: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI image and check it; the data is read (and validated finite) once.

    Raises
    ------
    InputError
        Missing or unreadable file, not NIfTI, not 3D (a 4D image with a single volume is
        accepted), or NaN/Inf voxels. The message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{role} file not found: {p}")
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{role} file {p} is not a readable NIfTI image ({msg})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{role} file {p} is not a NIfTI image")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{role} file {p} is {data.ndim}D with shape {data.shape}; "
                         "a 3D volume is required")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{role} file {p} has non-real data type {data.dtype}")
    if data.size == 0 or min(data.shape) < 1:
        raise InputError(f"{role} file {p} is empty (shape {data.shape})")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{role} file {p} has {n} NaN/Inf voxels")
    aff = img.affine
    if aff is None or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(f"{role} file {p} has an invalid (singular or non-finite) affine")
    return nib.Nifti1Image(np.asarray(data), aff, img.header)


def _check_same_grid(ref: nib.Nifti1Image, ref_path, img: nib.Nifti1Image, path, role: str):
    if img.shape != ref.shape:
        raise InputError(f"{role} file {path} has shape {img.shape}, but {ref_path} has "
                         f"{ref.shape}; co-register them onto one grid")
    diff = float(np.abs(img.affine - ref.affine).max())
    if diff > AFFINE_TOL_MM:
        raise InputError(f"{role} file {path} has an affine differing from {ref_path} by "
                         f"{diff:.4g} mm (> {AFFINE_TOL_MM} mm); co-register them onto one grid")


def load_mask(path: str | os.PathLike, ref: nib.Nifti1Image | None = None,
              ref_path=None, role: str = "mask") -> np.ndarray:
    """Load a binary lesion mask as uint8 ``(X, Y, Z)``.

    Every voxel must be 0 or 1 within :data:`MASK_TOL` (a float 0/1 mask is fine, and so is
    float storage noise such as 0.9999); other values, such as 0.7 from an interpolated or
    probability map, are refused rather than rounded. When
    ``ref`` is given the mask must lie on the same grid. ``role`` names the file in errors
    (``"mask"``, ``"prediction"``).

    Raises
    ------
    InputError
        As :func:`load_volume`, plus non-binary values or another grid.
    """
    img = load_volume(path, role)
    if ref is not None:
        _check_same_grid(ref, ref_path, img, path, role)
    raw = np.asarray(img.dataobj, dtype=np.float64)
    data = np.rint(raw)
    bad = ~np.isin(data, (0.0, 1.0)) | (np.abs(raw - data) > MASK_TOL)
    if bad.any():
        vals = [float(f"{v:.4g}") for v in np.unique(raw[bad])[:5]]
        hint = ("threshold it first, e.g. at 0.5" if role != "prediction" else
                "a probability map? give the binary prediction_mask.nii.gz that explain and "
                "predict write, not prediction_prob.nii.gz, or threshold it first")
        raise InputError(f"{role} file {path} is not binary: values {vals} besides 0/1 "
                         f"({hint})")
    return data.astype(np.uint8)


def load_subject(flair: str | os.PathLike, mprage: str | os.PathLike,
                 mask: str | os.PathLike | None = None) -> Subject:
    """Load FLAIR + MPRAGE (+ optional lesion mask) into a :class:`Subject`.

    Parameters
    ----------
    flair, mprage : path
        3D NIfTI files on one grid (same shape, affines within :data:`AFFINE_TOL_MM` mm).
    mask : path, optional
        Binary lesion mask on the same grid.

    Returns
    -------
    Subject
        ``image`` of shape ``(2, X, Y, Z)`` float32 (raw intensities), affine, spacing (mm).

    Raises
    ------
    InputError
        Missing/unreadable file, 4D image, shapes or affines that differ, NaN/Inf voxels,
        a non-binary mask. The message names the offending file.
    """
    return load_images([flair, mprage], CHANNELS, mask)


def load_images(paths, names, mask: str | os.PathLike | None = None) -> Subject:
    """Load any number of co-registered channels (+ optional lesion mask) into a
    :class:`Subject`.

    Parameters
    ----------
    paths : sequence of path
        3D NIfTI files on one grid (same shape, affines within :data:`AFFINE_TOL_MM` mm), in
        the model's channel order.
    names : sequence of str
        Channel names (``"FLAIR"``, ``"T1"``, ...), same length as ``paths``.
    mask : path, optional
        Binary lesion mask on the same grid.

    Returns
    -------
    Subject
        ``image`` of shape ``(C, X, Y, Z)`` float32 (raw intensities), affine, spacing (mm)
        from the first file's affine (column norms).

    Raises
    ------
    InputError
        Missing/unreadable file, 4D image, shapes or affines that differ, NaN/Inf voxels,
        an all-zero channel, a non-binary mask. The message names the offending file.
    """
    paths, names = list(paths), [str(n) for n in names]
    if not paths or len(paths) != len(names):
        raise InputError(f"{len(paths)} image(s) for {len(names)} channel name(s)")
    imgs = [load_volume(paths[0], names[0])]
    for n, p in zip(names[1:], paths[1:]):
        imgs.append(load_volume(p, n))
        _check_same_grid(imgs[0], paths[0], imgs[-1], p, n)
    image = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])
    for c, (name, p) in enumerate(zip(names, paths)):
        if not np.any(image[c]):
            raise InputError(f"{name} file {p} is all zero")
    m = load_mask(mask, imgs[0], paths[0]) if mask is not None else None
    # voxel spacing from the affine (column norms), the grid actually used for world mm
    spacing = tuple(float(v) for v in np.linalg.norm(imgs[0].affine[:3, :3], axis=0))
    roles = ["flair", "mprage"] if tuple(names) == CHANNELS else [n.lower() for n in names]
    out_paths = {r: str(p) for r, p in zip(roles, paths)}
    if mask is not None:
        out_paths["mask"] = str(mask)
    return Subject(image=image, affine=imgs[0].affine.copy(), spacing=spacing,
                   header=imgs[0].header.copy(), mask=m, paths=out_paths,
                   channels=tuple(names))


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over non-zero voxels; background (exact zeros) stays 0.

    ``x' = (x - mean(x[x != 0])) / std(x[x != 0])`` inside the non-zero voxels of each channel,
    0 elsewhere. This is the normalisation of the seed paper's code (Spagnolo et al. 2024) and
    the input space in which all saliency is measured.

    Parameters
    ----------
    image : ndarray, shape (C, *spatial)

    Returns
    -------
    ndarray, shape (C, *spatial), float32

    Raises
    ------
    InputError
        A channel with no non-zero voxel.
    """
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        ch = image[c].astype(np.float64)
        nz = ch != 0
        if not nz.any():
            raise InputError(f"channel {c} is all zero; cannot normalise")
        v = ch[nz]
        std = v.std()
        out[c][nz] = ((v - v.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


#: Percentiles (of a channel's z-scored non-zero voxels) used as histogram landmarks.
HISTOGRAM_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)

#: Input normalisations a checkpoint can declare (``config.json`` ``normalisation``).
NORMALISATIONS = ("zscore_nonzero", "histogram")


def histogram_landmarks(image: np.ndarray) -> np.ndarray:
    """Per-channel histogram landmarks: percentiles :data:`HISTOGRAM_PERCENTILES` of the
    z-scored non-zero voxels (:func:`zscore_nonzero`).

    Parameters
    ----------
    image : ndarray, shape (C, *spatial)
        Raw intensities.

    Returns
    -------
    ndarray, shape (C, 11), float64

    Raises
    ------
    InputError
        A channel with no non-zero voxel, or too few distinct intensities for increasing
        landmarks.
    """
    z = zscore_nonzero(image)
    out = np.zeros((z.shape[0], len(HISTOGRAM_PERCENTILES)))
    for c in range(z.shape[0]):
        v = z[c][z[c] != 0]
        if v.size:
            out[c] = np.percentile(v, HISTOGRAM_PERCENTILES)
        if not v.size or np.any(np.diff(out[c]) <= 0):
            raise InputError(f"channel {c} has too few distinct intensities for histogram "
                             "standardisation")
    return out


def standardise_histogram(image: np.ndarray, standard) -> np.ndarray:
    """Histogram standardisation onto a learnt standard scale (Nyúl, Udupa & Zhang, "New
    variants of a method of MRI scale standardization", IEEE TMI 19(2), 2000).

    Each channel is z-scored over its non-zero voxels (:func:`zscore_nonzero`); its landmarks
    (:func:`histogram_landmarks`) are then mapped piecewise linearly onto ``standard`` (the
    training scans' mean landmarks), with the end segments' slopes extended beyond the 1st and
    99th percentiles. Background (exact zeros) stays 0. The map is monotonic, so the tissue
    order of intensities is kept while the two sites' histograms are brought together.

    Parameters
    ----------
    image : ndarray, shape (C, *spatial)
        Raw intensities.
    standard : array-like, shape (C, 11)
        Standard landmarks (z-score units) per channel.

    Returns
    -------
    ndarray, shape (C, *spatial), float32

    Raises
    ------
    InputError
        ``standard`` of the wrong shape or not increasing; see :func:`histogram_landmarks`.
    """
    std = np.asarray(standard, dtype=np.float64)
    k = len(HISTOGRAM_PERCENTILES)
    if std.shape != (image.shape[0], k) or np.any(np.diff(std, axis=1) <= 0):
        raise InputError(f"histogram standard landmarks must be {image.shape[0]} increasing "
                         f"rows of {k} values, got shape {std.shape}")
    z = zscore_nonzero(image)
    lm = histogram_landmarks(image)
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(z.shape[0]):
        nz = z[c] != 0
        v = z[c][nz].astype(np.float64)
        m = np.interp(v, lm[c], std[c])
        lo, hi = v < lm[c][0], v > lm[c][-1]
        m[lo] = std[c][0] + (v[lo] - lm[c][0]) * (std[c][1] - std[c][0]) / (lm[c][1] - lm[c][0])
        m[hi] = std[c][-1] + (v[hi] - lm[c][-1]) * (std[c][-1] - std[c][-2]) / (lm[c][-1] - lm[c][-2])
        out[c][nz] = m.astype(np.float32)
    return out


def normalise(image: np.ndarray, method: str = "zscore_nonzero", landmarks=None) -> np.ndarray:
    """A model's input normalisation by name (:data:`NORMALISATIONS`).

    Parameters
    ----------
    image : ndarray, shape (C, *spatial)
    method : {"zscore_nonzero", "histogram"}
        :func:`zscore_nonzero`, or :func:`standardise_histogram` onto ``landmarks``.
    landmarks : array-like, shape (C, 11), optional
        The standard scale (required for ``"histogram"``).

    Returns
    -------
    ndarray, shape (C, *spatial), float32

    Raises
    ------
    InputError
        Unknown method, or ``"histogram"`` without landmarks.
    """
    if method == "zscore_nonzero":
        return zscore_nonzero(image)
    if method == "histogram":
        if landmarks is None or len(landmarks) == 0:
            raise InputError("histogram normalisation needs the model's standard landmarks")
        return standardise_histogram(image, landmarks)
    raise InputError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}")


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path`` (no half-written file at ``path``).

    ``tmp_path`` (a ``str``) is a new empty file next to ``path``, ending in ``path``'s own
    suffixes (so writers that pick a format from the name, such as ``nib.save``, still work).
    The parent folder is created if needed. Once ``write`` returns, the file gets the usual
    mode (``0o666`` less the umask) and is renamed onto ``path``; on any error the temporary
    file is removed and ``path`` is left as it was.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputError
        The folder cannot be created or written into.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                                   dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write into {path.parent}: {e.strerror}") from None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary name and an atomic rename."""
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, w)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file through a temporary name and an atomic rename."""
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, w)


def _keep_orientation(img: nib.Nifti1Image, header: nib.Nifti1Header, affine) -> None:
    """Give ``img`` the qform and sform of ``header`` as they were (matrices and codes).

    ``affine`` may differ from the header's own affine by a voxel transform ``T`` (e.g. a
    crop's translation): both matrices are then composed with the same ``T``, so that readers
    that prefer the qform (ITK-based tools) and those that prefer the sform (nibabel, FSL)
    place the output exactly where they place the input. A header with neither code set
    gets ``affine`` in both, with code 1 (scanner).
    """
    q, qcode = header.get_qform(coded=True)
    s, scode = header.get_sform(coded=True)
    if not qcode and not scode:
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
        return
    t = np.linalg.solve(header.get_best_affine(), np.asarray(affine, dtype=np.float64))
    if np.allclose(t, np.eye(4), atol=1e-6):
        t = np.eye(4)
    hdr = img.header
    for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        hdr[k] = header[k]  # a qform with code 0 is kept as it was, too
    hdr["pixdim"][0] = header["pixdim"][0]
    if qcode:
        hdr.set_qform(q @ t, int(qcode), strip_shears=False)
    else:
        hdr["qform_code"] = 0
    if scode:
        hdr.set_sform(s @ t, int(scode))
    else:
        hdr["sform_code"] = 0
    img._affine = hdr.get_best_affine()  # keeps nibabel from rewriting the header on save


def save_map(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
             header: nib.Nifti1Header | None = None, dtype=np.float32) -> None:
    """Save a map on the source grid as NIfTI, atomically (temporary name, then rename).

    Parameters
    ----------
    path : path
        Output ``.nii`` / ``.nii.gz``.
    data : ndarray, shape (X, Y, Z) or (X, Y, Z, ...)
        Map; extra trailing axes (e.g. modality) become the 4th/5th NIfTI dimensions.
    affine : ndarray, shape (4, 4)
        Source affine.
    header : Nifti1Header, optional
        Source header: its qform and sform (matrices and codes), units and zooms are kept
        (see :func:`_keep_orientation`); ``affine`` should be its affine or that affine
        composed with a voxel transform (a crop).
    dtype : numpy dtype
        Stored data type (float32 for maps, uint8/int16/int32 for masks and label maps).
    """
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, affine, header.copy() if header is not None else None)
    img.set_data_dtype(dtype)
    if header is not None:
        _keep_orientation(img, header, affine)
    else:
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
    img.header["scl_slope"] = np.nan
    img.header["scl_inter"] = np.nan
    atomic_write(path, lambda tmp: nib.save(img, tmp))
