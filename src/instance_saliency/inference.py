"""Sliding-window inference and the window grid shared with exact saliency.

The grid reproduces MONAI's :func:`monai.inferers.sliding_window_inference` (same window
positions, Gaussian importance map, padding and normalisation), computed once in
:class:`WindowGrid` so that prediction and the window-sparse exact saliency of
:mod:`instance_saliency.saliency.engine` use identical windows and blending weights.

Blending (MONAI): ``logits(v) = Σ_w imp_w(v) · out_w(v) / Σ_w imp_w(v)`` over the windows ``w``
that contain voxel ``v``; ``imp`` is the Gaussian importance map (σ = 0.125 × ROI side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def pad_to(x: torch.Tensor, padded_shape: Sequence[int], pad_before: Sequence[int]) -> torch.Tensor:
    """Zero-pad the trailing spatial axes of ``x`` to ``padded_shape``, ``pad_before`` first."""
    spatial = tuple(x.shape[-len(padded_shape):])
    if tuple(padded_shape) == spatial:
        return x
    pads = []
    for p, s, b in reversed(list(zip(padded_shape, spatial, pad_before))):
        pads += [int(b), int(p - s - b)]
    return F.pad(x, pads)


def window_image_part(start: Sequence[int], size: Sequence[int], pad_before: Sequence[int],
                      image_shape: Sequence[int]) -> tuple[tuple, tuple]:
    """Where a window (``start``, ``size`` in padded coordinates) meets the scan.

    Returns
    -------
    (image slices, window slices)
        The overlap in image coordinates and the same voxels in window coordinates.
    """
    img, win = [], []
    for a, s, b, n in zip(start, size, pad_before, image_shape):
        lo, hi = int(a) - int(b), int(a) - int(b) + int(s)
        clo, chi = max(lo, 0), min(hi, int(n))
        img.append(slice(clo, chi))
        win.append(slice(clo - lo, chi - lo))
    return tuple(img), tuple(win)


@dataclass
class WindowGrid:
    """Window positions and blending weights of sliding-window inference on one scan.

    Attributes
    ----------
    image_shape : tuple of int
        Spatial shape of the scan ``(X, Y, Z)``.
    padded_shape : tuple of int
        Shape after zero padding to at least the ROI on each axis (MONAI pads symmetrically).
    pad_before : tuple of int
        Voxels of padding before each axis.
    roi_size : tuple of int
    starts : ndarray, shape (W, 3), int
        Start corner of each window in padded coordinates.
    importance : torch.Tensor, shape (*roi_size), float32
        Blending weight of a window's output voxels.
    norm : torch.Tensor, shape (*padded_shape), float32
        ``Σ_w imp_w`` at each padded voxel.
    """

    image_shape: tuple
    padded_shape: tuple
    pad_before: tuple
    roi_size: tuple
    starts: np.ndarray
    importance: torch.Tensor
    norm: torch.Tensor

    @classmethod
    def create(cls, image_shape: Sequence[int], roi_size: Sequence[int], overlap: float = 0.25,
               mode: str = "gaussian", sigma_scale: float = 0.125) -> "WindowGrid":
        """Build the grid MONAI's sliding-window inference uses for ``image_shape``."""
        from monai.data.utils import compute_importance_map, dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        image_shape = tuple(int(s) for s in image_shape)
        roi = tuple(int(r) for r in roi_size)
        padded = tuple(max(r, s) for r, s in zip(roi, image_shape))
        pad_before = tuple((p - s) // 2 for p, s in zip(padded, image_shape))
        interval = _get_scan_interval(padded, roi, len(roi), (float(overlap),) * len(roi))
        slices = dense_patch_slices(padded, roi, interval, return_slice=True)
        starts = np.array([[sl.start for sl in s] for s in slices], dtype=np.int64)
        imp = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale,
                                     device="cpu").to(torch.float32)
        norm = torch.zeros(padded, dtype=torch.float32)
        for st in starts:
            norm[tuple(slice(a, a + r) for a, r in zip(st, roi))] += imp
        return cls(image_shape, padded, pad_before, roi, starts, imp, norm)

    @classmethod
    def from_windows(cls, image_shape: Sequence[int], roi_size: Sequence[int],
                     starts: Sequence[Sequence[int]], importance: torch.Tensor) -> "WindowGrid":
        """A grid with given window starts (padded coordinates) and importance map.

        The scan is zero-padded symmetrically to at least ``roi_size`` on each axis (below:
        half the difference, rounded down), as both MONAI and nnU-Net (``pad_nd_image``) do.
        Used for nnU-Net's own window positions and Gaussian (:mod:`..models.nnunet`).
        """
        image_shape = tuple(int(s) for s in image_shape)
        roi = tuple(int(r) for r in roi_size)
        padded = tuple(max(r, s) for r, s in zip(roi, image_shape))
        pad_before = tuple((p - s) // 2 for p, s in zip(padded, image_shape))
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, len(roi))
        imp = torch.as_tensor(importance, dtype=torch.float32).cpu()
        if tuple(imp.shape) != roi:
            raise ValueError(f"importance map shape {tuple(imp.shape)} != roi {roi}")
        norm = torch.zeros(padded, dtype=torch.float32)
        for st in starts:
            if any(a < 0 or a + r > p for a, r, p in zip(st, roi, padded)):
                raise ValueError(f"window start {tuple(st)} + roi {roi} leaves {padded}")
            norm[tuple(slice(a, a + r) for a, r in zip(st, roi))] += imp
        return cls(image_shape, padded, pad_before, roi, starts, imp, norm)

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def window_slices(self, w: int) -> tuple:
        """Slices of window ``w`` in padded coordinates."""
        return tuple(slice(int(a), int(a) + r) for a, r in zip(self.starts[w], self.roi_size))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``(B, C, *image_shape)`` to ``(B, C, *padded_shape)`` as MONAI does."""
        return pad_to(x, self.padded_shape, self.pad_before)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad` on the trailing three axes."""
        sl = tuple(slice(b, b + s) for b, s in zip(self.pad_before, self.image_shape))
        return x[(...,) + sl]

    def window_image_part(self, w: int) -> tuple[tuple, tuple]:
        """(image slices, window slices) of window ``w`` ∩ the scan."""
        return window_image_part(self.starts[w], self.roi_size, self.pad_before, self.image_shape)

    def windows_touching(self, mask: np.ndarray) -> list[int]:
        """Indices of the windows that contain at least one voxel of ``mask`` (X, Y, Z).

        Only these windows contribute to logits inside the mask, so an instance target over
        the mask depends only on them.
        """
        idx = np.argwhere(mask)
        if len(idx) == 0:
            return []
        lo = idx.min(0) + np.array(self.pad_before)
        hi = idx.max(0) + np.array(self.pad_before)
        out = []
        roi = np.array(self.roi_size)
        for w, st in enumerate(self.starts):
            if np.all(st <= hi) and np.all(st + roi > lo):
                if mask[self.window_image_part(w)[0]].any():
                    out.append(w)
        return out


