"""Segmentation metrics for binary 3D lesion masks.

Voxel-wise overlap (Dice, normalised Dice), lesion-wise detection (true/false positive and
false negative lesions, lesion F1, sensitivity, false discovery rate) and volume
differences. Definitions follow the Shifts multiple sclerosis white-matter-lesion (MS-WML)
benchmark, so that numbers are comparable with results published on it.

All functions take a ground-truth mask ``gt`` and a predicted mask ``pred`` of the same
shape, as ``bool`` arrays or as integer / floating-point arrays holding only 0 and 1. Only
numpy and cc3d (connected-components-3d) are used, no torch.

References
----------
.. [1] L. R. Dice, "Measures of the amount of ecologic association between species",
   Ecology 26(3), 297-302, 1945.
.. [2] V. Raina, N. Molchanova, M. Graziani, A. Malinin, H. Muller, M. Bach Cuadra,
   M. Gales, "Tackling bias in the Dice similarity coefficient: introducing nDSC for white
   matter lesion segmentation", IEEE ISBI 2023. arXiv:2302.05432.
.. [3] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional
   shifts", arXiv:2206.15407, 2022.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cc3d
import numpy as np

from .errors import InputError

__all__ = [
    "absolute_volume_difference",
    "dice",
    "evaluate_pair",
    "lesion_detection",
    "lesion_f1",
    "ndsc",
    "relative_volume_difference",
]

#: Connectivities accepted for 3D connected-component labelling (faces, +edges, +corners).
VALID_CONNECTIVITIES = (6, 18, 26)


# --------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------


def _as_binary(name: str, array) -> np.ndarray:
    """Return ``array`` as a ``bool`` ndarray, or raise InputError if it is not 0/1."""
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name} must be a bool, integer or float mask, got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise InputError(f"{name} must be a binary mask holding only 0 and 1")
    return arr == 1


def _check_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ground-truth / prediction pair and return both as bool arrays."""
    gt_arr = np.asarray(gt)
    pred_arr = np.asarray(pred)
    if gt_arr.shape != pred_arr.shape:
        raise InputError(
            f"gt and pred must have the same shape, got {gt_arr.shape} and {pred_arr.shape}"
        )
    return _as_binary("gt", gt_arr), _as_binary("pred", pred_arr)


def _check_3d(gt: np.ndarray) -> None:
    if gt.ndim != 3:
        raise InputError(f"lesion-wise metrics need 3D masks, got {gt.ndim} dimension(s)")


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in VALID_CONNECTIVITIES:
        raise InputError(f"connectivity must be one of 6, 18 or 26, got {connectivity!r}")


def _check_iou_threshold(iou_threshold: float) -> None:
    if not (0.0 < float(iou_threshold) <= 1.0):
        raise InputError(f"iou_threshold must lie in (0, 1], got {iou_threshold!r}")


def _check_r(r: float) -> None:
    if not (0.0 < float(r) < 1.0):
        raise InputError(f"r must lie in (0, 1), got {r!r}")


def _voxel_volume(spacing: Sequence[float], ndim: int) -> float:
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise InputError(f"spacing must be a sequence of numbers, got {spacing!r}") from None
    if len(values) != ndim:
        raise InputError(f"spacing must have {ndim} values (one per axis), got {len(values)}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing values must be positive and finite, got {tuple(values)}")
    return float(np.prod(values))


def _check_voxel_volume(voxel_volume_mm3: float) -> float:
    value = float(voxel_volume_mm3)
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"voxel_volume_mm3 must be positive and finite, got {voxel_volume_mm3!r}")
    return value


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


# --------------------------------------------------------------------------------------
# voxel-wise overlap
# --------------------------------------------------------------------------------------


def _dice(gt: np.ndarray, pred: np.ndarray) -> float:
    total = int(np.count_nonzero(gt)) + int(np.count_nonzero(pred))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(gt & pred)) / total


def _ndsc(gt: np.ndarray, pred: np.ndarray, r: float) -> float:
    n_gt = int(np.count_nonzero(gt))
    n_pred = int(np.count_nonzero(pred))
    if n_gt == 0 and n_pred == 0:
        return 1.0
    tp = int(np.count_nonzero(gt & pred))
    if tp == 0:
        return 0.0
    fp = n_pred - tp
    fn = n_gt - tp
    if fp == 0:
        fp_scaled = 0.0  # also covers gt filling the whole volume, where k is undefined
    else:
        k = (1.0 - r) * n_gt / (r * (gt.size - n_gt)) if n_gt > 0 else 1.0
        fp_scaled = k * fp
    # Harmonic mean of precision tp/(tp + k fp) and recall tp/(tp + fn).
    return 2.0 * tp / (2.0 * tp + fp_scaled + fn)


