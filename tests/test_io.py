"""NIfTI input/output (instance_saliency.io): validation errors, normalisation, atomic saving,
property-based checks of the loader, and the real public scans."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from instance_saliency.errors import InputError
from instance_saliency.io import (
    AFFINE_TOL_MM,
    load_mask,
    load_subject,
    load_volume,
    HISTOGRAM_PERCENTILES,
    histogram_landmarks,
    normalise,
    save_map,
    standardise_histogram,
    zscore_nonzero,
)

from _helpers import DATA, needs_data

SHAPE = (6, 7, 5)
# a non-trivial affine: flipped x (LAS-like), anisotropic, translated
AFFINE = np.array([[-1.5, 0.0, 0.0, 90.0],
                   [0.0, 2.0, 0.0, -126.0],
                   [0.0, 0.0, 3.0, -72.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _image(seed=0, shape=SHAPE, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = (rng.random(shape) * 100 + 1).astype(dtype)
    a[0] = 0  # some background
    return a


def _write(path: Path, data, affine=AFFINE, dtype=None) -> Path:
    data = np.asarray(data)
    kw = {"dtype": data.dtype} if data.dtype == np.int64 else {}  # nibabel asks to confirm int64
    try:
        img = nib.Nifti1Image(data, affine, **kw)
    except nib.spatialimages.HeaderDataError:  # singular: no qform, store it as the sform only
        img = nib.Nifti1Image(data, None, **kw)
        img.header.set_sform(affine, code=2)
        img.header.set_qform(None, code=0)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


@pytest.fixture
def trio(tmp_path):
    """Valid FLAIR, MPRAGE and mask files on one grid."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:4, 2:4, 1:3] = 1
    return (_write(tmp_path / "flair.nii.gz", _image(1)),
            _write(tmp_path / "mprage.nii.gz", _image(2)),
            _write(tmp_path / "mask.nii.gz", mask))


def _raises_naming(path, func, *args, match=None):
    """``func(*args)`` raises InputError whose single-line message contains ``path``."""
    with pytest.raises(InputError) as ei:
        func(*args)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


# ------------------------------------------------------------------ valid input


def test_load_subject_values(trio):
    flair, mprage, mask = trio
    s = load_subject(flair, mprage, mask)
    assert s.image.shape == (2, *SHAPE) and s.image.dtype == np.float32
    np.testing.assert_array_equal(s.image[0], _image(1))
    np.testing.assert_array_equal(s.image[1], _image(2))
    assert s.mask.dtype == np.uint8 and int(s.mask.sum()) == 8
    np.testing.assert_allclose(s.affine, AFFINE)
    assert s.spacing == (1.5, 2.0, 3.0)
    assert s.shape == SHAPE
    assert s.orientation == "LAS"
    assert s.paths == {"flair": str(flair), "mprage": str(mprage), "mask": str(mask)}
    s2 = load_subject(flair, mprage)
    assert s2.mask is None and "mask" not in s2.paths


def test_integer_and_scaled_images_are_read_as_float(tmp_path):
    data = _image(3)
    f = _write(tmp_path / "f.nii.gz", np.rint(data).astype(np.int16))
    img = nib.Nifti1Image(data, AFFINE)
    img.set_data_dtype(np.int16)  # nibabel stores int16 with scl_slope/scl_inter
    nib.save(img, str(tmp_path / "m.nii.gz"))
    s = load_subject(f, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(s.image[0], np.rint(data))
    # scaling applied: int16 with slope reproduces the float data to the quantisation step
    np.testing.assert_allclose(s.image[1], data, atol=101 / 32767)


# ------------------------------------------------------------------ validation errors


def test_missing_file(trio, tmp_path):
    flair, mprage, mask = trio
    missing = tmp_path / "nope" / "flair.nii.gz"
    _raises_naming(missing, load_subject, missing, mprage, match="not found")
    _raises_naming(missing, load_subject, flair, missing, match="not found")
    _raises_naming(missing, load_subject, flair, mprage, missing, match="not found")
    _raises_naming(missing, load_volume, missing)
    _raises_naming(missing, load_mask, missing)
    # a folder is not a file
    _raises_naming(tmp_path, load_volume, tmp_path, match="not found")


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.95])
def test_truncated_gzip(trio, tmp_path, fraction):
    flair, mprage, mask = trio
    # random float data does not compress: the data part is most of the file
    big = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32) + 1
    full = _write(tmp_path / "full.nii.gz", big, np.eye(4)).read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(full[: int(len(full) * fraction)])
    _raises_naming(bad, load_volume, bad, match="not a readable NIfTI")
    # and through load_subject, in either role
    mpr = _write(tmp_path / "mpr.nii.gz", big, np.eye(4))
    _raises_naming(bad, load_subject, bad, mpr)
    _raises_naming(bad, load_subject, mpr, bad)


