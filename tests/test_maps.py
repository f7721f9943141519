"""Compact per-lesion maps: crop box, translated affine/header, viewer volumes (no scan needed)."""

import base64
import gzip

import nibabel as nib
import numpy as np
import pytest

from instance_saliency.errors import InputError
from instance_saliency.explain import ExplainConfig
from instance_saliency.maps import (crop_affine, crop_header, default_margin_mm, map_box,
                                   nifti_gz_bytes, save_lesion_map)
from instance_saliency.quantify import quantify_instance, distance_profile


def test_default_margin_is_the_farthest_distance_any_number_reads():
    cfg = ExplainConfig()
    # rims up to 5 mm, peak 3 mm, share 2 mm, profile bins up to 8 mm
    assert default_margin_mm(cfg) == 8.0
    cfg.profile_bins_mm = tuple(range(-3, 4))
    assert default_margin_mm(cfg) == 5.0


def test_map_box_grows_bbox_by_margin_per_axis_and_clips():
    box = map_box((10, 0, 5), (12, 3, 6), (40, 30, 20), (1.0, 2.0, 0.7), 3.0)
    # ceil(3/1)=3, ceil(3/2)=2, ceil(3/0.7)=5 voxels; clipped at 0 and at the shape
    assert box == (slice(7, 15), slice(0, 5), slice(0, 11))
    assert map_box((0, 0, 0), (40, 30, 20), (40, 30, 20), (1, 1, 1), 8) == (
        slice(0, 40), slice(0, 30), slice(0, 20))
    with pytest.raises(InputError):
        map_box((0, 0, 0), (1, 1, 1), (4, 4, 4), (1, 1, 1), -1)
    with pytest.raises(InputError):
        map_box((3, 0, 0), (3, 1, 1), (4, 4, 4), (1, 1, 1), 1)


def test_crop_affine_places_crop_voxels_on_the_same_world_points():
    rng = np.random.default_rng(0)
    aff = np.eye(4)
    aff[:3, :3] = rng.normal(size=(3, 3))  # sheared, rotated
    aff[:3, 3] = [10.0, -20.0, 5.5]
    start = (4, 7, 2)
    ca = crop_affine(aff, start)
    for ijk in [(0, 0, 0), (3, 1, 2), (9, 9, 9)]:
        np.testing.assert_allclose(ca @ np.r_[ijk, 1.0],
                                   aff @ np.r_[np.add(ijk, start), 1.0], atol=1e-12)


def test_crop_header_keeps_codes_and_translates_both_matrices():
    """An input with qform_code 0 and a slightly sheared sform keeps both as they were
    (codes and matrices), translated by the crop start."""
    sform = np.array([[-1.0, 0.02, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]])
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30, 30, 30))
    hdr.set_sform(sform, 2)
    hdr.set_qform(np.diag([-1.0, 1, 1, 1]) @ np.eye(4), 0)
    q0 = hdr.get_qform()
    out = crop_header(hdr, (3, 4, 5))
    assert int(out["sform_code"]) == 2 and int(out["qform_code"]) == 0
    np.testing.assert_allclose(out.get_sform(), crop_affine(sform, (3, 4, 5)), atol=1e-6)
    np.testing.assert_allclose(out.get_qform(), crop_affine(q0, (3, 4, 5)), atol=1e-5)


def test_save_lesion_map_crop_equals_full_inside_box(tmp_path):
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(2, 20, 18, 16)).astype(np.float32)
    aff = np.diag([-1.0, 1.2, 0.9, 1.0])
    aff[:3, 3] = [5, 6, 7]
    hdr = nib.Nifti1Header()
    hdr.set_sform(aff, 1)
    hdr.set_qform(aff, 1)
    box = map_box((5, 6, 7), (8, 9, 9), dense.shape[1:], (1.0, 1.2, 0.9), 2.0)
    start = save_lesion_map(tmp_path / "c.nii.gz", dense, aff, hdr, "crop", box)
    assert start == (3, 4, 4)
    full = save_lesion_map(tmp_path / "f.nii.gz", dense, aff, hdr, "full")
    assert full == (0, 0, 0)
    assert save_lesion_map(tmp_path / "n.nii.gz", dense, aff, hdr, "none") is None
    assert not (tmp_path / "n.nii.gz").exists()
    c, f = nib.load(str(tmp_path / "c.nii.gz")), nib.load(str(tmp_path / "f.nii.gz"))
    assert c.get_data_dtype() == np.float32 and f.shape == (20, 18, 16, 2)
    cd = np.asarray(c.dataobj)
    assert cd.shape == tuple(s.stop - s.start for s in box) + (2,)
    np.testing.assert_array_equal(cd, np.moveaxis(dense, 0, -1)[box])
    # the same world point holds the same value in both files
    ijk = np.array([2, 3, 1])
    world = c.affine @ np.r_[ijk, 1]
    fijk = np.rint(np.linalg.solve(f.affine, world)[:3]).astype(int)
    np.testing.assert_array_equal(cd[tuple(ijk)], np.asarray(f.dataobj)[tuple(fijk)])
    assert int(c.header["sform_code"]) == 1 and int(c.header["qform_code"]) == 1