def dice(gt, pred) -> float:
    """Dice similarity coefficient of two binary masks.

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1. Any number of
        dimensions is accepted as long as ``pred`` has the same shape.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.

    Returns
    -------
    float
        ``2 |gt & pred| / (|gt| + |pred|)`` in [0, 1]; 1.0 when both masks are empty.

    Raises
    ------
    InputError
        If the shapes differ or a mask holds values other than 0 and 1.

    References
    ----------
    .. [1] L. R. Dice, "Measures of the amount of ecologic association between species",
       Ecology 26(3), 297-302, 1945.
    """
    gt_b, pred_b = _check_pair(gt, pred)
    return _dice(gt_b, pred_b)


def ndsc(gt, pred, r: float = 0.001) -> float:
    """Normalised Dice similarity coefficient (nDSC).

    Dice with the false positives rescaled by ``k = (1 - r) |gt| / (r (N - |gt|))``, where
    ``N`` is the number of voxels, so that the score no longer depends on the lesion load:
    it is the Dice a prediction would get on a scan whose lesion fraction is ``r``.
    ``nDSC = 2 P R / (P + R)`` with ``P = tp / (tp + k fp)`` and ``R = tp / (tp + fn)``,
    i.e. ``2 tp / (2 tp + k fp + fn)``. Same definition as the Shifts MS-WML benchmark
    (which sums in float32; this float64 version differs from it by less than 1e-7).

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.
    r : float, default 0.001
        Reference lesion fraction (lesion voxels / all voxels), in (0, 1).

    Returns
    -------
    float
        nDSC in [0, 1]. 1.0 when both masks are empty, 0.0 when they share no voxel
        (including an empty ``gt`` with a non-empty ``pred``, where ``k = 1``).

    Raises
    ------
    InputError
        If the shapes differ, a mask holds values other than 0 and 1, or ``r`` is not in
        (0, 1).

    References
    ----------
    .. [1] V. Raina, N. Molchanova, M. Graziani, A. Malinin, H. Muller, M. Bach Cuadra,
       M. Gales, "Tackling bias in the Dice similarity coefficient: introducing nDSC for
       white matter lesion segmentation", IEEE ISBI 2023. arXiv:2302.05432.
    """
    _check_r(r)
    gt_b, pred_b = _check_pair(gt, pred)
    return _ndsc(gt_b, pred_b, float(r))


# --------------------------------------------------------------------------------------
# lesion-wise detection
# --------------------------------------------------------------------------------------