def test_truncated_uncompressed(tmp_path):
    big = _image(0, (20, 20, 20))
    full = _write(tmp_path / "full.nii", big).read_bytes()
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(full[: len(full) // 2])
    _raises_naming(bad, load_volume, bad)
    bad.write_bytes(full[:200])  # not even a whole header
    _raises_naming(bad, load_volume, bad)


@pytest.mark.parametrize("content", [
    b"",
    b"hello, I am not an image\n",
    gzip.compress(b"\x00" * 64 + os.urandom(2000)),  # gzip but not NIfTI
    os.urandom(4096),
])
def test_not_nifti(tmp_path, content):
    bad = tmp_path / "fake.nii.gz"
    bad.write_bytes(content)
    _raises_naming(bad, load_volume, bad, match="not a readable NIfTI")


def test_other_format_refused(tmp_path):
    p = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(_image(0), np.eye(4)), str(p))
    _raises_naming(p, load_volume, p, match="not a NIfTI image")


def test_4d_refused_single_volume_accepted(trio, tmp_path):
    flair, mprage, mask = trio
    data = _image(1)
    four = _write(tmp_path / "4d.nii.gz", np.stack([data, data], -1))
    _raises_naming(four, load_subject, four, mprage, match="4D")
    _raises_naming(four, load_subject, flair, four, match="4D")
    one = _write(tmp_path / "4d1.nii.gz", data[..., None])
    assert nib.load(str(one)).shape == (*SHAPE, 1)
    s = load_subject(one, mprage, mask)
    assert s.image.shape == (2, *SHAPE)
    np.testing.assert_array_equal(s.image[0], data)
    m4 = _write(tmp_path / "mask4d1.nii.gz", nib.load(str(mask)).get_fdata()[..., None],
                dtype=np.uint8)
    assert int(load_subject(flair, mprage, m4).mask.sum()) == 8


@pytest.mark.parametrize("shape", [(6, 7), (6,), (6, 7, 5, 1, 2)])
def test_not_3d_refused(tmp_path, shape):
    p = _write(tmp_path / "x.nii.gz", np.ones(shape, np.float32), np.eye(4))
    msg = _raises_naming(p, load_volume, p, match="a 3D volume is required")
    assert f"{len(shape)}D" in msg


def test_shapes_differ(trio, tmp_path):
    flair, mprage, mask = trio
    other = _write(tmp_path / "mprage_big.nii.gz", _image(2, (6, 7, 6)))
    msg = _raises_naming(other, load_subject, flair, other, match="shape")
    assert str(flair) in msg  # the reference is named too


@pytest.mark.parametrize("delta, ok", [
    (np.array([[0, 0, 0, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), False),  # origin
    (np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.002], [0, 0, 0, 0]]), False),
    (np.array([[0, 0, 0, 1e-4], [0, 0, 0, -1e-4], [0, 0, 0, 1e-4], [0, 0, 0, 0]]), True),
    (np.array([[1e-4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), True),
])
def test_affine_tolerance(trio, tmp_path, delta, ok):
    flair, mprage, mask = trio
    aff = AFFINE + delta
    other = _write(tmp_path / "mprage_moved.nii.gz", _image(2), aff)
    m_other = _write(tmp_path / "mask_moved.nii.gz", nib.load(str(mask)).get_fdata(), aff,
                     dtype=np.uint8)
    if ok:
        s = load_subject(flair, other, m_other)
        np.testing.assert_allclose(s.affine, AFFINE)  # the FLAIR's affine is the grid
        assert int(s.mask.sum()) == 8
    else:
        msg = _raises_naming(other, load_subject, flair, other, match="affine")
        assert f"> {AFFINE_TOL_MM} mm" in msg
        _raises_naming(m_other, load_subject, flair, mprage, m_other, match="affine")


def test_flipped_axis_refused(trio, tmp_path):
    flair, mprage, mask = trio
    flip = AFFINE.copy()
    flip[0, 0] = -flip[0, 0]  # same shape and zooms, x axis flipped
    other = _write(tmp_path / "mprage_flipped.nii.gz", _image(2), flip)
    _raises_naming(other, load_subject, flair, other, match="affine")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(trio, tmp_path, bad):
    flair, mprage, mask = trio
    for dtype in (np.float32, np.float64):
        data = _image(1).astype(dtype)
        data[1, 2, 3] = bad
        data[4, 5, 0] = bad
        p = _write(tmp_path / f"nan_{np.dtype(dtype).name}.nii.gz", data)
        msg = _raises_naming(p, load_subject, flair, p, match="NaN/Inf")
        assert "has 2 NaN/Inf voxels" in msg
        _raises_naming(p, load_subject, p, mprage)
    fmask = nib.load(str(mask)).get_fdata().astype(np.float32)
    fmask[0, 0, 0] = bad
    pm = _write(tmp_path / "nanmask.nii.gz", fmask)
    _raises_naming(pm, load_subject, flair, mprage, pm, match="NaN/Inf")


def test_all_zero_channel(trio, tmp_path):
    flair, mprage, mask = trio
    z = _write(tmp_path / "zero.nii.gz", np.zeros(SHAPE, np.float32))
    _raises_naming(z, load_subject, z, mprage, match="all zero")
    _raises_naming(z, load_subject, flair, z, match="all zero")
    # -0.0 is zero too
    nz = _write(tmp_path / "negzero.nii.gz", np.full(SHAPE, -0.0, np.float32))
    _raises_naming(nz, load_subject, flair, nz, match="all zero")


@pytest.mark.parametrize("value, dtype", [(2, np.uint8), (-1, np.int16), (255, np.uint8),
                                          (1.6, np.float32), (-0.6, np.float32),
                                          (0.7, np.float32)])
def test_non_binary_mask(trio, tmp_path, value, dtype):
    flair, mprage, mask = trio
    m = nib.load(str(mask)).get_fdata().astype(dtype)
    m[0, 0, 0] = value
    p = _write(tmp_path / "nonbinary.nii.gz", m)
    msg = _raises_naming(p, load_subject, flair, mprage, p, match="not binary")
    assert f"[{float(f'{value:.4g}')}]" in msg  # the offending value itself is reported
    _raises_naming(p, load_mask, p)


def test_float_mask_rounds(trio, tmp_path):
    flair, mprage, mask = trio
    m = np.zeros(SHAPE, np.float32)
    m[1, 1, 1] = 0.9999
    m[2, 2, 2] = 1.0
    m[3, 3, 3] = 1e-5
    m[4, 4, 4] = -1e-5
    p = _write(tmp_path / "float_mask.nii.gz", m)
    s = load_subject(flair, mprage, p)
    assert s.mask.dtype == np.uint8
    expected = np.zeros(SHAPE, np.uint8)
    expected[1, 1, 1] = expected[2, 2, 2] = 1
    np.testing.assert_array_equal(s.mask, expected)
    np.testing.assert_array_equal(load_mask(p), expected)


def test_mask_on_another_grid(trio, tmp_path):
    flair, mprage, mask = trio
    m = nib.load(str(mask)).get_fdata()
    shifted = AFFINE.copy()
    shifted[:3, 3] += 1.0
    p = _write(tmp_path / "mask_shifted.nii.gz", m, shifted, dtype=np.uint8)
    msg = _raises_naming(p, load_subject, flair, mprage, p, match="affine")
    assert str(flair) in msg
    p2 = _write(tmp_path / "mask_shape.nii.gz", np.zeros((6, 7, 4), np.uint8))
    _raises_naming(p2, load_subject, flair, mprage, p2, match="shape")
    # without a reference the mask alone loads
    assert int(load_mask(p).sum()) == 8


def test_singular_affine(tmp_path):
    aff = AFFINE.copy()
    aff[2, 2] = 0.0
    p = _write(tmp_path / "singular.nii.gz", _image(0), aff)
    _raises_naming(p, load_volume, p, match="affine")


def test_complex_data_refused(tmp_path):
    p = _write(tmp_path / "complex.nii.gz", (_image(0) + 1j).astype(np.complex64))
    _raises_naming(p, load_volume, p, match="non-real")


@pytest.mark.parametrize("pixdim", [np.nan, 5.0])
def test_spacing_consistent_with_affine(tmp_path, pixdim):
    img = nib.Nifti1Image(_image(1), AFFINE)
    img.header.set_qform(None, code=0)  # the sform alone defines the grid
    img.header["pixdim"][1] = pixdim
    p = tmp_path / "f.nii"
    nib.save(img, str(p))
    np.testing.assert_allclose(nib.load(str(p)).affine, AFFINE)
    try:
        s = load_subject(p, p)
    except InputError as e:  # refusing the file is fine too
        assert str(p) in str(e)
        return
    assert s.spacing == (1.5, 2.0, 3.0)


# ------------------------------------------------------------------ zscore_nonzero


def test_zscore_hand_example():
    x = np.zeros((2, 2, 2, 1), np.float32)
    x[0, :, :, 0] = [[0, 1], [2, 3]]  # non-zero 1, 2, 3: mean 2, std sqrt(2/3)
    x[1, :, :, 0] = [[4, 0], [0, 8]]  # non-zero 4, 8: mean 6, std 2
    z = zscore_nonzero(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(z[0, :, :, 0], [[0, -1 / s], [0, 1 / s]], rtol=1e-6)
    np.testing.assert_allclose(z[1, :, :, 0], [[-1, 0], [0, 1]], rtol=1e-6)


def test_zscore_statistics_and_background():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(300, 50, (9, 10, 11)), rng.normal(-20, 3, (9, 10, 11))])
    x[:, :3] = 0  # background
    x[1, 5, 5, 5] = 0
    z = zscore_nonzero(x)
    for c in range(2):
        nz = x[c] != 0
        assert (z[c][~nz] == 0).all()  # exactly 0, not just close
        assert abs(float(z[c][nz].astype(np.float64).mean())) < 1e-6
        assert float(z[c][nz].astype(np.float64).std()) == pytest.approx(1.0, abs=1e-6)
    # invariant to a positive affine rescaling of the foreground of each channel
    x2 = x.copy()
    x2[0][x[0] != 0] = x[0][x[0] != 0] * 3.5 + 7
    np.testing.assert_allclose(zscore_nonzero(x2), z, atol=1e-5)
    # the input is not modified
    assert (x[:, :3] == 0).all() and x.dtype == np.float64


def test_zscore_constant_and_empty_channel():
    x = np.zeros((2, 3, 3, 3), np.float32)
    x[0, 1] = 5.0  # constant foreground: std 0 -> centred only
    x[1, 0, 0, 0] = 1.0
    z = zscore_nonzero(x)
    assert not z.any()
    x[1] = 0
    with pytest.raises(InputError, match="channel 1 is all zero"):
        zscore_nonzero(x)


# ------------------------------------------------------------------ histogram standardisation


def _two_site_image(seed, scale, offset, shape=(2, 20, 21, 22)):
    rng = np.random.default_rng(seed)
    x = rng.gamma(4.0, 1.0, shape) * scale + offset
    x[:, :4] = 0  # background
    return x


def test_histogram_landmarks_are_zscore_percentiles():
    x = _two_site_image(0, 30.0, 5.0)
    lm = histogram_landmarks(x)
    z = zscore_nonzero(x)
    assert lm.shape == (2, len(HISTOGRAM_PERCENTILES))
    for c in range(2):
        np.testing.assert_allclose(lm[c], np.percentile(z[c][z[c] != 0], HISTOGRAM_PERCENTILES))
        assert np.all(np.diff(lm[c]) > 0)


def test_standardise_histogram_maps_landmarks_onto_the_standard():
    x = _two_site_image(1, 30.0, 5.0)
    standard = np.array([np.linspace(-2.0, 3.0, 11), np.linspace(-1.0, 1.0, 11) ** 3 + np.arange(11)])
    y = standardise_histogram(x, standard)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert (y[:, :4] == 0).all()  # background stays exactly 0
    # the output's landmarks are the standard ones (up to percentile interpolation)
    for c in range(2):
        got = np.percentile(y[c][x[c] != 0], HISTOGRAM_PERCENTILES)
        np.testing.assert_allclose(got, standard[c], atol=0.02)
    # monotonic: intensity order inside the foreground is kept
    fg = x[0] != 0
    order = np.argsort(x[0][fg], kind="stable")
    assert np.all(np.diff(y[0][fg][order]) >= -1e-6)
    # values beyond the 1st / 99th percentile continue the end segments' slopes
    z = zscore_nonzero(x)[0]
    lm = histogram_landmarks(x)[0]
    i = np.unravel_index(np.argmax(np.where(fg, z, -np.inf)), z.shape)
    slope = (standard[0][-1] - standard[0][-2]) / (lm[-1] - lm[-2])
    assert y[0][i] == pytest.approx(standard[0][-1] + (z[i] - lm[-1]) * slope, rel=1e-5)


def test_histogram_standardisation_brings_two_intensity_scales_together():
    """Two sites whose tissue histograms differ in shape (not just scale): after z-scoring their
    landmarks differ; after standardisation onto one standard they agree."""
    a = _two_site_image(2, 1.0, 0.0)
    b = _two_site_image(3, 1.0, 0.0) ** 1.6  # another contrast curve
    standard = (histogram_landmarks(a) + histogram_landmarks(b)) / 2
    za, zb = zscore_nonzero(a), zscore_nonzero(b)
    before = np.abs(np.percentile(za[0][za[0] != 0], 90) - np.percentile(zb[0][zb[0] != 0], 90))
    ya, yb = standardise_histogram(a, standard), standardise_histogram(b, standard)
    after = np.abs(np.percentile(ya[0][a[0] != 0], 90) - np.percentile(yb[0][b[0] != 0], 90))
    assert before > 0.05 and after < 0.01


def test_normalise_dispatch_and_errors():
    x = _two_site_image(4, 10.0, 1.0)
    np.testing.assert_array_equal(normalise(x), zscore_nonzero(x))
    lm = histogram_landmarks(x)
    np.testing.assert_array_equal(normalise(x, "histogram", lm), standardise_histogram(x, lm))
    with pytest.raises(InputError, match="unknown normalisation 'minmax'"):
        normalise(x, "minmax")
    with pytest.raises(InputError, match="needs the model's standard landmarks"):
        normalise(x, "histogram", None)
    with pytest.raises(InputError, match="2 increasing rows of 11 values"):
        standardise_histogram(x, lm[:, ::-1])
    with pytest.raises(InputError, match="2 increasing rows of 11 values"):
        standardise_histogram(x, lm[:1])
    flat = np.zeros((1, 5, 5, 5))
    flat[0, 1:3] = 7.0
    with pytest.raises(InputError, match="too few distinct intensities"):
        histogram_landmarks(flat)


# ------------------------------------------------------------------ save_map


def _source_header(qcode=1, scode=4):
    img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE)
    img.set_qform(AFFINE, qcode)
    img.set_sform(AFFINE, scode)
    img.header.set_xyzt_units("mm", "sec")
    return img.header


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_save_map_round_trip_3d(tmp_path, suffix):
    data = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 1e-3
    p = tmp_path / f"sub/map{suffix}"  # parent folder is created
    save_map(p, data, AFFINE, _source_header())
    img = nib.load(str(p))
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 4
    assert img.header.get_zooms() == (1.5, 2.0, 3.0)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert img.get_data_dtype() == np.float32
    out = np.asanyarray(img.dataobj)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data)  # exact, no scaling
    assert sorted(x.name for x in p.parent.iterdir()) == [p.name]


