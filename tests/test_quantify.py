"""Signed distances, shells and per-instance saliency numbers (instance_saliency.quantify)."""

import numpy as np
import pytest
from scipy import ndimage

from instance_saliency.errors import InputError
from instance_saliency.quantify import (
    distance_profile,
    quantify_columns,
    quantify_instance,
    shell_means,
    signed_distance_mm,
)


def _brute_distance(mask, spacing):
    """Whole-volume signed distance, the definition written out."""
    return (ndimage.distance_transform_edt(~mask, sampling=spacing)
            - ndimage.distance_transform_edt(mask, sampling=spacing))


def _cube(shape=(21, 21, 21), lo=9, hi=12):
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def _sphere(radius=5.0, n=31):
    g = np.arange(n) - n // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    return r <= radius, r


# ------------------------------------------------------------------ signed distance


def test_signed_distance_cube_values():
    m = _cube()
    d, crop = signed_distance_mm(m, (1, 1, 1))
    assert crop == (slice(0, 21),) * 3
    assert d[10, 10, 10] == -2.0  # centre voxel: 2 steps to background
    assert d[9, 10, 10] == -1.0  # outermost lesion voxel
    assert d[8, 10, 10] == 1.0  # face neighbour
    assert d[8, 8, 10] == pytest.approx(np.sqrt(2))
    assert d[8, 8, 8] == pytest.approx(np.sqrt(3))
    assert d[5, 10, 10] == 4.0
    assert (d != 0).all()


def test_signed_distance_crop_equals_whole_volume():
    m = _cube()
    full = _brute_distance(m, (1, 1, 2))
    d, crop = signed_distance_mm(m, (1, 1, 2), max_distance_mm=3)
    # bbox 9:12 padded by ceil(3/1)+1 = 4 in-plane, ceil(3/2)+1 = 3 along z
    assert crop == (slice(5, 16), slice(5, 16), slice(6, 15))
    np.testing.assert_array_equal(d, full[crop])
    # every voxel within 3 mm lies in the crop
    outside = np.ones(m.shape, bool)
    outside[crop] = False
    assert (full[outside] > 3).all()


def test_signed_distance_lesion_touching_border():
    m = np.zeros((10, 10, 10), bool)
    m[0:3, 0:3, 0:3] = True
    d, crop = signed_distance_mm(m, (1, 1, 1), max_distance_mm=2)
    assert crop == (slice(0, 6),) * 3
    np.testing.assert_array_equal(d, _brute_distance(m, (1, 1, 1))[crop])
    assert d[0, 0, 0] == -3.0  # array border is not background


def test_sphere_distance_close_to_radius_minus_5():
    m, r = _sphere()
    d, crop = signed_distance_mm(m, (1, 1, 1), max_distance_mm=6)
    rr = r[crop]
    out = d > 0
    # the discrete distance to a digitised sphere of radius 5 is r - 5 within a voxel
    assert np.abs(d[out] - (rr[out] - 5)).max() < 1.0
    assert np.abs(d[~out] - (rr[~out] - 5)).max() <= 1.0 + 1e-9


# ------------------------------------------------------------------ shells


def test_sphere_shell_means_of_distance():
    m, _ = _sphere()
    sal = _brute_distance(m, (1, 1, 1))
    outs, ins = shell_means(sal, m, (1, 1, 1))
    assert outs.shape == (5,) and ins.shape == (2,)
    for k, v in enumerate(outs, start=1):
        assert k - 1 < v <= k  # mean of d over (k-1, k] lies in it
    assert outs == pytest.approx(np.sort(outs))
    assert -1 <= ins[0] < 0 and -2 <= ins[1] < -1
    # the first shell of a sphere: face neighbours at exactly 1 mm only
    assert outs[0] == 1.0 and ins[0] == -1.0
    # brute force means
    for k in range(1, 6):
        sel = (sal > k - 1) & (sal <= k)
        assert outs[k - 1] == pytest.approx(sal[sel].mean())


def test_cube_shell_counts_isotropic_and_anisotropic():
    m = _cube()
    # isotropic: inside [-2,-1): centre, [-1,0): 26 outer voxels,
    # (0,1]: 6 faces x 9, (1,2]: 12 edges x 3 (sqrt2) + 8 corners (sqrt3) + 54 second faces
    _, _, counts = distance_profile(np.zeros(m.shape), m, (1, 1, 1), [-2, -1, 0, 1, 2])
    assert counts.tolist() == [1, 26, 54, 98]
    # 2 mm along z: z faces move to d = 2, z-edges to sqrt(5); the centre column is 2 mm
    # from background in-plane and 2 mm along z -> inside [-2,-1) holds 3 voxels
    _, _, counts = distance_profile(np.zeros(m.shape), m, (1, 1, 2), [-2, -1, 0, 1, 2])
    assert counts.tolist() == [3, 24, 4 * 9, 2 * 9 + 4 * 3 + 4 * 9]
    # saliency 1 on the two z-face neighbour layers only
    sal = np.zeros(m.shape)
    sal[9:12, 9:12, 8] = sal[9:12, 9:12, 12] = 1
    outs, _ = shell_means(sal, m, (1, 1, 1), outside_mm=(1, 2))
    assert outs == pytest.approx([18 / 54, 0.0])
    outs, _ = shell_means(sal, m, (1, 1, 2), outside_mm=(1, 2))
    assert outs == pytest.approx([0.0, 18 / 66])