def test_numbers_from_a_margin_crop_equal_the_full_map():
    """Every number reads only voxels within the default margin (8 mm) of the bounding box:
    a map zeroed outside the crop box gives the same row and profile, bit for bit."""
    rng = np.random.default_rng(2)
    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[17:22, 18:21, 19:23] = True
    mask[21, 21, 22] = True
    dense = rng.normal(size=(2,) + shape).astype(np.float32)
    sp = (1.0, 1.0, 1.0)
    idx = np.nonzero(mask)
    box = map_box([i.min() for i in idx], [i.max() + 1 for i in idx], shape, sp,
                  default_margin_mm(ExplainConfig()))
    cut = np.zeros_like(dense)
    cut[(slice(None),) + box] = dense[(slice(None),) + box]
    a = quantify_instance(dense, mask, sp)
    b = quantify_instance(cut, mask, sp)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])), k
    bins = ExplainConfig().profile_bins_mm
    for c in range(2):
        pa, pb = distance_profile(dense[c], mask, sp, bins), distance_profile(cut[c], mask, sp, bins)
        np.testing.assert_array_equal(pa[1], pb[1])
        np.testing.assert_array_equal(pa[2], pb[2])


def test_viewer_volumes_int8_error_bound_and_offsets():
    """Viewer maps: int8 with scl_slope = vmax/127, error <= vmax/254, crop affine."""
    from instance_saliency.instances import Instance
    from instance_saliency.report.viewer import ViewerData

    rng = np.random.default_rng(3)
    shape = (24, 20, 18)
    img = np.zeros((2,) + shape, np.float32)
    img[:, 2:22, 3:18, 1:17] = rng.uniform(10, 100, size=(2, 20, 15, 16))
    labels = np.zeros(shape, np.int32)
    labels[8:11, 8:10, 7:9] = 1
    inst = Instance(1, "FP", "pred", 1, 12, 12.0, (9.0, 8.5, 7.5), (9.0, 8.5, 7.5),
                    (8, 8, 7), (11, 10, 9))
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [30, -10, 4]
    box = map_box(inst.bbox_start, inst.bbox_stop, shape, (1, 1, 1), 4)
    v = ViewerData(img, ["FLAIR", "MPRAGE"], labels, [inst], aff, (1, 1, 1), [box])
    dense = rng.normal(scale=0.3, size=(2,) + shape).astype(np.float32)
    v.add_map("smoothgrad", 1, dense, box, ["FLAIR", "MPRAGE"])
    entry = v.maps[1]["smoothgrad"]
    crop = dense[(slice(None),) + box]
    vmax = float(np.abs(crop).max())
    assert entry["vmax"] == pytest.approx(vmax)
    for c, ch in enumerate(["FLAIR", "MPRAGE"]):
        raw = gzip.decompress(base64.b64decode(entry["channels"][ch]))
        nii = nib.Nifti1Image.from_bytes(raw)
        assert nii.get_data_dtype() == np.int8
        shown = nii.get_fdata()
        assert np.abs(shown - crop[c]).max() <= vmax / 254 * (1 + 1e-6)
        np.testing.assert_allclose(nii.affine, crop_affine(aff, [s.start for s in box]))
    out = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(v.outline)))
    assert out.header.get_intent()[0] == "label"
    o = np.asarray(out.dataobj)
    assert set(np.unique(o)) == {0, 2}  # FP = 2
    assert (o == 2).sum() == 12
    payload = v.payload(__import__("pandas").DataFrame([{"label": 1, "prob_max": 0.9}]))
    assert payload["lesions"][0]["centroid_mm"] == [9.0, 8.5, 7.5]
    assert payload["methods"] == ["smoothgrad"]


def test_nifti_gz_bytes_is_deterministic():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert nifti_gz_bytes(a, np.eye(4), np.uint8) == nifti_gz_bytes(a, np.eye(4), np.uint8)
    back = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_gz_bytes(a, np.eye(4), np.uint8)))
    np.testing.assert_array_equal(np.asarray(back.dataobj), a)