def test_save_map_round_trip_4d_modality_axis(tmp_path):
    data = np.random.default_rng(1).standard_normal((*SHAPE, 2)).astype(np.float32)
    p = tmp_path / "map4d.nii.gz"
    save_map(p, data, AFFINE, _source_header(qcode=2, scode=2))
    img = nib.load(str(p))
    assert img.shape == (*SHAPE, 2)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert int(img.header["qform_code"]) == 2 and int(img.header["sform_code"]) == 2
    assert img.header.get_zooms()[:3] == (1.5, 2.0, 3.0)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    # each modality separately equals its slice
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[..., 1], data[..., 1])


def test_save_map_label_dtype_and_source_header_from_real_loader(trio, tmp_path):
    flair, mprage, mask = trio
    s = load_subject(flair, mprage, mask)
    labels = np.zeros(SHAPE, np.int32)
    labels[s.mask > 0] = 300  # needs more than 8 bits
    p = tmp_path / "labels.nii.gz"
    save_map(p, labels, s.affine, s.header, dtype=np.int16)
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)
    np.testing.assert_allclose(img.affine, s.affine, atol=1e-6)
    assert tuple(img.header.get_zooms()) == s.spacing


def test_save_map_without_header(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    p = tmp_path / "plain.nii.gz"
    save_map(p, data, AFFINE)
    img = nib.load(str(p))
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_map_atomic(tmp_path, monkeypatch, exc):
    p = tmp_path / "map.nii.gz"
    save_map(p, np.ones(SHAPE, np.float32), AFFINE, _source_header())
    before = p.read_bytes()
    real_save = nib.save
    seen = []

    def failing_save(img, filename):
        seen.append(Path(filename))
        assert Path(filename) != p  # written under a temporary name
        real_save(img, filename)  # a complete temporary file ...
        with open(filename, "r+b") as f:
            f.truncate(50)  # ... then half-written
        raise exc

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(type(exc)):
        save_map(p, np.full(SHAPE, 7.0, np.float32), AFFINE, _source_header())
    assert len(seen) == 1 and seen[0].parent == p.parent
    assert p.read_bytes() == before  # previous file untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["map.nii.gz"]  # no temporaries
    monkeypatch.setattr(nib, "save", real_save)
    assert float(nib.load(str(p)).get_fdata().max()) == 1.0


# ------------------------------------------------------------------ property-based

_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32,
           np.float64]
