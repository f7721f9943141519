"""Any PyTorch segmentation network as a model (the Python API's way in)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..io import CHANNELS
from .base import SegmentationModel, ensemble_members


def from_module(module: torch.nn.Module | Sequence[torch.nn.Module],
                channels: Sequence[str] = CHANNELS, *, roi_size: Sequence[int] = (96, 96, 96),
                overlap: float = 0.25, lesion_class: int = 1, threshold: float = 0.5,
                cam_layer: str | None = None, mirror_axes: Sequence[int] = (),
                name: str = "torch module") -> SegmentationModel:
    """Wrap a network (or several, averaged as an ensemble) mapping ``(B, C, X, Y, Z)`` to
    ``(B, K, X, Y, Z)`` logits.

    Inputs are z-scored per channel over non-zero voxels
    (:func:`instance_saliency.io.zscore_nonzero`) and predicted with MONAI-style sliding
    windows (``roi_size``, ``overlap``, Gaussian blending); ``mirror_axes`` adds nnU-Net-style
    test-time mirroring. Nothing is copied: the module is used as it is.

    Returns
    -------
    SegmentationModel
    """
    mods = [module] if isinstance(module, torch.nn.Module) else list(module)
    nets = [(f"net_{i}" if len(mods) > 1 else "model", m) for i, m in enumerate(mods)]
    return SegmentationModel(ensemble_members(nets, mirror_axes), channels, source=name,
                             lesion_class=lesion_class, threshold=threshold, cam_layer=cam_layer,
                             roi_size=roi_size, overlap=overlap,
                             info={"mirror_axes": list(mirror_axes)})