def test_empty_shell_is_nan():
    m = np.zeros((9, 9, 9), bool)
    m[4, 4, 4] = True  # single voxel: no inside shell 2
    outs, ins = shell_means(np.ones(m.shape), m, (1, 1, 1), inside_mm=(1, 2))
    assert ins[0] == 1.0 and np.isnan(ins[1])
    assert outs[0] == 1.0


def test_distance_profile_bins():
    m = _cube()
    sal = _brute_distance(m, (1, 1, 1))
    centres, means, counts = distance_profile(sal, m, (1, 1, 1), np.arange(-3, 4))
    assert centres.tolist() == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    assert counts[0] == 0 and np.isnan(means[0])
    assert means[1:3].tolist() == [-2.0, -1.0]
    assert means[3] == 1.0
    # a bin straddling 0 holds both sides
    _, means, counts = distance_profile(sal, m, (1, 1, 1), [-1, 1])
    assert counts.tolist() == [26 + 54]
    assert means[0] == pytest.approx((-26 + 54) / 80)
    with pytest.raises(InputError, match="increasing"):
        distance_profile(sal, m, (1, 1, 1), [0, 0, 1])


# ------------------------------------------------------------------ quantify_instance


def test_quantify_plus_inside_minus_rim():
    m, _ = _sphere()
    d = _brute_distance(m, (1, 1, 1))
    flair = np.where(m, 1.0, np.where(d <= 3, -1.0, 0.0))
    mprage = np.full(m.shape, 2.0)
    row = quantify_instance(np.stack([flair, mprage]), m, (1, 1, 1))
    n_in = int(m.sum())
    assert row["smoothgrad_flair_mean_in"] == 1.0
    assert row["smoothgrad_flair_sum_in"] == n_in
    for k in (1, 2, 3):
        assert row[f"smoothgrad_flair_rim_out_{k}mm"] == -1.0
    assert row["smoothgrad_flair_rim_out_4mm"] == 0.0
    assert row["smoothgrad_flair_rim_out_5mm"] == 0.0
    assert row["smoothgrad_flair_rim_in_1mm"] == 1.0
    assert row["smoothgrad_flair_rim_in_2mm"] == 1.0
    assert row["smoothgrad_flair_peak_max"] == 1.0
    assert row["smoothgrad_flair_peak_min"] == -1.0
    assert row["smoothgrad_mprage_mean_in"] == 2.0
    assert row["smoothgrad_mprage_rim_out_5mm"] == 2.0
    # share within d <= 2 mm: every voxel there has |flair| = 1, |mprage| = 2
    assert row["smoothgrad_flair_share"] == pytest.approx(1 / 3)
    n_share = int((d <= 2).sum())
    assert row["smoothgrad_flair_sum_abs"] == n_share
    assert row["smoothgrad_mprage_sum_abs"] == 2 * n_share


def test_share_hand_computed_on_cube():
    m = _cube()
    flair = m.astype(float)  # 27 voxels of 1
    mprage = np.ones(m.shape)  # 1 everywhere
    sal = np.stack([flair, mprage])
    # margin 1 mm: lesion 27 + face shell 54 = 81 voxels
    row = quantify_instance(sal, m, (1, 1, 1), share_margin_mm=1.0)
    assert row["smoothgrad_flair_share"] == pytest.approx(27 / (27 + 81))
    assert row["smoothgrad_flair_sum_abs"] == 27.0
    assert row["smoothgrad_mprage_sum_abs"] == 81.0
    # margin 2 mm: 27 + 54 + 98 = 179 voxels
    row = quantify_instance(sal, m, (1, 1, 1), share_margin_mm=2.0)
    assert row["smoothgrad_flair_share"] == pytest.approx(27 / (27 + 179))
    assert row["smoothgrad_mprage_sum_abs"] == 179.0
    # sign does not matter, all-zero is NaN
    row = quantify_instance(-sal, m, (1, 1, 1), share_margin_mm=1.0)
    assert row["smoothgrad_flair_share"] == pytest.approx(0.25)
    assert row["smoothgrad_flair_sum_abs"] == 27.0
    row = quantify_instance(np.zeros_like(sal), m, (1, 1, 1))
    assert np.isnan(row["smoothgrad_flair_share"])
    assert row["smoothgrad_flair_sum_abs"] == 0.0


