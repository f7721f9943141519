"""Connected components, instance geometry and TP/FP/FN matching (instance_saliency.instances)."""

import numpy as np
import pytest

from instance_saliency.errors import InputError
from instance_saliency.instances import (
    Instance,
    connected_components,
    find_instances,
    instance_mask,
    spacing_from_affine,
)


def _mask(shape, voxels):
    m = np.zeros(shape, dtype=bool)
    for v in voxels:
        m[v] = True
    return m


# ------------------------------------------------------------------ connectivity


@pytest.mark.parametrize(
    "second, expected",
    [
        ((1, 0, 0), {6: 1, 18: 1, 26: 1}),  # shared face
        ((1, 1, 0), {6: 2, 18: 1, 26: 1}),  # shared edge
        ((0, 1, 1), {6: 2, 18: 1, 26: 1}),  # shared edge, other plane
        ((1, 1, 1), {6: 2, 18: 2, 26: 1}),  # shared corner only
        ((2, 0, 0), {6: 2, 18: 2, 26: 2}),  # one voxel gap
    ],
)
def test_connectivity_face_edge_corner(second, expected):
    m = _mask((4, 4, 4), [(0, 0, 0), second])
    for conn, n_expected in expected.items():
        labels, n = connected_components(m, connectivity=conn)
        assert n == n_expected, conn
        assert labels.dtype == np.int32
        assert labels[0, 0, 0] == 1
        assert labels[second] == (1 if n_expected == 1 else 2)
        assert set(np.unique(labels)) == set(range(n + 1))


def test_connectivity_chain_of_edges_and_corners():
    # a diagonal staircase: (0,0,0)-(1,1,0) edge, (1,1,0)-(2,2,1) corner
    m = _mask((4, 4, 4), [(0, 0, 0), (1, 1, 0), (2, 2, 1)])
    assert connected_components(m, 6)[1] == 3
    assert connected_components(m, 18)[1] == 2
    assert connected_components(m, 26)[1] == 1


@pytest.mark.parametrize("conn", [0, 4, 8, 27, "26"])
def test_bad_connectivity(conn):
    with pytest.raises(InputError, match="connectivity"):
        connected_components(np.zeros((3, 3, 3), bool), connectivity=conn)


def test_empty_mask_and_validation():
    labels, n = connected_components(np.zeros((3, 4, 5), np.uint8))
    assert n == 0 and labels.shape == (3, 4, 5) and not labels.any()
    with pytest.raises(InputError, match="3D"):
        connected_components(np.zeros((3, 3), bool))
    with pytest.raises(InputError, match="binary"):
        connected_components(np.full((3, 3, 3), 2, np.uint8))
    with pytest.raises(InputError, match="min_size"):
        connected_components(np.zeros((3, 3, 3), bool), min_size=-1)
    with pytest.raises(InputError, match="min_size_unit"):
        connected_components(np.zeros((3, 3, 3), bool), min_size=1, min_size_unit="ml")
    # float 0/1 masks are fine
    _, n = connected_components(_mask((3, 3, 3), [(1, 1, 1)]).astype(np.float32))
    assert n == 1


# ------------------------------------------------------------------ size filter


def test_min_size_voxels():
    m = np.zeros((10, 10, 10), bool)
    m[0, 0, 0] = True  # 1 voxel, first in raster order
    m[3, 0, 0:3] = True  # 3 voxels
    m[6, 6, 0:5] = True  # 5 voxels
    labels, n = connected_components(m, min_size=0)
    assert n == 3
    labels, n = connected_components(m, min_size=3)
    assert n == 2
    # kept components renumbered 1..n in raster order; the 1-voxel one is gone
    assert labels[0, 0, 0] == 0
    assert (labels[3, 0, 0:3] == 1).all()
    assert (labels[6, 6, 0:5] == 2).all()
    assert (labels > 0).sum() == 8
    _, n = connected_components(m, min_size=4)
    assert n == 1
    _, n = connected_components(m, min_size=6)
    assert n == 0


