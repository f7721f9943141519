"""Helpers shared by several test modules (imported as ``_helpers``: tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _data_dir() -> Path | None:
    """The local mirror: $INSTANCE_SALIENCY_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("INSTANCE_SALIENCY_DATA")
    for d in ([Path(env)] if env else []) + [
            Path(__file__).resolve().parents[1].parent / "shared" / "data"]:
        if (d / "SHA256SUMS").is_file():
            return d
    return None


#: the local mirror of the real scans, or None
DATA = _data_dir()
#: skip marker for tests that need the real scans
needs_data = pytest.mark.skipif(
    DATA is None, reason="real scans not found: set INSTANCE_SALIENCY_DATA to a local mirror "
    "or place it at ../shared/data beside the checkout")


class Detector(torch.nn.Module):
    """Lesion logit = 4 · mean FLAIR over a ``kernel``^3 box − 6 (normalised FLAIR)."""

    def __init__(self, in_channels=2, out_channels=2, kernel=3):
        super().__init__()
        self.features = torch.nn.Conv3d(in_channels, 2, kernel, padding=kernel // 2)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Conv3d(2, out_channels, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            self.features.weight[0, 0] = 1.0 / kernel ** 3
            self.features.bias[1] = 1.0
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[1, 0] = 4.0
            self.head.weight[1, 1] = -6.0

    def forward(self, x):
        return self.head(self.act(self.features(x)))
