"""Tests of instance_saliency.metrics: reference values plus hand-computed synthetic cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from instance_saliency.errors import InputError
from instance_saliency.metrics import (
    absolute_volume_difference,
    dice,
    evaluate_pair,
    lesion_detection,
    lesion_f1,
    ndsc,
    relative_volume_difference,
)

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
CASES_NPZ = REFERENCE_DIR / "metrics_cases.npz"
EXPECTED_JSON = REFERENCE_DIR / "metrics_expected.json"

EVALUATE_KEYS = {
    "dice",
    "ndsc",
    "lesion_f1",
    "lesion_tpr",
    "lesion_fdr",
    "lesion_fnr",
    "n_tp",
    "n_fp",
    "n_fn",
    "n_gt_lesions",
    "n_pred_lesions",
    "gt_volume_mm3",
    "pred_volume_mm3",
    "abs_volume_diff_mm3",
}


# --------------------------------------------------------------------------------------
# reference values (Shifts MS-WML implementation, precomputed)
# --------------------------------------------------------------------------------------


def _expected_cases() -> list[dict]:
    if not EXPECTED_JSON.is_file():
        return []
    return json.loads(EXPECTED_JSON.read_text())


@pytest.fixture(scope="module")
def reference_cases():
    if not (CASES_NPZ.is_file() and EXPECTED_JSON.is_file()):
        pytest.skip(f"reference metric cases not found under {REFERENCE_DIR}")
    with np.load(CASES_NPZ) as data:
        return {key: data[key] for key in data.files}


_EXPECTED = _expected_cases()


@pytest.mark.skipif(not _EXPECTED, reason=f"reference metric cases not found under {REFERENCE_DIR}")
@pytest.mark.parametrize("expected", _EXPECTED, ids=[e["case"] for e in _EXPECTED])
def test_reference_values(reference_cases, expected):
    gt = reference_cases[f"{expected['case']}__gt"]
    pred = reference_cases[f"{expected['case']}__pred"]
    assert dice(gt, pred) == pytest.approx(expected["dice"], abs=1e-6)
    assert ndsc(gt, pred) == pytest.approx(expected["ndsc"], abs=1e-6)
    assert lesion_f1(gt, pred) == pytest.approx(expected["lesion_f1_iou025_6conn"], abs=1e-6)
    result = evaluate_pair(gt, pred)
    assert set(result) == EVALUATE_KEYS
    assert result["dice"] == pytest.approx(expected["dice"], abs=1e-6)
    assert result["ndsc"] == pytest.approx(expected["ndsc"], abs=1e-6)
    assert result["lesion_f1"] == pytest.approx(expected["lesion_f1_iou025_6conn"], abs=1e-6)


# --------------------------------------------------------------------------------------
# synthetic cases
# --------------------------------------------------------------------------------------


def _vol(shape=(12, 12, 12)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def test_two_cubes_one_matched_one_false_positive():
    gt = _vol()
    gt[1:4, 1:4, 1:4] = True  # 27 voxels
    pred = gt.copy()
    pred[7:9, 7:9, 7:9] = True  # separate 8-voxel cube
    det = lesion_detection(gt, pred)
    assert (det["tp"], det["fp"], det["fn"]) == (1, 1, 0)
    assert (det["n_gt_lesions"], det["n_pred_lesions"], det["n_gt_detected"]) == (1, 2, 1)
    assert det["f1"] == pytest.approx(1 / 1.5)
    assert det["tpr"] == 1.0
    assert det["fnr"] == 0.0
    assert det["fdr"] == 0.5
    assert dice(gt, pred) == pytest.approx(54 / 62)

    res = evaluate_pair(gt, pred, spacing=(0.5, 0.5, 2.0))  # 0.5 mm^3 voxels
    assert set(res) == EVALUATE_KEYS
    assert (res["n_tp"], res["n_fp"], res["n_fn"]) == (1, 1, 0)
    assert (res["n_gt_lesions"], res["n_pred_lesions"]) == (1, 2)
    assert res["gt_volume_mm3"] == pytest.approx(13.5)
    assert res["pred_volume_mm3"] == pytest.approx(17.5)
    assert res["abs_volume_diff_mm3"] == pytest.approx(4.0)
    assert isinstance(res["n_tp"], int) and isinstance(res["dice"], float)


def test_missed_lesion_is_false_negative():
    gt = _vol()
    gt[1:4, 1:4, 1:4] = True
    gt[7:9, 7:9, 7:9] = True
    pred = _vol()
    pred[1:4, 1:4, 1:4] = True
    det = lesion_detection(gt, pred)
    assert (det["tp"], det["fp"], det["fn"]) == (1, 0, 1)
    assert det["f1"] == pytest.approx(1 / 1.5)
    assert det["tpr"] == 0.5
    assert det["fnr"] == 0.5
    assert det["fdr"] == 0.0


def test_iou_exactly_at_threshold_counts_as_match():
    gt = _vol()
    gt[2, 2, 2:6] = True  # 4-voxel lesion
    pred = _vol()
    pred[2, 2, 2] = True  # IoU = 1/4
    det = lesion_detection(gt, pred, iou_threshold=0.25)
    assert (det["tp"], det["fp"], det["fn"]) == (1, 0, 0)
    assert det["f1"] == 1.0
    above = lesion_detection(gt, pred, iou_threshold=0.26)
    assert (above["tp"], above["fp"], above["fn"]) == (0, 1, 1)
    assert above["f1"] == 0.0


def test_connectivity_changes_lesion_count_for_diagonal_voxels():
    gt = _vol((4, 4, 4))
    gt[0, 0, 0] = True
    gt[1, 1, 1] = True  # touches the first voxel at a corner only
    pred = _vol((4, 4, 4))
    pred[0, 0, 0] = True

    six = lesion_detection(gt, pred, connectivity=6)
    assert six["n_gt_lesions"] == 2
    assert (six["tp"], six["fp"], six["fn"]) == (1, 0, 1)
    assert six["f1"] == pytest.approx(2 / 3)

    eighteen = lesion_detection(gt, pred, connectivity=18)
    assert eighteen["n_gt_lesions"] == 2

    twenty_six = lesion_detection(gt, pred, connectivity=26)
    assert twenty_six["n_gt_lesions"] == 1  # IoU = 1/2
    assert (twenty_six["tp"], twenty_six["fp"], twenty_six["fn"]) == (1, 0, 0)
    assert twenty_six["f1"] == 1.0


def test_edge_neighbours_join_at_18_connectivity():
    gt = _vol((4, 4, 4))
    gt[0, 0, 0] = True
    gt[1, 1, 0] = True  # shares an edge
    assert lesion_detection(gt, gt, connectivity=6)["n_gt_lesions"] == 2
    assert lesion_detection(gt, gt, connectivity=18)["n_gt_lesions"] == 1
    assert lesion_detection(gt, gt, connectivity=26)["n_gt_lesions"] == 1


def test_fragmented_prediction_is_not_merged():
    # Shifts compares a lesion with each single lesion of the other mask, not with their
    # union: two 1-voxel fragments of an 8-voxel lesion each have IoU 1/8 < 0.25, although
    # their union would reach IoU 2/8 = 0.25.
    gt = _vol()
    gt[5, 5, 2:10] = True
    pred = _vol()
    pred[5, 5, 2] = True
    pred[5, 5, 4] = True
    det = lesion_detection(gt, pred)
    assert (det["tp"], det["fp"], det["fn"]) == (0, 2, 1)
    assert det["f1"] == 0.0


def test_one_prediction_covering_two_lesions():
    gt = _vol()
    gt[5, 5, 2:4] = True
    gt[5, 5, 5:7] = True  # two 2-voxel lesions, one voxel apart
    pred = _vol()
    pred[5, 5, 2:7] = True  # IoU 2/5 with each
    det = lesion_detection(gt, pred)
    assert (det["tp"], det["fp"], det["fn"]) == (1, 0, 0)
    assert (det["n_gt_lesions"], det["n_gt_detected"]) == (2, 2)
    assert det["f1"] == 1.0
    assert det["tpr"] == 1.0


def test_both_empty():
    gt = _vol()
    assert dice(gt, gt) == 1.0
    assert ndsc(gt, gt) == 1.0
    assert lesion_f1(gt, gt) == 1.0
    res = evaluate_pair(gt, gt)
    assert (res["n_tp"], res["n_fp"], res["n_fn"]) == (0, 0, 0)
    assert res["lesion_f1"] == 1.0
    assert math.isnan(res["lesion_tpr"]) and math.isnan(res["lesion_fdr"])
    assert res["abs_volume_diff_mm3"] == 0.0
    assert relative_volume_difference(gt, gt) == 0.0


def test_empty_ground_truth_with_prediction():
    gt = _vol()
    pred = _vol()
    pred[3:5, 3:5, 3:5] = True
    assert dice(gt, pred) == 0.0
    assert ndsc(gt, pred) == 0.0
    det = lesion_detection(gt, pred)
    assert (det["tp"], det["fp"], det["fn"]) == (0, 1, 0)
    assert det["f1"] == 0.0
    assert det["fdr"] == 1.0
    assert math.isnan(det["tpr"])
    assert relative_volume_difference(gt, pred) == math.inf


def test_empty_prediction():
    gt = _vol()
    gt[3:5, 3:5, 3:5] = True
    pred = _vol()
    assert dice(gt, pred) == 0.0
    assert ndsc(gt, pred) == 0.0
    det = lesion_detection(gt, pred)
    assert (det["tp"], det["fp"], det["fn"]) == (0, 0, 1)
    assert det["f1"] == 0.0
    assert det["tpr"] == 0.0 and det["fnr"] == 1.0
    assert math.isnan(det["fdr"])


def test_ndsc_hand_computed():
    # 1000 voxels, 10 lesion voxels, tp=8, fp=2, fn=2, r=0.001:
    # k = 0.999*10 / (0.001*990) = 111/11; nDSC = 16 / (16 + 2k + 2) = 176/420.
    gt = np.zeros((10, 10, 10), dtype=bool)
    gt[0, 0, :] = True
    pred = np.zeros_like(gt)
    pred[0, 0, :8] = True
    pred[9, 9, :2] = True
    assert ndsc(gt, pred) == pytest.approx(176 / 420, abs=1e-12)
    assert dice(gt, pred) == pytest.approx(0.8)


def test_ndsc_equals_dice_when_lesion_fraction_is_r():
    # 1 lesion voxel in 1000 voxels = r, so k = 1.
    gt = np.zeros((10, 10, 10), dtype=bool)
    gt[4, 4, 4] = True
    pred = gt.copy()
    pred[4, 4, 5] = True
    assert ndsc(gt, pred, r=0.001) == pytest.approx(dice(gt, pred), abs=1e-12)
    assert ndsc(gt, pred) == pytest.approx(2 / 3)


def test_ndsc_ground_truth_filling_volume():
    gt = np.ones((3, 3, 3), dtype=bool)
    pred = gt.copy()
    pred[0] = False
    assert ndsc(gt, pred) == pytest.approx(2 * 18 / (2 * 18 + 9))


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32, np.float64])
def test_accepts_bool_int_float_masks(dtype):
    gt = _vol()
    gt[1:4, 1:4, 1:4] = True
    pred = _vol()
    pred[2:5, 1:4, 1:4] = True
    expected = evaluate_pair(gt, pred)
    assert evaluate_pair(gt.astype(dtype), pred.astype(dtype)) == expected


def test_volume_differences():
    gt = _vol()
    gt[0, 0, :4] = True
    pred = _vol()
    pred[0, 0, :10] = True
    assert absolute_volume_difference(gt, pred) == 6.0
    assert absolute_volume_difference(gt, pred, voxel_volume_mm3=0.5) == 3.0
    assert relative_volume_difference(gt, pred) == pytest.approx(1.5)


def test_shape_mismatch_raises_input_error():
    with pytest.raises(InputError, match="same shape"):
        dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError):
        ndsc(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError):
        lesion_detection(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError):
        evaluate_pair(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError):
        absolute_volume_difference(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, np.nan])
def test_non_binary_values_raise_input_error(bad):
    gt = np.zeros((4, 4, 4))
    pred = np.zeros((4, 4, 4))
    pred[1, 1, 1] = bad
    with pytest.raises(InputError, match="binary"):
        dice(gt, pred)


def test_invalid_options_raise_input_error():
    m = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(InputError, match="connectivity"):
        lesion_detection(m, m, connectivity=8)
    with pytest.raises(InputError, match="iou_threshold"):
        lesion_f1(m, m, iou_threshold=0.0)
    with pytest.raises(InputError, match="r must"):
        ndsc(m, m, r=0.0)
    with pytest.raises(InputError, match="spacing"):
        evaluate_pair(m, m, spacing=(1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        evaluate_pair(m, m, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(InputError, match="3D"):
        lesion_detection(np.zeros((4, 4), dtype=bool), np.zeros((4, 4), dtype=bool))
    with pytest.raises(InputError, match="dtype"):
        dice(np.zeros((2, 2, 2), dtype=complex), np.zeros((2, 2, 2), dtype=complex))
    with pytest.raises(InputError, match="voxel_volume"):
        absolute_volume_difference(m, m, voxel_volume_mm3=0.0)


def test_input_error_is_value_error():
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2, 2)), np.zeros((3, 3, 3)))