_HYP = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def _volumes(draw):
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    data = (rng.random(shape) * 50).astype(dtype)
    n_bad = 0
    if np.issubdtype(dtype, np.floating):
        n_bad = draw(st.integers(0, 2))
        for _ in range(n_bad):
            idx = tuple(int(rng.integers(s)) for s in shape)
            data[idx] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    zooms = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, -1.0]), min_size=3,
                          max_size=3))
    aff = np.diag([*zooms, 1.0])
    aff[:3, 3] = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    return data, aff


@_HYP
@given(_volumes())
def test_property_load_volume(vol):
    data, aff = vol
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.nii.gz"
        _write(p, data, aff)
        stored_aff = nib.load(str(p)).affine
        squeezed = data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data
        should_fail = (squeezed.ndim != 3
                       or not np.isfinite(squeezed.astype(np.float64)).all()
                       or abs(np.linalg.det(stored_aff[:3, :3])) < 1e-12)
        try:
            img = load_volume(p)
        except InputError as e:
            assert should_fail, f"refused a valid volume: {e}"
            assert str(p) in str(e) and "\n" not in str(e)
            return
        assert not should_fail, "accepted an invalid volume"
        out = np.asanyarray(img.dataobj)
        np.testing.assert_array_equal(out, squeezed)
        np.testing.assert_array_equal(img.affine, stored_aff)