def test_sum_abs_hand_computed_signed_and_anisotropic():
    m = _cube()  # lesion 9:12 along every axis
    sal = np.zeros((2,) + m.shape)
    sal[0, 10, 10, 10] = -3.0  # lesion centre
    sal[0, 8, 10, 10] = 2.0  # face neighbour along x: d = 1 mm
    sal[0, 10, 10, 8] = 0.5  # face neighbour along z: d = 1 mm, or 2 mm with 2 mm slices
    sal[0, 6, 10, 10] = 100.0  # d = 3 mm: outside the 2 mm share region
    sal[1, 11, 11, 11] = 4.0
    sal[1, 10, 10, 7] = -1.0  # d = 2 mm (isotropic), 4 mm with 2 mm slices
    iso = quantify_instance(sal, m, (1, 1, 1))  # share margin 2 mm
    assert iso["smoothgrad_flair_sum_abs"] == 3.0 + 2.0 + 0.5
    assert iso["smoothgrad_mprage_sum_abs"] == 4.0 + 1.0
    assert iso["smoothgrad_flair_sum_in"] == -3.0  # signed, lesion only
    assert iso["smoothgrad_flair_share"] == pytest.approx(5.5 / 10.5)
    aniso = quantify_instance(sal, m, (1, 1, 2), share_margin_mm=1.0)
    assert aniso["smoothgrad_flair_sum_abs"] == 3.0 + 2.0  # the z neighbour is 2 mm away
    assert aniso["smoothgrad_mprage_sum_abs"] == 4.0


def test_peak_margin():
    m = _cube()
    sal = np.zeros((2,) + m.shape)
    sal[0, 6, 10, 10] = 5.0  # d = 3 (three layers out along x)
    sal[0, 10, 10, 15] = 9.0  # d = 4
    sal[0, 10, 10, 10] = -7.0  # lesion centre
    row = quantify_instance(sal, m, (1, 1, 1))
    assert row["smoothgrad_flair_peak_max"] == 5.0
    assert row["smoothgrad_flair_peak_min"] == -7.0
    row = quantify_instance(sal, m, (1, 1, 1), peak_margin_mm=4.0)
    assert row["smoothgrad_flair_peak_max"] == 9.0
    row = quantify_instance(sal, m, (1, 1, 1), peak_margin_mm=0.0)
    assert row["smoothgrad_flair_peak_max"] == 0.0


def test_anisotropic_rims_in_quantify():
    m = _cube()
    sal = np.zeros((2,) + m.shape)
    sal[0, 9:12, 9:12, 8] = 1.0  # z-face neighbours
    iso = quantify_instance(sal, m, (1, 1, 1))
    aniso = quantify_instance(sal, m, (1, 1, 2))
    assert iso["smoothgrad_flair_rim_out_1mm"] == pytest.approx(9 / 54)
    assert iso["smoothgrad_flair_rim_out_2mm"] == 0.0
    assert aniso["smoothgrad_flair_rim_out_1mm"] == 0.0
    assert aniso["smoothgrad_flair_rim_out_2mm"] == pytest.approx(9 / 66)


def _brute_quantify(sal, m, spacing, share=2.0, peak=3.0, outside=(1, 2, 3, 4, 5),
                    inside=(1, 2), names=("flair", "mprage"), method="smoothgrad"):
    d = _brute_distance(m, spacing)
    row = {}
    for c, ch in enumerate(names):
        s = sal[c].astype(float)
        p = f"{method}_{ch}"
        row[f"{p}_peak_max"] = s[d <= peak].max()
        row[f"{p}_peak_min"] = s[d <= peak].min()
        row[f"{p}_mean_in"] = s[m].mean()
        row[f"{p}_sum_in"] = s[m].sum()
        row[f"{p}_sum_abs"] = np.abs(s[d <= share]).sum()
        for k in outside:
            sel = (d > max(k - 1, 0)) & (d <= k)
            row[f"{p}_rim_out_{k:g}mm"] = s[sel].mean() if sel.any() else np.nan
        for k in inside:
            sel = (d >= -k) & (d < -max(k - 1, 0))
            row[f"{p}_rim_in_{k:g}mm"] = s[sel].mean() if sel.any() else np.nan
    if len(names) >= 2:
        a = [np.abs(sal[c][d <= share].astype(float)).sum() for c in range(len(names))]
        row[f"{method}_{names[0]}_share"] = a[0] / sum(a)
    return row