def test_min_size_mm3_anisotropic():
    spacing = (1.0, 1.0, 3.0)  # 3 mm3 per voxel
    m = np.zeros((8, 8, 8), bool)
    m[0, 0, 0:2] = True  # 2 voxels = 6 mm3
    m[5, 5, 0:4] = True  # 4 voxels = 12 mm3
    _, n = connected_components(m, min_size=6, min_size_unit="mm3", spacing=spacing)
    assert n == 2  # exactly min_size is kept
    labels, n = connected_components(m, min_size=10, min_size_unit="mm3", spacing=spacing)
    assert n == 1
    assert labels[0, 0, 0] == 0 and (labels[5, 5, 0:4] == 1).all()
    # the same threshold in voxels keeps nothing (10 voxels > 4)
    assert connected_components(m, min_size=10)[1] == 0
    # isotropic 1 mm: 10 mm3 > 4 mm3, nothing kept
    assert connected_components(m, min_size=10, min_size_unit="mm3")[1] == 0
    # 0.1 mm isotropic: 0.004 mm3 = 4 voxels, only the 4-voxel component stays
    assert connected_components(m, min_size=0.004, min_size_unit="mm3",
                                spacing=(0.1, 0.1, 0.1))[1] == 1


# ------------------------------------------------------------------ stable labels


def test_labels_follow_c_order_raster():
    m = np.zeros((5, 8, 5), bool)
    m[0, 5, 0] = True  # C-order index 25 -> first
    m[1, 0, 0] = True  # C-order index 40 -> second (but first in x-fastest order)
    m[0, 7, 4] = True  # C-order index 39 -> between the two
    labels, n = connected_components(m)
    assert n == 3
    assert labels[0, 5, 0] == 1
    assert labels[0, 7, 4] == 2
    assert labels[1, 0, 0] == 3
    # memory layout does not matter
    labels_f, _ = connected_components(np.asfortranarray(m))
    np.testing.assert_array_equal(labels, labels_f)


def test_labels_stable_random_mask():
    rng = np.random.default_rng(0)
    m = rng.random((20, 21, 22)) > 0.85
    labels1, n1 = connected_components(m, connectivity=6)
    labels2, n2 = connected_components(m.copy(), connectivity=6)
    assert n1 == n2 > 20
    np.testing.assert_array_equal(labels1, labels2)
    flat = labels1.ravel()
    firsts = [np.flatnonzero(flat == k)[0] for k in range(1, n1 + 1)]
    assert firsts == sorted(firsts)
    # the labelling partitions the mask
    np.testing.assert_array_equal(labels1 > 0, m)


# ------------------------------------------------------------------ matching


def _matching_case():
    """Hand-built case where overlap and IoU matching disagree (P1 vs G1)."""
    shape = (12, 12, 12)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    # P1 and G1 share a single voxel (0,0,0): overlap -> TP / matched; IoU = 1/19
    pred[0, 0, 0:10] = True  # P1, 10 voxels
    gt[0:10, 0, 0] = True  # G1, 10 voxels, crosses P1 at (0,0,0)
    # P2 identical to G2 -> TP under both
    pred[4:6, 4:6, 4:6] = True
    gt[4:6, 4:6, 4:6] = True
    # P3 alone -> FP under both
    pred[10, 10, 10] = True
    # G3 alone -> FN under both
    gt[8:10, 8:10, 2] = True
    return pred, gt


def test_overlap_matching():
    pred, gt = _matching_case()
    s = find_instances(pred, gt, matching="overlap")
    assert [i.label for i in s] == [1, 2, 3, 4]
    assert [(i.status, i.source) for i in s] == [("TP", "pred"), ("TP", "pred"),
                                                   ("FP", "pred"), ("FN", "gt")]
    assert [i.voxels for i in s] == [10, 8, 1, 4]
    assert s.instances[0].iou == pytest.approx(1 / 19)
    assert s.instances[1].iou == pytest.approx(1.0)
    assert s.instances[2].iou == 0.0
    assert s.instances[3].iou == 0.0
    assert s.counts() == {"TP": 2, "FP": 1, "FN": 1, "unknown": 0}
    # the FN instance is GT component 3 (raster order: G1, G2, G3)
    assert s.instances[3].component == 3
    np.testing.assert_array_equal(s.label_map == 4, gt & (s.gt_labels == 3))


