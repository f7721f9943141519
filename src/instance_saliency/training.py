"""Patch-based training of a lesion segmentation model with MONAI.

Patches (ROI-sized) are sampled 1:1 around lesion and background voxels
(``RandCropByPosNegLabeld``), augmented with flips along all three axes and intensity scale /
shift, and fitted with Dice + cross-entropy (``DiceCELoss``) and AdamW. Every ``val_every`` steps
the model is validated by sliding-window inference on the validation scans (mean nDSC,
Raina et al. 2023) and the best checkpoint is kept. Runs are seeded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .io import Subject, zscore_nonzero
from .models import ModelConfig, build_model, save_checkpoint

log = logging.getLogger("instance_saliency.training")


def _to_item(s: Subject) -> dict:
    if s.mask is None:
        raise ValueError(f"training subject {s.paths.get('flair')} has no lesion mask")
    return {"image": zscore_nonzero(s.image), "label": s.mask[None].astype(np.float32)}


def validate(model: torch.nn.Module, subjects: Sequence[Subject], cfg: ModelConfig,
             images: Sequence[np.ndarray] | None = None) -> list[dict]:
    """Sliding-window prediction on each subject and its metrics (nDSC, Dice, lesion F1)."""
    from .inference import predict_probability
    from .metrics import evaluate_pair

    was_training = model.training
    model.eval()
    out = []
    try:
        for i, s in enumerate(subjects):
            img = images[i] if images is not None else zscore_nonzero(s.image)
            prob = predict_probability(model, img, cfg.roi_size, cfg.overlap, cfg.lesion_class)
            out.append(evaluate_pair(s.mask, prob >= cfg.threshold, spacing=s.spacing))
    finally:
        model.train(was_training)
    return out


def train(train_subjects: Sequence[Subject], val_subjects: Sequence[Subject], out_dir: str | Path,
          architecture: str = "unet3d", arguments: dict | None = None,
          roi_size: Sequence[int] = (96, 96, 96), steps: int = 1200, batch_size: int = 2,
          lr: float = 1e-3, val_every: int = 100, seed: int = 0, threshold: float = 0.5,
          overlap: float = 0.25, progress: bool = True, command: str = "",
          data_description: str = "") -> dict:
    """Train and keep the best checkpoint (by mean validation nDSC) in ``out_dir``.

    Parameters
    ----------
    train_subjects, val_subjects : sequence of Subject
        Scans with lesion masks. Without validation scans the last step is kept.
    out_dir : path
        Receives ``config.json`` + ``model.safetensors`` (best), ``last/`` (last step),
        ``history.json`` and ``train.log``.
    steps : int
        Optimiser steps; each uses ``batch_size`` patches (half centred on lesion voxels).

    Returns
    -------
    dict
        Training summary (also stored in ``config.json`` under ``training``).
    """
    from monai import transforms as T
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(out_dir / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    log.setLevel(logging.INFO)
    set_determinism(seed)
    torch.manual_seed(seed)
    arguments = dict(arguments or {})
    model = build_model(architecture, **arguments)
    cfg = ModelConfig(architecture=architecture, arguments=arguments, roi_size=list(roi_size),
                      overlap=overlap, threshold=threshold)
    items = [_to_item(s) for s in train_subjects]
    val_images = [zscore_nonzero(s.image) for s in val_subjects]
    xform = T.Compose([
        T.RandCropByPosNegLabeld(keys=("image", "label"), label_key="label",
                                 spatial_size=tuple(roi_size), pos=1, neg=1,
                                 num_samples=batch_size, allow_smaller=False),
        T.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
        T.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=1),
        T.RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=2),
        T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])
    xform.set_random_state(seed=seed)
    rng = np.random.default_rng(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history, best, best_step = [], -1.0, 0
    t0 = time.time()
    it = range(1, steps + 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train", unit="step")
    model.train()
    running = []
    for step in it:
        samples = xform(items[int(rng.integers(len(items)))])
        x = torch.stack([torch.as_tensor(np.asarray(s["image"])) for s in samples]).float()
        y = torch.stack([torch.as_tensor(np.asarray(s["label"])) for s in samples]).float()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if step % val_every == 0 or step == steps:
            rec = {"step": step, "loss": float(np.mean(running)), "time_s": time.time() - t0}
            running = []
            if val_subjects:
                res = validate(model, val_subjects, cfg, val_images)
                rec["val"] = res
                rec["val_ndsc"] = float(np.mean([r["ndsc"] for r in res]))
                if rec["val_ndsc"] > best:
                    best, best_step = rec["val_ndsc"], step
                    save_checkpoint(out_dir, model.eval(), cfg)
                    model.train()
            history.append(rec)
            log.info(json.dumps({k: v for k, v in rec.items() if k != "val"}))
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    save_checkpoint(out_dir / "last", model.eval(), cfg)
    if not val_subjects:
        save_checkpoint(out_dir, model, cfg)
        best_step = steps
    summary = {
        "command": command, "data": data_description, "steps": steps, "batch_size": batch_size,
        "roi_size": list(roi_size), "lr": lr, "seed": seed, "best_step": best_step,
        "best_val_ndsc": best if val_subjects else None,
        "val_at_best": next((h.get("val") for h in history if h["step"] == best_step), None),
        "val_at_last": history[-1].get("val") if history else None,
        "train_time_s": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
    }
    cfg.training = summary
    import json as _j

    from .io import atomic_write_text
    atomic_write_text(out_dir / "config.json", _j.dumps(asdict(cfg), indent=2) + "\n")
    if (out_dir / "last" / "config.json").exists():
        atomic_write_text(out_dir / "last" / "config.json", _j.dumps(asdict(cfg), indent=2) + "\n")
    log.removeHandler(fh)
    fh.close()
    return summary