def sliding_window_logits(model: torch.nn.Module, x: torch.Tensor, grid: WindowGrid,
                          sw_batch_size: int = 2, progress: bool = False) -> torch.Tensor:
    """Sliding-window logits, equal to MONAI's ``sliding_window_inference`` (Gaussian blending).

    Differentiable with respect to ``x`` when called with gradients enabled.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(b, C_in, *roi_size)`` to ``(b, C_out, *roi_size)`` logits.
    x : torch.Tensor, shape (B, C_in, X, Y, Z)
        Normalised input.
    grid : WindowGrid
        Grid for ``(X, Y, Z)``.
    sw_batch_size : int
        Windows per forward pass.

    Returns
    -------
    torch.Tensor, shape (B, C_out, X, Y, Z)
    """
    xp = grid.pad(x)
    B = x.shape[0]
    acc = None
    imp = grid.importance.to(x.device, x.dtype)
    it = range(0, grid.n_windows, sw_batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sliding window", unit="batch", leave=False)
    for w0 in it:
        ws = list(range(w0, min(w0 + sw_batch_size, grid.n_windows)))
        batch = torch.cat([xp[(slice(None), slice(None)) + grid.window_slices(w)] for w in ws])
        out = model(batch)
        if acc is None:
            acc = torch.zeros((B, out.shape[1]) + grid.padded_shape, dtype=out.dtype,
                              device=out.device)
        for j, w in enumerate(ws):
            sl = (slice(None), slice(None)) + grid.window_slices(w)
            acc[sl] = acc[sl] + out[j * B:(j + 1) * B] * imp
    acc = acc / grid.norm.to(acc.device, acc.dtype)
    return grid.crop(acc)


def predict_probability(model: torch.nn.Module, image: np.ndarray, roi_size: Sequence[int],
                        overlap: float = 0.25, lesion_class: int = 1, sw_batch_size: int = 2,
                        device: str | torch.device = "cpu", progress: bool = False
                        ) -> np.ndarray:
    """Lesion probability (softmax over output channels) by sliding-window inference.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode.
    image : ndarray, shape (C, X, Y, Z)
        Normalised input.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32, values in [0, 1]
    """
    grid = WindowGrid.create(image.shape[1:], roi_size, overlap)
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    with torch.no_grad():
        logits = sliding_window_logits(model, x, grid, sw_batch_size, progress)
        prob = torch.softmax(logits, 1)[0, lesion_class]
    return prob.cpu().numpy().astype(np.float32)