def _best_ious(
    gt: np.ndarray, pred: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Label both masks and return each lesion's best IoU with a single lesion of the other.

    Returns ``(gt_best, pred_best)``: ``gt_best[i]`` is the largest IoU of ground-truth
    lesion ``i + 1`` with any one predicted lesion (0.0 when it touches none), and
    ``pred_best[j]`` the same for predicted lesion ``j + 1``.
    """
    gt_lab, n_gt = cc3d.connected_components(
        np.ascontiguousarray(gt), connectivity=connectivity, return_N=True
    )
    pred_lab, n_pred = cc3d.connected_components(
        np.ascontiguousarray(pred), connectivity=connectivity, return_N=True
    )
    n_gt, n_pred = int(n_gt), int(n_pred)
    gt_best = np.zeros(n_gt + 1, dtype=np.float64)
    pred_best = np.zeros(n_pred + 1, dtype=np.float64)
    if n_gt and n_pred:
        gt_sizes = np.bincount(gt_lab[gt].astype(np.int64), minlength=n_gt + 1)
        pred_sizes = np.bincount(pred_lab[pred].astype(np.int64), minlength=n_pred + 1)
        both = gt & pred
        pair_keys = gt_lab[both].astype(np.int64) * (n_pred + 1) + pred_lab[both]
        keys, inter = np.unique(pair_keys, return_counts=True)
        g_idx, p_idx = np.divmod(keys, n_pred + 1)
        iou = inter / (gt_sizes[g_idx] + pred_sizes[p_idx] - inter)
        np.maximum.at(gt_best, g_idx, iou)
        np.maximum.at(pred_best, p_idx, iou)
    return gt_best[1:], pred_best[1:]


def _lesion_detection(
    gt: np.ndarray, pred: np.ndarray, iou_threshold: float, connectivity: int
) -> dict:
    gt_best, pred_best = _best_ious(gt, pred, connectivity)
    n_gt, n_pred = len(gt_best), len(pred_best)
    tp = int(np.count_nonzero(pred_best >= iou_threshold))
    fp = n_pred - tp
    fn = int(np.count_nonzero(gt_best < iou_threshold))
    n_detected = n_gt - fn
    denom = tp + 0.5 * (fp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_gt_lesions": n_gt,
        "n_pred_lesions": n_pred,
        "n_gt_detected": n_detected,
        "f1": 1.0 if denom == 0 else tp / denom,
        "tpr": _ratio(n_detected, n_gt),
        "fnr": _ratio(fn, n_gt),
        "fdr": _ratio(fp, n_pred),
    }


def lesion_detection(gt, pred, iou_threshold: float = 0.25, connectivity: int = 6) -> dict:
    """Lesion-wise detection counts and rates (Shifts MS-WML definition).

    Lesions are the connected components of each mask. The IoU of a ground-truth lesion
    ``g`` and a predicted lesion ``p`` is ``|g & p| / |g | p|``; each lesion is compared
    with every single lesion of the other mask it overlaps (no merging of lesions):

    * a predicted lesion is a true positive (TP) if its largest IoU with one ground-truth
      lesion is ``>= iou_threshold``, otherwise a false positive (FP);
    * a ground-truth lesion is a false negative (FN) if its largest IoU with one predicted
      lesion is ``< iou_threshold``, otherwise it counts as detected.

    As in Shifts, TP counts predicted lesions and FN counts ground-truth lesions, so
    ``tp + fn`` can differ from the number of ground-truth lesions when one prediction
    matches several ground-truth lesions (or the reverse).

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.
    iou_threshold : float, default 0.25
        Minimum IoU, in (0, 1], for a match. An IoU equal to the threshold matches.
    connectivity : {6, 18, 26}, default 6
        Voxel neighbourhood for connected components: shared faces (6), faces and edges
        (18), or faces, edges and corners (26). Shifts uses 6.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int): counts defined above.
        ``n_gt_lesions``, ``n_pred_lesions`` (int): number of lesions in each mask.
        ``n_gt_detected`` (int): ground-truth lesions that are not FN.
        ``f1`` (float): ``tp / (tp + (fp + fn) / 2)``; 1.0 when both masks are empty.
        ``tpr`` (float): lesion-wise sensitivity, ``n_gt_detected / n_gt_lesions``
        (equal to ``tp / (tp + fn)`` when matches are one-to-one).
        ``fnr`` (float): ``fn / n_gt_lesions = 1 - tpr``.
        ``fdr`` (float): lesion-wise false discovery rate, ``fp / (tp + fp)``.
        A rate whose denominator is zero is NaN.

    Raises
    ------
    InputError
        If the shapes differ, the masks are not 3D or not binary, ``connectivity`` is not
        6, 18 or 26, or ``iou_threshold`` is not in (0, 1].

    References
    ----------
    .. [1] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional
       shifts", arXiv:2206.15407, 2022 (lesion F1 of the MS-WML task).
    """
    _check_connectivity(connectivity)
    _check_iou_threshold(iou_threshold)
    gt_b, pred_b = _check_pair(gt, pred)
    _check_3d(gt_b)
    return _lesion_detection(gt_b, pred_b, float(iou_threshold), int(connectivity))


def lesion_f1(gt, pred, iou_threshold: float = 0.25, connectivity: int = 6) -> float:
    """Lesion-wise F1 score (Shifts MS-WML definition).

    ``F1 = tp / (tp + (fp + fn) / 2)`` with the lesion counts of :func:`lesion_detection`.

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.
    iou_threshold : float, default 0.25
        Minimum IoU, in (0, 1], between a lesion and one lesion of the other mask.
    connectivity : {6, 18, 26}, default 6
        Voxel neighbourhood for connected components.

    Returns
    -------
    float
        Lesion F1 in [0, 1]; 1.0 when both masks are empty.

    Raises
    ------
    InputError
        If the shapes differ, the masks are not 3D or not binary, or an option is invalid.

    References
    ----------
    .. [1] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional
       shifts", arXiv:2206.15407, 2022.
    """
    return lesion_detection(gt, pred, iou_threshold=iou_threshold, connectivity=connectivity)[
        "f1"
    ]


# --------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------


def absolute_volume_difference(gt, pred, voxel_volume_mm3: float = 1.0) -> float:
    """Absolute difference of the lesion volumes, ``|V_pred - V_gt|``.

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.
    voxel_volume_mm3 : float, default 1.0
        Volume of one voxel in mm^3 (product of the voxel spacing in mm).

    Returns
    -------
    float
        Absolute volume difference in mm^3.

    Raises
    ------
    InputError
        If the shapes differ, a mask is not binary, or ``voxel_volume_mm3`` is not positive.
    """
    vv = _check_voxel_volume(voxel_volume_mm3)
    gt_b, pred_b = _check_pair(gt, pred)
    return abs(int(np.count_nonzero(pred_b)) - int(np.count_nonzero(gt_b))) * vv


def relative_volume_difference(gt, pred) -> float:
    """Absolute volume difference relative to the ground-truth volume, ``|V_pred - V_gt| / V_gt``.

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.

    Returns
    -------
    float
        Unitless ratio (0.5 means the predicted volume is off by half the true volume).
        0.0 when both masks are empty, ``inf`` when only ``gt`` is empty.

    Raises
    ------
    InputError
        If the shapes differ or a mask is not binary.
    """
    gt_b, pred_b = _check_pair(gt, pred)
    n_gt = int(np.count_nonzero(gt_b))
    diff = abs(int(np.count_nonzero(pred_b)) - n_gt)
    if n_gt == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / n_gt


# --------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------


def evaluate_pair(
    gt,
    pred,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    iou_threshold: float = 0.25,
    connectivity: int = 6,
    r: float = 0.001,
) -> dict:
    """All metrics of one ground-truth / prediction pair.

    The masks are validated and labelled once.

    Parameters
    ----------
    gt : array_like, shape (X, Y, Z)
        Ground-truth mask; bool, or integer / float holding only 0 and 1.
    pred : array_like, shape (X, Y, Z)
        Predicted mask, same shape and value rules as ``gt``.
    spacing : sequence of 3 float, default (1, 1, 1)
        Voxel size along each axis in mm; used for the volumes only.
    iou_threshold : float, default 0.25
        IoU threshold of the lesion-wise metrics, in (0, 1].
    connectivity : {6, 18, 26}, default 6
        Voxel neighbourhood for connected components.
    r : float, default 0.001
        Reference lesion fraction of nDSC, in (0, 1).

    Returns
    -------
    dict
        ``dice``, ``ndsc`` (float): voxel-wise overlap, see :func:`dice`, :func:`ndsc`.
        ``lesion_f1``, ``lesion_tpr``, ``lesion_fdr``, ``lesion_fnr`` (float): lesion-wise
        F1, sensitivity, false discovery rate and miss rate, see :func:`lesion_detection`
        (NaN where a denominator is zero).
        ``n_tp``, ``n_fp``, ``n_fn``, ``n_gt_lesions``, ``n_pred_lesions`` (int): lesion
        counts.
        ``gt_volume_mm3``, ``pred_volume_mm3``, ``abs_volume_diff_mm3`` (float): lesion
        volumes and their absolute difference in mm^3.

    Raises
    ------
    InputError
        If the shapes differ, the masks are not 3D or not binary, or an option is invalid.

    References
    ----------
    .. [1] V. Raina et al., "Tackling bias in the Dice similarity coefficient: introducing
       nDSC for white matter lesion segmentation", IEEE ISBI 2023. arXiv:2302.05432.
    .. [2] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional
       shifts", arXiv:2206.15407, 2022.
    """
    _check_connectivity(connectivity)
    _check_iou_threshold(iou_threshold)
    _check_r(r)
    gt_b, pred_b = _check_pair(gt, pred)
    _check_3d(gt_b)
    voxel_volume = _voxel_volume(spacing, gt_b.ndim)

    det = _lesion_detection(gt_b, pred_b, float(iou_threshold), int(connectivity))
    n_gt_vox = int(np.count_nonzero(gt_b))
    n_pred_vox = int(np.count_nonzero(pred_b))
    return {
        "dice": _dice(gt_b, pred_b),
        "ndsc": _ndsc(gt_b, pred_b, float(r)),
        "lesion_f1": det["f1"],
        "lesion_tpr": det["tpr"],
        "lesion_fdr": det["fdr"],
        "lesion_fnr": det["fnr"],
        "n_tp": det["tp"],
        "n_fp": det["fp"],
        "n_fn": det["fn"],
        "n_gt_lesions": det["n_gt_lesions"],
        "n_pred_lesions": det["n_pred_lesions"],
        "gt_volume_mm3": n_gt_vox * voxel_volume,
        "pred_volume_mm3": n_pred_vox * voxel_volume,
        "abs_volume_diff_mm3": abs(n_pred_vox - n_gt_vox) * voxel_volume,
    }