@_HYP
@given(st.data())
def test_property_affine_perturbation(data):
    """MPRAGE with a perturbed affine: accepted iff the stored affines differ by <= 1e-3 mm."""
    mag = data.draw(st.sampled_from([0.0, 1e-6, 1e-4, 5e-4, 2e-3, 1e-2, 1.0]))
    i = data.draw(st.integers(0, 2))
    j = data.draw(st.integers(0, 3))
    sign = data.draw(st.sampled_from([-1.0, 1.0]))
    aff = AFFINE.copy()
    aff[i, j] += sign * mag
    with tempfile.TemporaryDirectory() as d:
        f = _write(Path(d) / "f.nii.gz", _image(1))
        m = _write(Path(d) / "m.nii.gz", _image(2), aff)
        diff = np.abs(nib.load(str(m)).affine - nib.load(str(f)).affine).max()
        try:
            s = load_subject(f, m)
        except InputError as e:
            assert diff > AFFINE_TOL_MM and mag >= 2e-3, str(e)
            assert str(m) in str(e)
            return
        assert diff <= AFFINE_TOL_MM and mag <= 5e-4
        np.testing.assert_array_equal(s.image[1], _image(2))


@_HYP
@given(st.lists(st.sampled_from([0.0, 1.0, 0.0, 1.0, 0.9999, 1e-4, 0.4, 2.0, -1.0, 1.6,
                                 np.nan]), min_size=1, max_size=8),
       st.sampled_from([np.float32, np.float64]))
