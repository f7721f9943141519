"""Window-sparse, exact gradients through sliding-window inference.

With sliding-window inference the logit at voxel ``v`` is
``logit(v) = Σ_{w ∋ v} imp_w(v) · out_w(v) / Σ_{w ∋ v} imp_w(v)`` (:mod:`..inference`), with
constant blending weights. An instance target that is linear in the logits,
``T = Σ_v a(v) · logit_k(v)``, therefore depends only on the windows that overlap the instance,
and its input gradient is exactly

``∂T/∂x = Σ_{w ∈ W_T} scatter_w( VJP_w( a · imp_w / norm ) )``

where ``VJP_w`` is the vector-Jacobian product of the network on window ``w``. This module
plans which windows each target needs (:class:`WindowPlan`) and evaluates them: one forward per
window and noise chunk, shared by every target that touches the window, then one
``torch.autograd.grad`` per target (input gradients only; no weight gradients are computed).

Three ways of running the model are planned the same way:

``"sliding"``
    The MONAI window grid of prediction (exact: equals differentiating full sliding-window
    inference over the whole scan).
``"patch"``
    One ROI-sized window centred on the instance's bounding box (grown, in multiples of 32,
    to cover a larger instance), no blending. Cheaper; an approximation of what the model
    does at prediction time, since the instance's logits come from one window only.
``"whole"``
    The whole (padded) scan in one forward pass: for models applied without sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from ..inference import WindowGrid, window_image_part

MODES = ("sliding", "patch", "whole")


@dataclass
class SparseMap:
    """A map that is zero outside ``region``.

    Attributes
    ----------
    region : tuple of slices
        Sub-box of the scan (image coordinates) where the map can be non-zero.
    data : ndarray, shape (C, *region_shape), float32
    shape : tuple of int
        Full spatial shape of the scan.
    """

    region: tuple
    data: np.ndarray
    shape: tuple

    def to_dense(self) -> np.ndarray:
        """The full map, ``(C, *shape)`` float32."""
        out = np.zeros((self.data.shape[0],) + tuple(self.shape), dtype=np.float32)
        out[(slice(None),) + self.region] = self.data
        return out


@dataclass
class WindowPlan:
    """Windows to evaluate and, for each target, the windows it needs with their blend weights.

    Attributes
    ----------
    image_shape, padded_shape, pad_before : tuple of int
        The input is zero-padded from ``image_shape`` to ``padded_shape`` (as MONAI does).
    windows : list of (start, size)
        Window boxes in padded coordinates.
    target_windows : list of list of int
        For each target, indices into ``windows``.
    grid : WindowGrid or None
        Present in sliding mode: blend weights ``imp_w / norm``.
    """

    mode: str
    image_shape: tuple
    padded_shape: tuple
    pad_before: tuple
    windows: list = field(default_factory=list)
    target_windows: list = field(default_factory=list)
    grid: WindowGrid | None = None
    _blend_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, masks: Iterable[np.ndarray], image_shape: Sequence[int], mode: str = "sliding",
               roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.25,
               grid: WindowGrid | None = None, patch_alignment: int = 16) -> "WindowPlan":
        """Plan the windows for targets with the given masks (each ``(X, Y, Z)`` bool, or a
        :class:`~instance_saliency.targets.MaskTarget`, whose bounding-box crop is then used
        without building the full mask; any iterable, read once, so the masks can be built
        one at a time).

        In patch mode each window is centred on its target's bounding box, with its start
        shifted (by less than ``patch_alignment`` voxels) to the same remainder modulo
        ``patch_alignment`` as the sliding window that carries most blending weight on the
        target. Networks with stride-2 levels are not shift-invariant below their total
        stride (16 for four levels): at another phase the input gradient differs markedly
        (measured: correlation 0.2–0.5 with the exact map), at the same phase it stays close
        (0.84–0.98). Set 1 to centre exactly.

        Raises
        ------
        ValueError
            Unknown mode, or an empty mask.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        image_shape = tuple(int(s) for s in image_shape)
        roi = tuple(int(r) for r in roi_size)
        if mode == "sliding":
            grid = grid or WindowGrid.create(image_shape, roi, overlap)
            roi = tuple(grid.roi_size)  # a given grid's windows win over roi_size
            plan = cls(mode, image_shape, grid.padded_shape, grid.pad_before, grid=grid)
            plan.windows = [(tuple(int(a) for a in st), roi) for st in grid.starts]
            for m in masks:
                ws = (_windows_touching_crop(grid, m._box, m._crop) if _is_cropped(m)
                      else grid.windows_touching(m))
                if not ws:
                    raise ValueError("a target mask is empty")
                plan.target_windows.append(ws)
            return plan
        masks = (m.mask if _is_cropped(m) else m for m in masks)
        if mode == "whole":
            plan = cls(mode, image_shape, image_shape, (0, 0, 0))
            plan.windows = [((0, 0, 0), image_shape)]
            plan.target_windows = [[0] for _ in masks]
            return plan
        # patch mode: one window per target, centred on its bounding box, at the phase
        # (start modulo ``patch_alignment``) of the sliding window that weighs most on it
        grid = grid or WindowGrid.create(image_shape, roi, overlap)
        boxes, sizes, phases = [], [], []
        for m in masks:
            idx = np.argwhere(m)
            if len(idx) == 0:
                raise ValueError("a target mask is empty")
            lo, hi = idx.min(0), idx.max(0) + 1
            ext = hi - lo
            size = tuple(int(r) if e <= r else int(np.ceil(e / 32) * 32) for e, r in zip(ext, roi))
            boxes.append((lo, hi))
            sizes.append(size)
            dom = _dominant_window(grid, m)
            phases.append(tuple(int(a) - b for a, b in zip(grid.starts[dom], grid.pad_before)))
        padded = tuple(max([s] + [sz[a] for sz in sizes]) for a, s in enumerate(image_shape))
        pad_before = tuple((p - s) // 2 for p, s in zip(padded, image_shape))
        plan = cls(mode, image_shape, padded, pad_before)
        index = {}
        A = int(patch_alignment)
        for (lo, hi), size, phase in zip(boxes, sizes, phases):
            centre = (lo + hi) / 2.0 + np.array(pad_before)
            start = []
            for c, sz, p, ph, b in zip(centre, size, padded, phase, pad_before):
                want = int(np.floor(c - sz / 2.0))
                r = (ph + b) % A if A > 1 else 0
                cands = [r + A * k for k in range(-(p // A) - 2, p // A + 2)] if A > 1 else [want]
                ok = [v for v in cands if 0 <= v <= p - sz]
                start.append(min(ok, key=lambda v: (abs(v - want), v)) if ok
                             else int(min(max(want, 0), p - sz)))
            key = (tuple(start), size)
            if key not in index:
                index[key] = len(plan.windows)
                plan.windows.append(key)
            plan.target_windows.append([index[key]])
        return plan

    # --- geometry helpers -------------------------------------------------------------
    def window_slices(self, w: int) -> tuple:
        """Slices of window ``w`` in padded coordinates."""
        start, size = self.windows[w]
        return tuple(slice(a, a + s) for a, s in zip(start, size))

    def window_image_part(self, w: int) -> tuple[tuple, tuple]:
        """(slices in image coordinates, slices in window coordinates) of the window ∩ scan."""
        start, size = self.windows[w]
        return window_image_part(start, size, self.pad_before, self.image_shape)

    def region_part(self, w: int, region: tuple) -> tuple[tuple, tuple]:
        """(slices in ``region`` coordinates, slices in window coordinates) of window ``w``
        ∩ the scan, for scattering a window's values into a map over ``region``."""
        img_sl, win_sl = self.window_image_part(w)
        return tuple(slice(a.start - r.start, a.stop - r.start)
                     for a, r in zip(img_sl, region)), win_sl

    def target_region(self, t: int) -> tuple:
        """Bounding box (image coordinates) of the union of target ``t``'s windows."""
        parts = [self.window_image_part(w)[0] for w in self.target_windows[t]]
        return tuple(slice(min(p[a].start for p in parts), max(p[a].stop for p in parts))
                     for a in range(3))

    def blend(self, w: int, device) -> torch.Tensor:
        """Per-voxel factor mapping window ``w``'s output onto the blended logits (cached)."""
        key = (w, str(device))
        if key not in self._blend_cache:
            start, size = self.windows[w]
            if self.grid is None:
                val = torch.ones(size, device=device)
            else:
                sl = self.window_slices(w)
                val = (self.grid.importance / self.grid.norm[sl]).to(device)
            self._blend_cache[key] = val
        return self._blend_cache[key]

    def n_windows_per_target(self) -> list[int]:
        return [len(ws) for ws in self.target_windows]


def _is_cropped(m) -> bool:
    """A :class:`~instance_saliency.targets.MaskTarget` (a mask kept as its bounding-box crop)."""
    return hasattr(m, "_box") and hasattr(m, "_crop") and not isinstance(m, np.ndarray)


def _windows_touching_crop(grid: WindowGrid, box: tuple, crop: np.ndarray) -> list[int]:
    """:meth:`WindowGrid.windows_touching` of a mask given as its bounding box (slices, image
    coordinates) and the mask's crop to it: the same windows, without scanning a full-grid
    mask (on the demo scan: 23 ms per lesion, about 1.5 s for the 68 lesions, per method)."""
    if not crop.any():
        return []
    pb = np.array(grid.pad_before)
    lo = np.array([b.start for b in box]) + pb
    hi = np.array([b.stop - 1 for b in box]) + pb
    roi = np.array(grid.roi_size)
    out = []
    for w, st in enumerate(grid.starts):
        if np.all(st <= hi) and np.all(st + roi > lo):
            img = grid.window_image_part(w)[0]
            sub = tuple(slice(max(i.start, b.start) - b.start, min(i.stop, b.stop) - b.start)
                        for i, b in zip(img, box))
            if all(s_.stop > s_.start for s_ in sub) and crop[sub].any():
                out.append(w)
    return out


def _dominant_window(grid: WindowGrid, mask: np.ndarray) -> int:
    """The grid window with the largest total blend weight ``Σ imp/norm`` over ``mask``."""
    best, best_w = -1.0, 0
    for w in grid.windows_touching(mask):
        sl = grid.window_slices(w)
        img, win = grid.window_image_part(w)
        wt = (grid.importance / grid.norm[sl])[win].numpy()[mask[img]].sum()
        if wt > best:
            best, best_w = float(wt), w
    return best_w


def _batches(plan: WindowPlan, needed: Iterable[int], sw_batch_size: int,
             key=None) -> list[list[int]]:
    """Group the needed windows into batches of equal-sized windows.

    ``key`` orders the windows before batching (e.g. by the number of targets using each, so
    that packed backward passes waste few rows); default: window index.
    """
    by_size: dict = {}
    for w in sorted(set(needed), key=key):
        by_size.setdefault(plan.windows[w][1], []).append(w)
    out = []
    for ws in by_size.values():
        out += [ws[i:i + sw_batch_size] for i in range(0, len(ws), sw_batch_size)]
    return out


def cotangent(plan: WindowPlan, target, w: int, device) -> torch.Tensor:
    """``∂T/∂out_w[class]`` of a linear target: ``(*window_size)``, zero on the other channels.

    ``a(v) · imp_w(v) / norm(v)`` on the part of the window inside the scan (``a`` = the
    target's linear weights), 0 on padding.
    """
    start, size = plan.windows[w]
    img_sl, win_sl = plan.window_image_part(w)
    cot = torch.zeros(size, device=device)
    cot[win_sl] = torch.from_numpy(target.linear_weights_at(img_sl)).to(device) \
        * plan.blend(w, device)[win_sl]
    return cot


def cotangent_crop(plan: WindowPlan, target, w: int, device) -> tuple[tuple, torch.Tensor]:
    """The non-zero part of :func:`cotangent`: ``(slices in window coordinates, values)``.

    The cotangent of a linear mask target is zero outside the mask, so only the box where the
    target's bounding box meets window ``w`` is kept (a few kB for a lesion instead of a whole
    window): cached once per call, it is written into a zeroed cotangent buffer for every
    noise sample. The values are those of :func:`cotangent` on the box, bit for bit.
    """
    img_sl, win_sl = plan.window_image_part(w)
    bb = target.bbox() if hasattr(target, "bbox") else img_sl
    lo = [max(a.start, b.start) for a, b in zip(img_sl, bb)]
    hi = [max(min(a.stop, b.stop), l_) for a, b, l_ in zip(img_sl, bb, lo)]
    sub_img = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_win = tuple(slice(a - i.start + s.start, b - i.start + s.start)
                    for a, b, i, s in zip(lo, hi, img_sl, win_sl))
    vals = torch.from_numpy(np.ascontiguousarray(target.linear_weights_at(sub_img))).to(device) \
        * plan.blend(w, device)[sub_win]
    return sub_win, vals


def window_inputs(plan: WindowPlan, xp: torch.Tensor, ws: Sequence[int]) -> torch.Tensor:
    """Stack window crops of padded inputs ``xp`` (S, C, *padded): order window-major."""
    return torch.cat([xp[(slice(None), slice(None)) + plan.window_slices(w)] for w in ws])


def packed_vjps(out: torch.Tensor, inp: torch.Tensor, rounds: list, cots: dict, targets,
                rows: int = 1, grad_batch: int = 1, scale: float = 1.0):
    """Run the packed backward passes of one window batch; yield ``(assign, g)`` per round.

    Parameters
    ----------
    out : torch.Tensor, shape (B·rows, K, *window)
        The batch's output (float32), in a graph reaching ``inp``.
    inp : torch.Tensor
        What to differentiate with respect to (the windows' input, or a layer's activations).
    rounds : list of list of (j, w, t)
        Per backward pass, the window row ``j`` (window ``w``) that carries target ``t``'s
        cotangent; each row at most once per round.
    cots : dict
        ``(t, w) ->`` :func:`cotangent_crop`.
    rows : int
        Rows per window (noise samples of the chunk).
    grad_batch : int
        Rounds run as one call (``torch.autograd.grad(..., is_grads_batched=True)``).
    scale : float
        Factor of every cotangent (an ensemble member's weight).

    Yields
    ------
    (assign, g)
        A round and ``∂/∂inp`` of its targets (``g`` shaped like ``inp``; valid until the next
        item is requested). The graph is freed after the last round.
    """
    buf = None
    step = max(1, int(grad_batch))
    for i0 in range(0, len(rounds), step):
        group = rounds[i0:i0 + step]
        keep = i0 + step < len(rounds)
        if len(group) == 1:
            if buf is None:  # one buffer per batch: only the crops are written and cleared
                buf = torch.zeros_like(out)
            written = []
            for j, w, t in group[0]:
                sl, vals = cots[(t, w)]
                dst = (slice(j * rows, (j + 1) * rows), targets[t].class_index) + sl
                buf[dst] = vals
                written.append(dst)
            cot = buf * scale if scale != 1.0 else buf
            (g,) = torch.autograd.grad(out, inp, cot, retain_graph=keep)
            for dst in written:
                buf[dst] = 0
            del cot
            yield group[0], g
        else:
            cot = torch.zeros((len(group),) + tuple(out.shape), device=out.device,
                              dtype=out.dtype)
            for r, assign in enumerate(group):
                for j, w, t in assign:
                    sl, vals = cots[(t, w)]
                    cot[(r, slice(j * rows, (j + 1) * rows), targets[t].class_index) + sl] = vals
            if scale != 1.0:
                cot = cot * scale
            (g,) = torch.autograd.grad(out, inp, cot, retain_graph=keep, is_grads_batched=True)
            del cot
            for r, assign in enumerate(group):
                yield assign, g[r]
