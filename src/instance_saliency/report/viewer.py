"""Data of the interactive lesion viewer embedded in ``report.html`` (NiiVue, offline).

:class:`ViewerData` collects, while :func:`instance_saliency.explain.explain` walks the
lesions, small gzip-compressed NIfTI volumes that the page embeds as base64 and hands to the
bundled NiiVue (``assets/niivue.umd.js``, BSD-2-Clause, see ``assets/LICENSE-niivue.txt``):

* one background per input channel, cropped to the head (the box holding every non-zero voxel
  of any channel and every lesion) and stored as uint8 grey levels (1st..99.5th percentile of
  the non-zero voxels mapped to 1..255, zero stays 0): display only;
* the lesion outline volume, on the same box: every lesion instance's voxels coded by status
  (1 TP, 2 FP, 3 FN, 4 unknown), drawn by NiiVue as an outlined label atlas;
* per lesion and method, one volume per saliency channel on the lesion's map box
  (:func:`instance_saliency.maps.map_box`, the box of the compact map files), quantised to int8
  with one scale per lesion and method: ``stored = round(127 * s / v)``, ``v = max |s|`` over
  the box and all channels, written with ``scl_slope = v / 127`` so NiiVue shows real units
  (logit per unit of normalised intensity). The quantisation error is at most ``v / 254``
  (0.4 % of the lesion's scale, below one colour step of the 256-entry colour map); the
  numbers in the tables never come from these volumes.

Every volume keeps the input's voxel grid; its affine is the input affine translated to the
crop (:func:`instance_saliency.maps.crop_affine`), so all volumes overlay in world (mm)
coordinates, the coordinates of the ``centroid_*_mm`` columns.
"""

from __future__ import annotations

import base64
import math

import numpy as np

from ..maps import crop_affine, nifti_gz_bytes

__all__ = ["ViewerData", "STATUS_CODES"]

#: status -> value in the outline volume
STATUS_CODES = {"TP": 1, "FP": 2, "FN": 3, "unknown": 4}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _head_box(images: np.ndarray, insts) -> tuple:
    """Box holding every non-zero voxel of any channel and every lesion's bounding box."""
    nz = np.any(images != 0, axis=0)
    box = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(nz.any(axis=other))
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, nz.shape[ax])
        for i in insts:
            lo, hi = min(lo, int(i.bbox_start[ax])), max(hi, int(i.bbox_stop[ax]))
        box.append(slice(lo, hi))
    return tuple(box)


def _grey_uint8(vol: np.ndarray) -> np.ndarray:
    """Display grey levels: non-zero voxels' 1st..99.5th percentile -> 1..255, zero -> 0."""
    v = np.asarray(vol, dtype=np.float32)
    nz = v[v != 0]
    if nz.size == 0:
        return np.zeros(v.shape, np.uint8)
    lo, hi = np.percentile(nz, [1.0, 99.5])
    if not hi > lo:
        hi = lo + 1.0
    g = np.clip((v - lo) / (hi - lo), 0.0, 1.0) * 254.0 + 1.0
    return np.where(v != 0, np.rint(g), 0).astype(np.uint8)


class ViewerData:
    """Volumes and lesion list of the report's viewer, filled lesion by lesion.

    Parameters
    ----------
    images : ndarray, shape (C, X, Y, Z)
        The input channels (any intensity units).
    channels : sequence of str, length C
        Channel names (the model's).
    label_map : ndarray of int, shape (X, Y, Z)
        Instance label map (:attr:`instance_saliency.instances.InstanceSet.label_map`).
    instances : sequence of Instance
    affine : ndarray, shape (4, 4)
        Input affine (voxel -> mm).
    spacing : sequence of 3 float
    boxes : sequence of tuple of 3 slice
        Map box of each instance (same order as ``instances``).
    """

    def __init__(self, images, channels, label_map, instances, affine, spacing, boxes):
        images = np.asarray(images)
        self.channels = [str(c) for c in channels]
        self.instances = list(instances)
        self.affine = np.asarray(affine, dtype=np.float64)
        box = _head_box(images, self.instances)
        start = tuple(s.start for s in box)
        aff = crop_affine(self.affine, start)
        self.backgrounds = {name: _b64(nifti_gz_bytes(_grey_uint8(images[c][box]), aff,
                                                      np.uint8))
                            for c, name in enumerate(self.channels)}
        lut = np.zeros(int(label_map.max()) + 1 if label_map.size else 1, np.uint8)
        for i in self.instances:
            if i.label < lut.size:
                lut[i.label] = STATUS_CODES.get(i.status, 4)
        self.outline = _b64(nifti_gz_bytes(lut[np.asarray(label_map)[box]], aff, np.uint8,
                                           intent="label"))
        self.maps: dict = {}

    def add_map(self, method: str, label: int, dense: np.ndarray, box: tuple, chans) -> None:
        """Add one lesion's map (``dense``: ``(C, X, Y, Z)`` on the input grid) for ``method``,
        cropped to ``box`` and quantised to int8 (see the module notes)."""
        crop = np.asarray(dense[(slice(None),) + tuple(box)], dtype=np.float32)
        v = float(np.abs(crop).max()) if crop.size else 0.0
        scale = v / 127.0 if v > 0 else 1.0
        q = np.rint(crop / scale).clip(-127, 127).astype(np.int8)
        aff = crop_affine(self.affine, tuple(s.start for s in box))
        self.maps.setdefault(int(label), {})[method] = {
            "vmax": v,
            "channels": {str(ch): _b64(nifti_gz_bytes(q[c], aff, np.int8, slope=scale))
                         for c, ch in enumerate(chans)},
        }

    def payload(self, table) -> dict:
        """Everything the page's script needs, JSON-serialisable.

        Parameters
        ----------
        table : pandas.DataFrame
            ``instances.csv`` (for the lesion list: status, size, peaks).
        """
        lesions = []
        rows = {int(r["label"]): r for r in table.to_dict(orient="records")} if len(table) else {}
        for i in self.instances:
            r = rows.get(int(i.label), {})
            peaks = {k: _num(v) for k, v in r.items()
                     if k.endswith("_peak_max") or k.endswith("_peak_min")}
            lesions.append({"label": int(i.label), "status": i.status, "source": i.source,
                            "voxels": int(i.voxels), "volume_mm3": _num(i.volume_mm3),
                            "centroid_mm": [_num(c) for c in i.centroid_mm],
                            "prob_max": _num(r.get("prob_max")), "peaks": peaks})
        from ..explain import METHODS

        methods = [m for m in METHODS if any(m in v for v in self.maps.values())]
        return {"channels": self.channels, "backgrounds": self.backgrounds,
                "outline": self.outline, "status_codes": STATUS_CODES, "methods": methods,
                "lesions": lesions, "maps": {str(k): v for k, v in self.maps.items()},
                "units": "logit per unit of normalised intensity"}


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