def test_property_mask_values(values, dtype):
    m = np.zeros(SHAPE, dtype)
    m.ravel()[: len(values)] = values
    r = np.rint(np.asarray(values, np.float64))
    v = np.asarray(values, np.float64)
    should_fail = (not np.isfinite(r).all()) or not np.isin(r, (0.0, 1.0)).all() \
        or bool((np.abs(v - r) > 1e-3).any())  # 0.4 is refused, not rounded to 0
    with tempfile.TemporaryDirectory() as d:
        p = _write(Path(d) / "mask.nii.gz", m)
        try:
            out = load_mask(p)
        except InputError as e:
            assert should_fail, str(e)
            assert str(p) in str(e) and "\n" not in str(e)
            return
        assert not should_fail
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out.ravel()[: len(values)], r.astype(np.uint8))
        assert int(out.sum()) == int(r.sum())


@_HYP
@given(st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1,
                max_size=6),
       st.booleans())
def test_property_corrupted_header_bytes(edits, compressed):
    """Random bytes written into the header: loads (3D, finite) or InputError, nothing else."""
    raw_name = "v.nii.gz" if compressed else "v.nii"
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / raw_name
        _write(p, _image(0, (4, 5, 3)))
        raw = bytearray(gzip.decompress(p.read_bytes()) if compressed else p.read_bytes())
        for pos, val in edits:
            raw[pos] = val
        # keep the dims small so that a corrupted header cannot ask for gigabytes
        dims = np.frombuffer(bytes(raw[40:56]), dtype="<i2")
        assume(np.all(np.abs(dims[1:]) <= 64))
        p.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
        try:
            img = load_volume(p)
        except InputError as e:
            assert str(p) in str(e) and "\n" not in str(e)
            return
        out = np.asanyarray(img.dataobj)
        assert out.ndim == 3
        assert np.isfinite(out.astype(np.float64)).all()
        assert np.isfinite(img.affine).all()


