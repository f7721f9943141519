"""Targets: callables mapping logits ``(B, K, *spatial)`` to one score per batch item ``(B,)``.

Following the seed paper (Spagnolo et al. 2024, arXiv:2406.09335, Sec. 2.2) an instance's
target is the lesion-class logit summed (or averaged) over the instance's voxels. Whole-class
targets and targets over any user mask are the same object with another mask. False-negative
instances use their ground-truth component as the mask.

A target is *linear in the logits* when ``space="logit"``; then
``score = Σ_v weight(v) · logits[:, class_index, v]`` and :meth:`MaskTarget.linear_weights`
returns ``weight``. The window-sparse engine uses this to differentiate one window at a time.
"""

from __future__ import annotations

import numpy as np
import torch


def _bbox(m: np.ndarray) -> tuple:
    """Tight bounding box of a non-empty boolean array, as slices."""
    box = []
    for ax in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != ax)
        nz = np.flatnonzero(m.any(axis=other)) if other else np.flatnonzero(m)
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


class MaskTarget:
    """Lesion-class logit (or probability) summed or averaged over a mask.

    Parameters
    ----------
    mask : ndarray or torch.Tensor, shape (*spatial), bool
        Voxels of the instance (or any region). Must be non-empty. Only its bounding-box
        crop is stored; :attr:`mask` rebuilds the full array on access.
    class_index : int
        Output channel (1 = lesion).
    reduction : {"sum", "mean"}
        Sum (seed code) or mean over the mask's voxels.
    space : {"logit", "prob"}
        Score the raw logits (default, as the seed code) or softmax probabilities over channels.
    name : str, optional
        Label used in reports.

    Raises
    ------
    ValueError
        Empty mask, unknown reduction or space.

    Examples
    --------
    >>> import torch, numpy as np
    >>> m = np.zeros((4, 4, 4), bool); m[1, 1, 1] = m[1, 1, 2] = True
    >>> logits = torch.zeros(1, 2, 4, 4, 4); logits[0, 1, 1, 1, 1] = 3.0
    >>> MaskTarget(m)(logits)
    tensor([3.])
    >>> MaskTarget(m, reduction="mean")(logits)
    tensor([1.5000])
    """

    def __init__(self, mask, class_index: int = 1, reduction: str = "sum", space: str = "logit",
                 name: str | None = None):
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        m = m.astype(bool, copy=False)
        if not m.any():
            raise ValueError("target mask is empty")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if space not in ("logit", "prob"):
            raise ValueError(f"space must be 'logit' or 'prob', got {space!r}")
        # Only the mask's bounding-box crop is kept (a full-grid copy per lesion of a whole
        # scan adds up: 0.4 GB for the 58 lesions of the demo scan); ``mask`` rebuilds the
        # full array when asked.
        self.shape = tuple(m.shape)
        self._box = _bbox(m)
        self._crop = np.ascontiguousarray(m[self._box])
        self.class_index = int(class_index)
        self.reduction = reduction
        self.space = space
        self.name = name
        self.n_voxels = int(self._crop.sum())
        self._mask_t = {}

    @property
    def mask(self) -> np.ndarray:
        """The full boolean mask ``(*spatial)`` (a new array on each access)."""
        full = np.zeros(self.shape, bool)
        full[self._box] = self._crop
        return full

    def _mask_on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._mask_t:
            self._mask_t[key] = torch.from_numpy(self.mask).to(device)
        return self._mask_t[key]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Score ``(B,)`` of logits ``(B, K, *spatial)`` (spatial shape = the mask's)."""
        if tuple(logits.shape[2:]) != self.shape:
            raise ValueError(f"logits spatial shape {tuple(logits.shape[2:])} does not match the "
                             f"target mask {self.shape}")
        v = torch.softmax(logits, 1) if self.space == "prob" else logits
        sel = v[:, self.class_index][:, self._mask_on(logits.device)]  # (B, n_voxels)
        return sel.sum(1) if self.reduction == "sum" else sel.mean(1)

    @property
    def is_linear(self) -> bool:
        """True when the score is a fixed linear function of the logits (``space="logit"``)."""
        return self.space == "logit"

    def linear_weights(self) -> np.ndarray | None:
        """Per-voxel weight of the class logit, ``(*spatial)`` float32, or None if non-linear."""
        if not self.is_linear:
            return None
        w = self.mask.astype(np.float32)
        return w / self.n_voxels if self.reduction == "mean" else w

    def linear_weights_at(self, slices: tuple) -> np.ndarray | None:
        """:meth:`linear_weights` on the sub-region ``slices`` only (cheap for small regions)."""
        if not self.is_linear:
            return None
        w = self._mask_at(slices).astype(np.float32)
        return w / self.n_voxels if self.reduction == "mean" else w

    def _mask_at(self, slices: tuple) -> np.ndarray:
        """``mask[slices]`` from the stored crop, without building the full mask (plain
        slices, step 1; anything else goes through :attr:`mask`)."""
        slices = tuple(slices) if isinstance(slices, tuple) else (slices,)
        if len(slices) != len(self.shape) or not all(
                isinstance(s, slice) and s.step in (None, 1) for s in slices):
            return self.mask[slices]
        rng = [s.indices(n)[:2] for s, n in zip(slices, self.shape)]
        out = np.zeros(tuple(max(b - a, 0) for a, b in rng), bool)
        src, dst = [], []
        for (a, b), box in zip(rng, self._box):
            lo, hi = max(a, box.start), min(b, box.stop)
            if lo >= hi:
                return out
            src.append(slice(lo - box.start, hi - box.start))
            dst.append(slice(lo - a, hi - a))
        out[tuple(dst)] = self._crop[tuple(src)]
        return out

    def bbox(self) -> tuple:
        """Bounding box of the mask as a tuple of slices."""
        return self._box

    def crop(self, slices: tuple) -> "MaskTarget":
        """The same target on a sub-region (the mask must lie inside it)."""
        sub = self._mask_at(slices)
        if sub.sum() != self.n_voxels:
            raise ValueError("crop does not contain the whole target mask")
        return MaskTarget(sub, self.class_index, self.reduction, self.space, self.name)

    def __repr__(self) -> str:
        return (f"MaskTarget(name={self.name!r}, voxels={self.n_voxels}, class_index="
                f"{self.class_index}, reduction={self.reduction!r}, space={self.space!r})")


def InstanceTarget(mask, class_index: int = 1, reduction: str = "sum", space: str = "logit",
                   name: str | None = None) -> MaskTarget:
    """Target of one lesion instance: the class logit summed/averaged over its voxels.

    For a predicted lesion the mask is its connected component; for a false-negative lesion it
    is the ground-truth component. See :class:`MaskTarget` for parameters.
    """
    return MaskTarget(mask, class_index, reduction, space, name)


def ClassTarget(spatial_shape, class_index: int = 1, reduction: str = "mean",
                space: str = "logit") -> MaskTarget:
    """Whole-class target: the class logit over every voxel of the scan."""
    return MaskTarget(np.ones(tuple(spatial_shape), bool), class_index, reduction, space,
                      name=f"class{class_index}")
