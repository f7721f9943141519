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


def save_fold_ensemble(root: Path, make_module, architecture: str, folds: dict) -> Path:
    """A shipped-style ensemble folder: one checkpoint per fold (``folds``: member name ->
    the scans it trained on) under ``root`` and a top ``config.json`` naming the members and
    the union of their training scans. ``make_module()`` builds each member's network."""
    import json

    from instance_saliency.models import ModelConfig, save_checkpoint

    for name, seen in folds.items():
        save_checkpoint(root / name, make_module(),
                        ModelConfig(architecture, roi_size=[16, 16, 16], trained_on=list(seen)))
    first = next(iter(folds))
    top = json.loads((root / first / "config.json").read_text())
    union = [s for seen in folds.values() for s in seen]
    top.update(members=list(folds), trained_on=list(dict.fromkeys(union)))
    (root / "config.json").write_text(json.dumps(top))
    return root
