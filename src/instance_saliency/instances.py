"""Lesion instances: connected components, their geometry, and TP/FP/FN matching.

An *instance* is one 3D connected component of a binary lesion mask. Every predicted component
is an instance (true positive ``"TP"`` or false positive ``"FP"`` when a ground-truth mask is
given, ``"unknown"`` otherwise); ground-truth lesions the model missed are added as false-negative
(``"FN"``) instances. Each instance is then explained and quantified on its own, as in the
instance-level saliency method of Spagnolo et al.

Instances store only small numbers (label, size, centroid, bounding box); their exact voxel
masks are recovered on demand from the label maps kept by :class:`InstanceSet`.

References
----------
.. [1] F. Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
   segmentation", arXiv:2406.09335, 2024.
.. [2] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional shifts",
   arXiv:2206.15407, 2022 (lesion-level IoU matching of the MS-WML task, which
   ``matching="iou"`` follows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cc3d
import numpy as np
from scipy import ndimage

from ._validate import check_spacing as _check_spacing
from .errors import InputError

__all__ = [
    "STATUSES",
    "Instance",
    "InstanceSet",
    "connected_components",
    "find_instances",
    "instance_mask",
    "spacing_from_affine",
]

#: the statuses an :class:`Instance` can carry
STATUSES = ("TP", "FP", "FN", "unknown")
_CONNECTIVITIES = (6, 18, 26)
_MIN_SIZE_UNITS = ("voxels", "mm3")
_MATCHINGS = ("overlap", "iou")
_AXES = ("x", "y", "z")


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_mask(mask, name: str) -> np.ndarray:
    """Return ``mask`` as a C-contiguous boolean 3D array, refusing anything not binary."""
    m = np.asarray(mask)
    if m.ndim != 3:
        raise InputError(f"{name} must be a 3D array (X, Y, Z), got shape {m.shape}")
    if m.dtype == bool:
        return np.ascontiguousarray(m)
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise InputError(f"{name} must be boolean or numeric, got dtype {m.dtype}")
    if not ((m == 0) | (m == 1)).all():
        raise InputError(f"{name} is not binary: values other than 0/1 found")
    return np.ascontiguousarray(m != 0)


def _check_affine(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    return a


def spacing_from_affine(affine) -> tuple:
    """Voxel spacing (mm) implied by a voxel-to-world affine.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Voxel-to-world affine (world units mm).

    Returns
    -------
    tuple of 3 float
        Euclidean norms of the affine's first three columns (the length in mm of one voxel step
        along each array axis).

    Raises
    ------
    InputError
        Affine not a finite 4x4 matrix, or with a zero-length column.
    """
    a = _check_affine(affine)
    return _check_spacing(np.linalg.norm(a[:3, :3], axis=0))


# --------------------------------------------------------------------------------------------
# connected components


def connected_components(mask, connectivity: int = 26, min_size: float = 0,
                         min_size_unit: str = "voxels", spacing=(1.0, 1.0, 1.0)):
    """Label the connected components of a binary 3D mask, with stable numbering.

    Parameters
    ----------
    mask : array_like, shape (X, Y, Z)
        Binary mask (bool, or numbers that are all 0 or 1).
    connectivity : {6, 18, 26}
        Voxel neighbourhood: 6 = shared face, 18 = face or edge, 26 = face, edge or corner.
    min_size : float
        Components *smaller* than this are removed (a component of exactly ``min_size`` is
        kept). 0 keeps everything.
    min_size_unit : {"voxels", "mm3"}
        Unit of ``min_size``; ``"mm3"`` converts a component's voxel count to a volume with
        ``spacing`` (volume = voxels * prod(spacing)).
    spacing : sequence of 3 float
        Voxel spacing in mm, used only when ``min_size_unit="mm3"``.

    Returns
    -------
    labels : ndarray, shape (X, Y, Z), int32
        0 = background, 1..n = components kept.
    n : int
        Number of components kept.

    Raises
    ------
    InputError
        Mask not 3D or not binary, connectivity not 6/18/26, negative or non-finite
        ``min_size``, unknown ``min_size_unit``, invalid spacing.

    Notes
    -----
    Labels are numbered 1..n in the order of each component's first voxel in a C-order
    (row-major: last axis fastest) raster scan of the array, counting only components kept
    after the size filter. The numbering depends on nothing but the mask and the parameters,
    so the same mask always gets the same labels.
    """
    m = _check_mask(mask, "mask")
    if connectivity not in _CONNECTIVITIES:
        raise InputError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    if min_size_unit not in _MIN_SIZE_UNITS:
        raise InputError(f"min_size_unit must be 'voxels' or 'mm3', got {min_size_unit!r}")
    try:
        min_size = float(min_size)
    except (TypeError, ValueError):
        raise InputError(f"min_size must be a non-negative number, got {min_size!r}") from None
    if not np.isfinite(min_size) or min_size < 0:
        raise InputError(f"min_size must be a non-negative number, got {min_size!r}")
    sp = _check_spacing(spacing)

    raw, n_raw = cc3d.connected_components(m.view(np.uint8), connectivity=connectivity,
                                           return_N=True)
    flat = raw.ravel(order="C")
    idx = np.flatnonzero(flat)  # ascending = C-order raster order
    out = np.zeros(m.shape, dtype=np.int32)
    if n_raw == 0:
        return out, 0
    lab = flat[idx].astype(np.int64)
    counts = np.bincount(lab, minlength=n_raw + 1)
    if min_size_unit == "mm3":
        size = counts * float(np.prod(sp))
        keep = size >= min_size * (1 - 1e-9)  # tolerate rounding of voxels * voxel volume
    else:
        keep = counts >= min_size
    keep[0] = False
    uniq, first = np.unique(lab, return_index=True)  # first occurrence in raster order
    kept = keep[uniq]
    uniq, first = uniq[kept], first[kept]
    order = uniq[np.argsort(first, kind="stable")]
    lut = np.zeros(n_raw + 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    out.ravel()[idx] = lut[lab]
    return out, int(order.size)


# --------------------------------------------------------------------------------------------
# instances


@dataclass
class Instance:
    """One lesion instance: a predicted component or a missed ground-truth lesion.

    Only small numbers are stored; the voxels themselves come from the label map of the source
    (see :meth:`mask` and :func:`instance_mask`).

    Attributes
    ----------
    label : int
        1-based instance label, stable for a given input: predicted components are 1..n
        (raster order, see :func:`connected_components`), false-negative ground-truth lesions
        n+1..n+m (in raster order of the ground-truth components).
    status : {"TP", "FP", "FN", "unknown"}
        Detection status; ``"unknown"`` when no ground truth was given.
    source : {"pred", "gt"}
        Label map the instance comes from.
    component : int
        Label of the instance in its source label map (``pred_labels`` or ``gt_labels``).
        Equal to ``label`` for predicted instances.
    voxels : int
        Number of voxels.
    volume_mm3 : float
        ``voxels * prod(spacing)``, in mm^3.
    centroid_vox : tuple of 3 float
        Mean voxel index (array axes 0, 1, 2).
    centroid_mm : tuple of 3 float
        ``centroid_vox`` mapped to world coordinates (mm) by the affine.
    bbox_start, bbox_stop : tuple of 3 int
        Bounding box in voxel indices, ``stop`` exclusive.
    iou : float
        Best intersection over union of the instance with any single component of the other
        source that overlaps it (0.0 when none does; NaN without ground truth).
    """

    label: int
    status: str
    source: str
    component: int
    voxels: int
    volume_mm3: float
    centroid_vox: tuple
    centroid_mm: tuple
    bbox_start: tuple
    bbox_stop: tuple
    iou: float = float("nan")

    @property
    def bbox(self) -> tuple:
        """Bounding box as a tuple of 3 ``slice`` objects (index an ``(X, Y, Z)`` array)."""
        return tuple(slice(a, b) for a, b in zip(self.bbox_start, self.bbox_stop))

    def mask(self, labels: np.ndarray, crop: bool = False) -> np.ndarray:
        """Exact boolean mask of this instance.

        Parameters
        ----------
        labels : ndarray, shape (X, Y, Z)
            The label map of the instance's ``source`` (``InstanceSet.pred_labels`` for
            ``source="pred"``, ``InstanceSet.gt_labels`` for ``source="gt"``).
        crop : bool
            Return only the bounding-box crop (shape ``bbox_stop - bbox_start``).

        Returns
        -------
        ndarray of bool, shape (X, Y, Z), or the bounding-box shape when ``crop``.

        Raises
        ------
        InputError
            ``labels`` is not 3D or the bounding box lies outside it.
        """
        labels = np.asarray(labels)
        if labels.ndim != 3 or any(b > s for b, s in zip(self.bbox_stop, labels.shape)):
            raise InputError(f"label map of shape {labels.shape} does not hold instance "
                             f"{self.label}")
        inner = labels[self.bbox] == self.component
        if crop:
            return inner
        out = np.zeros(labels.shape, dtype=bool)
        out[self.bbox] = inner
        return out

    def to_dict(self) -> dict:
        """Flat dict for one CSV row.

        Returns
        -------
        dict
            Keys ``label, status, source, component, voxels, volume_mm3, iou,
            centroid_{x,y,z}_vox, centroid_{x,y,z}_mm, bbox_{x,y,z}_start, bbox_{x,y,z}_stop``
            (x, y, z = array axes 0, 1, 2 for voxel quantities, world axes for mm).
        """
        d = {"label": int(self.label), "status": self.status, "source": self.source,
             "component": int(self.component), "voxels": int(self.voxels),
             "volume_mm3": float(self.volume_mm3), "iou": float(self.iou)}
        for ax, v in zip(_AXES, self.centroid_vox):
            d[f"centroid_{ax}_vox"] = float(v)
        for ax, v in zip(_AXES, self.centroid_mm):
            d[f"centroid_{ax}_mm"] = float(v)
        for ax, v in zip(_AXES, self.bbox_start):
            d[f"bbox_{ax}_start"] = int(v)
        for ax, v in zip(_AXES, self.bbox_stop):
            d[f"bbox_{ax}_stop"] = int(v)
        return d


@dataclass
class InstanceSet:
    """All instances of one scan and the label maps their masks come from.

    Attributes
    ----------
    pred_labels : ndarray, shape (X, Y, Z), int32
        Predicted components (after the size filter), labels 1..n.
    gt_labels : ndarray, shape (X, Y, Z), int32, or None
        All ground-truth components (no size filter), labels 1..g in raster order; None when
        no ground truth was given. Note these are *component* labels: a false-negative
        instance's ``label`` is ``n + j``, its ``component`` is its label here.
    instances : list of Instance
        Predicted instances first (labels 1..n), then false negatives (labels n+1..n+m).
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine used for ``centroid_mm``.
    spacing : tuple of 3 float
        Voxel spacing (mm) used for volumes.
    matching : {"overlap", "iou"}
        Matching rule used for statuses.
    iou_threshold : float
        Threshold used when ``matching="iou"``.
    """

    pred_labels: np.ndarray
    gt_labels: np.ndarray | None
    instances: list = field(default_factory=list)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple = (1.0, 1.0, 1.0)
    matching: str = "overlap"
    iou_threshold: float = 0.25

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self):
        return iter(self.instances)

    @property
    def shape(self) -> tuple:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(self.pred_labels.shape)

    @property
    def n_pred(self) -> int:
        """Number of predicted instances (labels 1..n_pred)."""
        return sum(1 for i in self.instances if i.source == "pred")

    def get(self, label: int) -> Instance:
        """Instance with the given label.

        Raises
        ------
        InputError
            No instance has that label.
        """
        for inst in self.instances:
            if inst.label == label:
                return inst
        raise InputError(f"no instance with label {label} (labels 1..{len(self.instances)})")

    def counts(self) -> dict:
        """Number of instances per status, e.g. ``{"TP": 3, "FP": 1, "FN": 2, "unknown": 0}``."""
        return {s: sum(1 for i in self.instances if i.status == s) for s in STATUSES}

    def labels_for(self, instance: Instance) -> np.ndarray:
        """Source label map of ``instance`` (``pred_labels`` or ``gt_labels``)."""
        if instance.source == "pred":
            return self.pred_labels
        if self.gt_labels is None:
            raise InputError(f"instance {instance.label} comes from the ground truth, "
                             "but this set has none")
        return self.gt_labels

    def mask(self, instance: Instance | int, crop: bool = False) -> np.ndarray:
        """Exact boolean mask of an instance (or instance label); see :func:`instance_mask`."""
        return instance_mask(self, instance, crop=crop)

    @property
    def label_map(self) -> np.ndarray:
        """One int32 ``(X, Y, Z)`` map holding every instance under its instance label.

        Predicted components keep their labels 1..n; false-negative ground-truth lesions are
        written as n+1..n+m. Where a false-negative lesion overlaps a predicted component
        (impossible with ``matching="overlap"``, possible with ``matching="iou"``) the
        predicted label wins, so this map is *not* an exact mask of such a lesion: use
        :func:`instance_mask` for exact masks.
        """
        out = self.pred_labels.astype(np.int32, copy=True)
        fns = [i for i in self.instances if i.source == "gt"]
        if not fns or self.gt_labels is None:
            return out
        lut = np.zeros(int(self.gt_labels.max()) + 1, dtype=np.int32)
        for inst in fns:
            lut[inst.component] = inst.label
        fn_map = lut[self.gt_labels]
        free = out == 0
        out[free] = fn_map[free]
        return out


def instance_mask(instance_set: InstanceSet, instance: Instance | int,
                  crop: bool = False) -> np.ndarray:
    """Exact boolean mask of one instance.

    Parameters
    ----------
    instance_set : InstanceSet
        The set the instance belongs to.
    instance : Instance or int
        The instance, or its label.
    crop : bool
        Return only the instance's bounding-box crop (index the full grid with
        ``instance.bbox`` to place it).

    Returns
    -------
    ndarray of bool, shape (X, Y, Z), or the bounding-box shape when ``crop``.
        True exactly on the instance's voxels in its source label map, whatever the overlaps
        in :attr:`InstanceSet.label_map`.

    Raises
    ------
    InputError
        Unknown label, or a ground-truth instance in a set without ground truth.
    """
    inst = instance_set.get(int(instance)) if not isinstance(instance, Instance) else instance
    return inst.mask(instance_set.labels_for(inst), crop=crop)


def _component_stats(labels: np.ndarray, n: int, affine: np.ndarray, spacing: tuple) -> list:
    """Per-component (voxels, centroid_vox, centroid_mm, bbox_start, bbox_stop), labels 1..n."""
    if n == 0:
        return []
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    counts = np.bincount(lab, minlength=n + 1)
    coords = np.unravel_index(idx, labels.shape)
    sums = [np.bincount(lab, weights=c.astype(np.float64), minlength=n + 1) for c in coords]
    boxes = ndimage.find_objects(labels, max_label=n)
    vox_vol = float(np.prod(spacing))
    stats = []
    for k in range(1, n + 1):
        cv = tuple(float(s[k] / counts[k]) for s in sums)
        cmm = tuple(float(v) for v in (affine @ np.array([*cv, 1.0]))[:3])
        box = boxes[k - 1]
        stats.append((int(counts[k]), counts[k] * vox_vol, cv, cmm,
                      tuple(int(s.start) for s in box), tuple(int(s.stop) for s in box)))
    return stats


def _overlap_iou(a_labels, n_a, b_labels, n_b):
    """For each component of ``a``: best IoU with any *single* ``b`` component touching it.

    Returns (touched, iou) arrays indexed 1..n_a (index 0 unused): ``touched[k]`` is True when
    some ``b`` voxel lies in component ``k``; ``iou[k]`` is ``max_j |a_k & b_j| / |a_k | b_j|``
    over the ``b`` components ``j`` that overlap ``a_k`` (0.0 when none does), as in the
    Shifts MS-WML reference code.
    """
    a = a_labels.ravel()
    b = b_labels.ravel()
    both = np.flatnonzero((a > 0) & (b > 0))
    size_a = np.bincount(a[a > 0], minlength=n_a + 1).astype(np.float64)
    size_b = np.bincount(b[b > 0], minlength=n_b + 1).astype(np.float64)
    # distinct (a, b) component pairs that touch, with their intersection sizes
    pairs, inter = np.unique(a[both].astype(np.int64) * (n_b + 1) + b[both], return_counts=True)
    pa, pb = pairs // (n_b + 1), pairs % (n_b + 1)
    iou = np.zeros(n_a + 1, dtype=np.float64)
    np.maximum.at(iou, pa, inter / (size_a[pa] + size_b[pb] - inter))
    touched = np.zeros(n_a + 1, dtype=bool)
    touched[pa] = True
    return touched, iou


def find_instances(pred_mask, gt_mask=None, affine=None, spacing=None, connectivity: int = 26,
                   min_size: float = 0, min_size_unit: str = "voxels",
                   matching: str = "overlap", iou_threshold: float = 0.25) -> InstanceSet:
    """Find lesion instances in a predicted mask and, with ground truth, classify them.

    Parameters
    ----------
    pred_mask : array_like, shape (X, Y, Z)
        Binary predicted lesion mask.
    gt_mask : array_like, shape (X, Y, Z), optional
        Binary ground-truth lesion mask on the same grid.
    affine : array_like, shape (4, 4), optional
        Voxel-to-world affine (mm); identity when omitted.
    spacing : sequence of 3 float, optional
        Voxel spacing in mm; taken from the affine's column norms when omitted.
    connectivity : {6, 18, 26}
        Neighbourhood for both predicted and ground-truth components.
    min_size, min_size_unit
        One size rule for both sides (see :func:`connected_components`): predicted and
        ground-truth components smaller than this are not lesion instances. Removed predicted
        components count as not predicted and removed ground-truth components as not
        lesions, also for matching (a lesion too small to be predicted is not reported as
        missed, as in the MSSEG evaluation, which drops lesions below 3 mm^3 on both sides).
    matching : {"overlap", "iou"}
        ``"overlap"`` (grouping of Spagnolo et al. [1]_): a predicted component is TP if it
        overlaps any ground-truth voxel, else FP; a ground-truth component is FN if no
        predicted voxel overlaps it.
        ``"iou"`` (the Shifts MS-WML lesion-level rule [2]_): a predicted component is TP if
        its best IoU with any *single* overlapping ground-truth component is
        >= ``iou_threshold``, else FP; a ground-truth component is FN if its best IoU with
        any single overlapping predicted component is < ``iou_threshold``. Components are
        never merged, so a lesion split into several small predicted pieces can be FN with
        every piece FP. With ``min_size=0`` the TP/FP/FN counts equal those of
        :func:`instance_saliency.metrics.lesion_detection` at the same connectivity.
    iou_threshold : float
        Threshold in (0, 1] for ``matching="iou"``.

    Returns
    -------
    InstanceSet
        Predicted instances (labels 1..n, status TP/FP, or ``"unknown"`` without ground
        truth) followed by false negatives (labels n+1..n+m, ordered by ground-truth component
        label). Without ground truth there are no false negatives.

    Raises
    ------
    InputError
        Masks not 3D, not binary or of different shapes; invalid affine, spacing,
        connectivity, size filter, matching rule or threshold.

    References
    ----------
    .. [1] F. Spagnolo et al., arXiv:2406.09335, 2024.
    .. [2] A. Malinin et al., arXiv:2206.15407, 2022.
    """
    pred = _check_mask(pred_mask, "predicted mask")
    gt = None
    if gt_mask is not None:
        gt = _check_mask(gt_mask, "ground-truth mask")
        if gt.shape != pred.shape:
            raise InputError(f"ground-truth mask shape {gt.shape} differs from predicted mask "
                             f"shape {pred.shape}")
    aff = np.eye(4) if affine is None else _check_affine(affine)
    sp = spacing_from_affine(aff) if spacing is None else _check_spacing(spacing)
    if matching not in _MATCHINGS:
        raise InputError(f"matching must be 'overlap' or 'iou', got {matching!r}")
    try:
        thr = float(iou_threshold)
    except (TypeError, ValueError):
        raise InputError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}") from None
    if not (0 < thr <= 1):
        raise InputError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")

    pred_labels, n = connected_components(pred, connectivity, min_size, min_size_unit, sp)
    gt_labels, g = (None, 0)
    if gt is not None:
        gt_labels, g = connected_components(gt, connectivity, min_size, min_size_unit, sp)

    pred_stats = _component_stats(pred_labels, n, aff, sp)
    instances = []
    if gt_labels is None:
        for k, (vox, vol, cv, cmm, b0, b1) in enumerate(pred_stats, start=1):
            instances.append(Instance(k, "unknown", "pred", k, vox, vol, cv, cmm, b0, b1))
        return InstanceSet(pred_labels, None, instances, aff, sp, matching, thr)

    p_touch, p_iou = _overlap_iou(pred_labels, n, gt_labels, g)
    g_touch, g_iou = _overlap_iou(gt_labels, g, pred_labels, n)
    if matching == "overlap":
        p_tp = p_touch
        g_fn = ~g_touch
    else:
        p_tp = p_iou >= thr
        g_fn = g_iou < thr
    for k, (vox, vol, cv, cmm, b0, b1) in enumerate(pred_stats, start=1):
        instances.append(Instance(k, "TP" if p_tp[k] else "FP", "pred", k, vox, vol, cv, cmm,
                                  b0, b1, float(p_iou[k])))
    gt_stats = _component_stats(gt_labels, g, aff, sp)
    label = n
    for j, (vox, vol, cv, cmm, b0, b1) in enumerate(gt_stats, start=1):
        if g_fn[j]:
            label += 1
            instances.append(Instance(label, "FN", "gt", j, vox, vol, cv, cmm, b0, b1,
                                      float(g_iou[j])))
    return InstanceSet(pred_labels, gt_labels, instances, aff, sp, matching, thr)