def test_iou_matching_differs():
    pred, gt = _matching_case()
    s = find_instances(pred, gt, matching="iou", iou_threshold=0.25)
    assert [(i.label, i.status, i.source, i.component) for i in s] == [
        (1, "FP", "pred", 1),  # IoU 1/19 < 0.25
        (2, "TP", "pred", 2),
        (3, "FP", "pred", 3),
        (4, "FN", "gt", 1),  # G1: IoU 1/19 < 0.25 -> missed
        (5, "FN", "gt", 3),
    ]
    # threshold low enough: P1 TP and G1 no longer FN
    s2 = find_instances(pred, gt, matching="iou", iou_threshold=0.05)
    assert [i.status for i in s2] == ["TP", "TP", "FP", "FN"]
    # G1 overlaps P1 at (0,0,0): predicted label wins in the combined map ...
    lm = s.label_map
    assert lm[0, 0, 0] == 1
    assert (lm == 4).sum() == 9
    # ... but the instance mask is exact
    g1 = instance_mask(s, 4)
    assert g1.sum() == 10 and g1[0, 0, 0]
    np.testing.assert_array_equal(g1, s.gt_labels == 1)
    np.testing.assert_array_equal(s.mask(s.instances[0]), s.pred_labels == 1)
    crop = instance_mask(s, s.instances[3], crop=True)
    assert crop.shape == (10, 1, 1) and crop.all()


def test_iou_uses_best_single_component_not_union():
    # Shifts MS-WML rule: each component is compared with every SINGLE overlapping component
    # of the other mask; overlapping components are never merged.
    shape = (10, 10, 10)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    pred[0:8, 0, 0] = True  # P, one predicted component of 8 voxels
    gt[0:2, 0, 0] = True  # G1, 2 voxels, inside P
    gt[4:6, 0, 0] = True  # G2, 2 voxels, inside P
    # P vs G1: |P & G1| = 2, |P | G1| = 8 -> IoU 2/8; same for G2. (P vs G1 u G2 would be
    # 4/8 = 0.5, which the former union rule used: TP, G1/G2 FN.)
    s = find_instances(pred, gt, matching="iou", iou_threshold=0.5)
    assert [(i.status, i.source, i.component) for i in s] == [
        ("FP", "pred", 1), ("FN", "gt", 1), ("FN", "gt", 2)]
    assert [i.iou for i in s] == [pytest.approx(0.25)] * 3
    # at the threshold 0.25 every pair matches (>= for TP, < for FN): P TP, nothing missed
    s25 = find_instances(pred, gt, matching="iou", iou_threshold=0.25)
    assert [(i.status, i.iou) for i in s25] == [("TP", pytest.approx(0.25))]
    assert s25.counts() == {"TP": 1, "FP": 0, "FN": 0, "unknown": 0}
    # just above: P FP and both lesions missed
    assert find_instances(pred, gt, matching="iou", iou_threshold=0.2501).counts() == {
        "TP": 0, "FP": 1, "FN": 2, "unknown": 0}
    # overlap matching: nothing missed; the reported IoU is the same best single IoU
    s_ov = find_instances(pred, gt)
    assert [(i.status, i.iou) for i in s_ov] == [("TP", pytest.approx(0.25))]


def test_iou_best_single_is_max_over_pairs():
    # one prediction overlapping two lesions of different sizes: the better pair decides
    shape = (12, 12, 12)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    pred[0, 0, 0:6] = True  # P, 6 voxels
    gt[0, 0, 0:4] = True  # G1, 4 voxels inside P: IoU 4/6
    gt[0, 0, 5:11] = True  # G2, 6 voxels, shares 1 voxel with P: IoU 1/11
    s = find_instances(pred, gt, matching="iou", iou_threshold=0.5)
    assert [(i.status, i.source, i.component) for i in s] == [("TP", "pred", 1),
                                                              ("FN", "gt", 2)]
    assert s.instances[0].iou == pytest.approx(4 / 6)
    assert s.instances[1].iou == pytest.approx(1 / 11)