# ------------------------------------------------------------------ real scans


@needs_data
def test_real_patient07():
    import cc3d

    from instance_saliency.datasets import fetch_subject

    paths = fetch_subject("patient07", DATA)
    s = load_subject(paths["flair"], paths["mprage"], paths["mask"])
    assert s.shape == (182, 218, 182)
    assert s.spacing == (1.0, 1.0, 1.0)
    assert s.orientation == "LAS"
    np.testing.assert_array_equal(s.affine, [[-1, 0, 0, 90], [0, 1, 0, -126],
                                             [0, 0, 1, -72], [0, 0, 0, 1]])
    assert nib.load(str(paths["mask"])).get_data_dtype() == np.uint8
    assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1}
    assert int(s.mask.sum()) == 1300  # 1.3 ml of lesion
    assert cc3d.connected_components(s.mask, connectivity=26, return_N=True)[1] == 37
    assert cc3d.connected_components(s.mask, connectivity=6, return_N=True)[1] == 49
    # intensities (open_ms_data scale) and the normalised input
    assert float(s.image[0].min()) == pytest.approx(-19.671745)
    assert float(s.image[0].max()) == pytest.approx(200.42188)
    z = zscore_nonzero(s.image)
    for c in range(2):
        nz = s.image[c] != 0
        assert (z[c][~nz] == 0).all()
        assert abs(float(z[c][nz].mean(dtype=np.float64))) < 1e-4
        assert float(z[c][nz].std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-4)
    # lesions are hyperintense on FLAIR
    assert float(z[0][s.mask > 0].mean()) > 1.0


@needs_data
def test_real_p18_float_mask():
    import cc3d

    from instance_saliency.datasets import fetch_subject

    paths = fetch_subject("P18", DATA)
    assert nib.load(str(paths["mask"])).get_data_dtype() == np.float32
    s = load_subject(paths["flair"], paths["mprage"], paths["mask"])
    assert s.shape == (182, 218, 182) and s.spacing == (1.0, 1.0, 1.0)
    assert s.orientation == "LAS"
    assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1}
    assert int(s.mask.sum()) == 770
    assert cc3d.connected_components(s.mask, connectivity=26, return_N=True)[1] == 3
    raw = np.asanyarray(nib.load(str(paths["mask"])).dataobj)
    np.testing.assert_array_equal(s.mask, raw.astype(np.uint8))  # exactly 0.0/1.0 there
    assert float(s.image[0].max()) == 290.0 and float(s.image[1].max()) == 1493.0