@pytest.mark.parametrize("spacing", [(1, 1, 1), (0.8, 1.2, 2.0)])
def test_crop_equals_brute_force(spacing):
    rng = np.random.default_rng(1)
    blobs = ndimage.gaussian_filter(rng.random((40, 44, 30)), 2) > 0.52
    labels, n = ndimage.label(blobs)
    assert n >= 3
    sal = rng.normal(size=(2,) + blobs.shape).astype(np.float32)
    sizes = ndimage.sum(blobs, labels, range(1, n + 1))
    for k in np.argsort(sizes)[::-1][:3] + 1:
        m = labels == k
        row = quantify_instance(sal, m, spacing, method="GradCAMpp")
        ref = _brute_quantify(sal, m, spacing, method="gradcampp")
        assert list(row) == list(ref)
        for key in ref:
            np.testing.assert_allclose(row[key], ref[key], rtol=1e-9, atol=1e-9,
                                       err_msg=key, equal_nan=True)
    # a lesion touching the volume border
    m = np.zeros(blobs.shape, bool)
    m[0:4, 40:44, 0:3] = True
    row = quantify_instance(sal, m, spacing)
    ref = _brute_quantify(sal, m, spacing)
    for key in ref:
        np.testing.assert_allclose(row[key], ref[key], rtol=1e-9, atol=1e-9, err_msg=key,
                                   equal_nan=True)


def test_columns_and_generic_channels():
    cols = quantify_columns()
    assert cols[:5] == ["smoothgrad_flair_peak_max", "smoothgrad_flair_peak_min",
                        "smoothgrad_flair_mean_in", "smoothgrad_flair_sum_in",
                        "smoothgrad_flair_sum_abs"]
    assert "smoothgrad_flair_rim_out_1mm" in cols and "smoothgrad_mprage_rim_in_2mm" in cols
    assert cols[-1] == "smoothgrad_flair_share"
    assert len(cols) == 2 * (5 + 5 + 2) + 1
    m = _cube()
    sal = np.stack([m * 1.0, m * 2.0, m * 3.0])
    row = quantify_instance(sal, m, (1, 1, 1), channel_names=("A", "B", "C"),
                            method="x", outside_mm=(1.5,), inside_mm=(1,))
    assert list(row) == quantify_columns("x", ("A", "B", "C"), (1.5,), (1,))
    assert "x_c_rim_out_1.5mm" in row
    assert row["x_a_share"] == pytest.approx(1 / 6)
    assert [row[f"x_{c}_sum_abs"] for c in "abc"] == [27.0, 54.0, 81.0]


def test_single_channel_has_no_share():
    """A one-channel map (Grad-CAM++ ``cam``) gets no ``_share`` column: it would always be 1."""
    cols = quantify_columns("gradcampp", ("CAM",))
    assert not [c for c in cols if c.endswith("_share")]
    assert cols[-1] == "gradcampp_cam_rim_in_2mm" and len(cols) == 5 + 5 + 2
    m = _cube()
    row = quantify_instance((m * 2.0)[None], m, (1, 1, 1), channel_names=("CAM",),
                            method="gradcampp")
    assert list(row) == cols
    assert row["gradcampp_cam_sum_abs"] == 54.0  # 27 lesion voxels of 2, nothing around
    from instance_saliency.explain import table_columns
    tc = table_columns(("smoothgrad", "gradcampp"))
    assert "smoothgrad_flair_share" in tc and "gradcampp_cam_share" not in tc
    assert [c for c in tc if c.endswith("_share")] == ["smoothgrad_flair_share"]


def test_quantify_errors():
    m = _cube()
    sal = np.zeros((2,) + m.shape)
    with pytest.raises(InputError, match="empty"):
        quantify_instance(sal, np.zeros(m.shape, bool), (1, 1, 1))
    with pytest.raises(InputError, match="channel"):
        quantify_instance(sal[:1], m, (1, 1, 1))
    with pytest.raises(InputError, match="shape"):
        quantify_instance(sal[:, :-1], m, (1, 1, 1))
    with pytest.raises(InputError, match=r"\(C, X, Y, Z\)"):
        quantify_instance(sal[0], m, (1, 1, 1))
    bad = sal.copy()
    bad[0, 10, 10, 10] = np.nan
    with pytest.raises(InputError, match="NaN"):
        quantify_instance(bad, m, (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        quantify_instance(sal, m, (1, 1))
    with pytest.raises(InputError, match="share_margin_mm"):
        quantify_instance(sal, m, (1, 1, 1), share_margin_mm=-1)
    with pytest.raises(InputError, match="binary"):
        shell_means(sal[0], m * 2, (1, 1, 1))
    # NaN far from the lesion is outside the crop and ignored
    far = sal.copy()
    far[0, 0, 0, 0] = np.nan
    assert quantify_instance(far, m, (1, 1, 1))["smoothgrad_flair_mean_in"] == 0.0