def _random_pair(seed, shape=(20, 20, 20)):
    """GT blobs and an edited prediction: each lesion missed, exact, shifted or cut in two;
    plus unrelated false-positive blobs."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)

    def blobs(q):
        f = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
        return f > np.quantile(f, q)

    gt = blobs(0.9)
    lab, n = ndimage.label(gt)
    pred = np.zeros(shape, bool)
    for k in range(1, n + 1):
        comp = lab == k
        r = rng.integers(4)
        if r == 0:
            continue  # missed
        if r == 1:
            pred |= comp  # exact
        elif r == 2:
            pred |= np.roll(comp, rng.integers(1, 3), axis=rng.integers(3))  # shifted
        else:  # cut by a plane through its centre
            c = np.argwhere(comp).mean(0).astype(int)
            idx = [slice(None)] * 3
            ax = rng.integers(3)
            idx[ax] = c[ax]
            comp[tuple(idx)] = False
            pred |= comp
    pred |= blobs(0.97) & ~ndimage.binary_dilation(gt, iterations=2)
    return gt, pred


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.25, 0.5])
def test_iou_matching_counts_equal_lesion_detection(seed, thr):
    # the Shifts MS-WML counts of metrics.lesion_detection (checked there against the
    # reference implementation); seeds 0, 1, 4, 5 at 0.5 and seed 0 at 0.25 distinguish the
    # single-lesion rule from the former union-of-overlapping-lesions rule
    from instance_saliency.metrics import lesion_detection

    gt, pred = _random_pair(seed)
    s = find_instances(pred, gt, matching="iou", connectivity=6, iou_threshold=thr)
    ref = lesion_detection(gt, pred, iou_threshold=thr, connectivity=6)
    c = s.counts()
    assert min(ref["tp"], ref["fp"], ref["fn"]) > 0  # a non-trivial case
    assert (c["TP"], c["FP"], c["FN"]) == (ref["tp"], ref["fp"], ref["fn"])
    assert s.n_pred == ref["n_pred_lesions"]
    assert int(s.gt_labels.max()) == ref["n_gt_lesions"]


def test_without_gt_unknown():
    pred, _ = _matching_case()
    s = find_instances(pred)
    assert s.gt_labels is None
    assert [i.status for i in s] == ["unknown"] * 3
    assert all(np.isnan(i.iou) for i in s)
    np.testing.assert_array_equal(s.label_map, s.pred_labels)


def test_min_size_filters_both_sides():
    shape = (10, 10, 10)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    pred[0, 0, 0] = True  # 1-voxel prediction, removed by min_size=2 ...
    gt[0, 0, 0:2] = True  # ... so the lesion it touched becomes FN
    pred[5, 5, 5:8] = True  # kept, FP
    gt[9, 9, 9] = True  # 1-voxel GT lesion: below min_size, not a lesion (not FN) either
    pred[9, 8, 9] = pred[9, 9, 9] = True  # a kept prediction overlapping only that voxel: FP
    s = find_instances(pred, gt, min_size=2)
    assert [(i.label, i.status, i.voxels) for i in s] == [(1, "FP", 3), (2, "FP", 2),
                                                            (3, "FN", 2)]
    assert s.pred_labels[0, 0, 0] == 0 and s.gt_labels[9, 9, 9] == 0
    s0 = find_instances(pred, gt)
    assert [i.status for i in s0] == ["TP", "FP", "TP"]


def test_gt_uses_same_connectivity():
    pred = np.zeros((6, 6, 6), bool)
    gt = np.zeros((6, 6, 6), bool)
    gt[0, 0, 0] = gt[1, 1, 1] = True  # corner neighbours
    pred[0, 0, 0] = True
    assert [i.status for i in find_instances(pred, gt, connectivity=26)] == ["TP"]
    assert [i.status for i in find_instances(pred, gt, connectivity=18)] == ["TP", "FN"]


def test_mask_validation():
    with pytest.raises(InputError, match="shape"):
        find_instances(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
    with pytest.raises(InputError, match="binary"):
        find_instances(np.zeros((4, 4, 4)), np.full((4, 4, 4), 0.5))
    with pytest.raises(InputError, match="matching"):
        find_instances(np.zeros((4, 4, 4), bool), matching="dice")
    with pytest.raises(InputError, match="iou_threshold"):
        find_instances(np.zeros((4, 4, 4), bool), iou_threshold=0)
    with pytest.raises(InputError, match="affine"):
        find_instances(np.zeros((4, 4, 4), bool), affine=np.eye(3))
    with pytest.raises(InputError, match="spacing"):
        find_instances(np.zeros((4, 4, 4), bool), spacing=(1, 0, 1))
    s = find_instances(np.zeros((4, 4, 4), bool))
    assert len(s) == 0
    with pytest.raises(InputError, match="no instance"):
        instance_mask(s, 1)


# ------------------------------------------------------------------ geometry


def test_volume_centroid_with_affine():
    # axes permuted and flipped, anisotropic, translated
    affine = np.array([[0.0, -2.0, 0.0, 10.0],
                       [3.0, 0.0, 0.0, -5.0],
                       [0.0, 0.0, 4.0, 7.0],
                       [0.0, 0.0, 0.0, 1.0]])
    assert spacing_from_affine(affine) == (3.0, 2.0, 4.0)
    pred = np.zeros((5, 6, 7), bool)
    pred[1, 2, 3:5] = True  # 2 voxels
    pred[3:5, 4, 6] = True  # 2 voxels, second component
    s = find_instances(pred, affine=affine)
    a, b = s.instances
    assert a.voxels == 2 and a.volume_mm3 == pytest.approx(2 * 24.0)
    assert a.centroid_vox == pytest.approx((1.0, 2.0, 3.5))
    # x = -2*2 + 10, y = 3*1 - 5, z = 4*3.5 + 7
    assert a.centroid_mm == pytest.approx((6.0, -2.0, 21.0))
    assert a.bbox_start == (1, 2, 3) and a.bbox_stop == (2, 3, 5)
    assert a.bbox == (slice(1, 2), slice(2, 3), slice(3, 5))
    assert b.centroid_vox == pytest.approx((3.5, 4.0, 6.0))
    assert b.centroid_mm == pytest.approx((2.0, 5.5, 31.0))
    # explicit spacing overrides the affine's for volumes only
    s2 = find_instances(pred, affine=affine, spacing=(1, 1, 1))
    assert s2.instances[0].volume_mm3 == pytest.approx(2.0)
    assert s2.instances[0].centroid_mm == pytest.approx((6.0, -2.0, 21.0))


def test_to_dict_flat_row():
    pred = np.zeros((4, 4, 4), bool)
    pred[1, 1, 1] = True
    inst = find_instances(pred, affine=np.diag([2.0, 2.0, 2.0, 1.0])).instances[0]
    assert isinstance(inst, Instance)
    d = inst.to_dict()
    assert list(d) == [
        "label", "status", "source", "component", "voxels", "volume_mm3", "iou",
        "centroid_x_vox", "centroid_y_vox", "centroid_z_vox",
        "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
        "bbox_x_start", "bbox_y_start", "bbox_z_start",
        "bbox_x_stop", "bbox_y_stop", "bbox_z_stop",
    ]
    assert d["label"] == 1 and d["status"] == "unknown" and d["volume_mm3"] == 8.0
    assert d["centroid_x_mm"] == 2.0 and d["bbox_z_stop"] == 2
    assert all(not isinstance(v, (tuple, list, np.ndarray)) for v in d.values())
