"""Patch-based training of a lesion segmentation model with MONAI, resumable bit for bit.

Patches (ROI-sized) are sampled 1:1 around lesion and background voxels
(``RandCropByPosNegLabeld``) and augmented (recipe ``"v2"``: flips on the three axes, small
rotations/scalings, per-channel intensity scale and shift, gamma, bias field, Gaussian noise and
blur; recipe ``"v1"``: the first release's flips + intensity scale/shift only). The loss is
Dice + cross-entropy (``DiceCELoss``), the optimiser AdamW with a linear warm-up and a cosine
decay of the learning rate, and an exponential moving average (EMA) of the weights (and batch-norm
statistics) is kept: the EMA weights are what is saved and validated, instead of a noisy
best-step pick.

Every random draw of step ``s`` is seeded from ``(seed, s)`` alone (the subject of the step)
and ``(seed, s, k)`` (crop and augmentation of the step's patch ``k``), so a run resumed from a
checkpoint (``train_state.pt``) continues exactly as the uninterrupted run would have, and under
``torchrun`` the ranks draw disjoint shares of the very batch one process would draw (see
:func:`train`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError
from .io import Subject, atomic_write_text, histogram_landmarks, normalise
from .models import ModelConfig, build_model, save_checkpoint

log = logging.getLogger("instance_saliency.training")

STATE_NAME = "train_state.pt"
RECIPES = ("v1", "v2", "v3", "v2-carvemix")
#: recipes that paste lesions between training scans (see :func:`carvemix`), and the
#: probability that one patch of theirs is drawn from such a mixed scan
CARVEMIX = {"v2-carvemix": 0.5}


def _to_item(s: Subject, cfg: ModelConfig, lesions: bool = False) -> dict:
    """Normalised image, label and the lesion / background voxel indices (computed once);
    with ``lesions``, also the lesion labels (26-connected components) and their bounding
    boxes that :func:`carvemix` pastes from."""
    if s.mask is None:
        raise ValueError(f"training subject {s.paths.get('flair')} has no lesion mask")
    flat = s.mask.reshape(-1) > 0
    item = {"image": torch.from_numpy(normalise(s.image, cfg.normalisation, cfg.landmarks)),
            "label": torch.from_numpy(s.mask[None].astype(np.float32)),
            "fg_idx": np.flatnonzero(flat), "bg_idx": np.flatnonzero(~flat)}
    if lesions:
        from scipy import ndimage

        from .instances import connected_components

        labels, _ = connected_components(s.mask > 0, 26)
        item.update(lesions=labels, lesion_boxes=ndimage.find_objects(labels))
    return item


def carvemix(target: dict, donor: dict, rng: np.random.Generator, max_lesions: int = 3,
             margin: tuple = (0.5, 4.0)) -> dict:
    """``target`` with up to ``max_lesions`` lesions of ``donor`` pasted in, CarveMix-style.

    Lesion copy-paste between co-registered scans (Zhang et al., "CarveMix: a simple data
    augmentation method for brain lesion segmentation", MICCAI 2021): for each chosen lesion
    (3D connected component, 26-connectivity) of ``donor``, the region within a random
    distance ``r`` (uniform in ``margin``, voxels) of the lesion is carved out of the donor
    (image channels and label together) and replaces the same voxels of ``target``. The scans
    share one space (1 mm MNI), so a lesion keeps its anatomical position, and the rim carried
    with it keeps the lesion's own contrast edge; the label inside the region is the donor's.
    This parametrisation (a dilation of the lesion by ``r``) is ours, not the paper's
    signed-distance interpolation.

    Parameters
    ----------
    target, donor : dict
        Training items of :func:`_to_item` (``image`` (C, X, Y, Z), ``label`` (1, X, Y, Z),
        ``fg_idx``, ``bg_idx``), same shape; the donor's made with ``lesions=True``
        (``lesions`` int labels (X, Y, Z), ``lesion_boxes``).
    rng : numpy.random.Generator
        The only source of randomness (which lesions, how many, ``r``).
    max_lesions : int
        At most this many lesions are pasted (the number is uniform in 1..max_lesions).
    margin : (float, float)
        Range of the carve distance ``r`` in voxels (1 mm here).

    Returns
    -------
    dict
        A new item of the crop's keys (``image``, ``label``, ``fg_idx``, ``bg_idx``;
        ``target`` untouched) whose ``fg_idx`` holds the pasted lesion voxels only, so that
        a lesion-centred crop lands on a pasted lesion; ``target`` itself when the donor has
        no lesion.

    Raises
    ------
    ValueError
        ``target`` and ``donor`` differ in shape.
    """
    from scipy import ndimage

    if tuple(target["image"].shape) != tuple(donor["image"].shape):
        raise ValueError(f"carvemix: scans of shape {tuple(target['image'].shape)} and "
                         f"{tuple(donor['image'].shape)} do not share one grid")
    boxes = donor["lesion_boxes"]
    n = len(boxes)
    if n == 0:
        return target
    k = int(rng.integers(1, min(max_lesions, n) + 1))
    chosen = rng.choice(n, size=k, replace=False) + 1
    image, label = target["image"].clone(), target["label"].clone()
    shape = donor["lesions"].shape
    pasted = []
    for c in chosen:
        r = float(rng.uniform(*margin))
        pad = int(math.ceil(r)) + 1
        box = tuple(slice(max(sl.start - pad, 0), min(sl.stop + pad, dim))
                    for sl, dim in zip(boxes[c - 1], shape))
        lesion = donor["lesions"][box] == c
        region = torch.from_numpy(ndimage.distance_transform_edt(~lesion) <= r)
        window = (slice(None),) + box
        image[window] = torch.where(region, donor["image"][window], image[window])
        label[window] = torch.where(region, donor["label"][window], label[window])
        inner = np.nonzero(lesion)
        pasted.append(np.ravel_multi_index(
            tuple(i + sl.start for i, sl in zip(inner, box)), shape))
    return {"image": image, "label": label, "fg_idx": np.concatenate(pasted),
            "bg_idx": target["bg_idx"]}


def augmentations(roi_size: Sequence[int], batch_size: int, recipe: str = "v2"):
    """The MONAI transform chain of a recipe (crop, spatial and intensity augmentation).

    Parameters
    ----------
    roi_size : 3 ints
        Patch size in voxels.
    batch_size : int
        Patches drawn per step (half centred on lesion voxels, half on background).
    recipe : {"v1", "v2", "v3", "v2-carvemix"}
        ``v1``: flips + intensity scale/shift ±10 % (first release). ``v2``: adds per-channel
        scale/shift ±15 %, rotation ±15° and scaling ±10 % (p = 0.25), gamma 0.7–1.5 (p = 0.2),
        a smooth bias field (p = 0.15), Gaussian noise σ = 0.1 (p = 0.15) and Gaussian blur
        σ 0.5–1 voxel (p = 0.15). ``v3``: v2 with a wider per-channel contrast range, for the
        two sites' different lesion contrast after z-scoring (median lesion FLAIR z 1.3–1.45
        on open_ms_data, 2.0–2.4 on MSLesSeg): scale ±35 % (p = 0.8), shift ±0.3 (p = 0.5),
        gamma 0.6–1.7 (p = 0.3). ``v2-carvemix``: the v2 chain; the patches are drawn half
        the time from a scan with lesions of another training scan pasted in (lesion
        copy-paste between scans and sites, see :func:`carvemix`; applied in
        :func:`train`, not in this chain).

    Returns
    -------
    monai.transforms.Compose
    """
    from monai import transforms as T

    if recipe not in RECIPES:
        raise InputError(f"unknown training recipe {recipe!r}; known: {', '.join(RECIPES)}")
    keys = ("image", "label")
    chain = [
        T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(roi_size),
                                 pos=1, neg=1, num_samples=batch_size, allow_smaller=False,
                                 fg_indices_key="fg_idx", bg_indices_key="bg_idx"),
    ]
    if recipe != "v1":
        chain.append(T.RandAffined(keys=keys, prob=0.25, rotate_range=(0.26, 0.26, 0.26),
                                   scale_range=(0.1, 0.1, 0.1), mode=("bilinear", "nearest"),
                                   padding_mode="zeros"))
    chain += [T.RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)]
    if recipe == "v1":
        chain += [T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                  T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
    else:
        wide = recipe == "v3"
        chain += [
            T.RandScaleIntensityd(keys="image", factors=0.35 if wide else 0.15,
                                  prob=0.8 if wide else 0.5, channel_wise=True),
            T.RandShiftIntensityd(keys="image", offsets=0.3 if wide else 0.15, prob=0.5,
                                  channel_wise=True),
            T.RandAdjustContrastd(keys="image", gamma=(0.6, 1.7) if wide else (0.7, 1.5),
                                  prob=0.3 if wide else 0.2),
            T.RandBiasFieldd(keys="image", coeff_range=(0.0, 0.1), prob=0.15),
            T.RandGaussianNoised(keys="image", std=0.1, prob=0.15),
            T.RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                  sigma_z=(0.5, 1.0), prob=0.15),
        ]
    return T.Compose(chain)


def lr_at(step: int, steps: int, lr: float, warmup: int = 100, final_fraction: float = 0.02
          ) -> float:
    """Learning rate of (1-based) ``step``: linear warm-up, then cosine decay to ``final_fraction``."""
    if step <= warmup:
        return lr * step / max(warmup, 1)
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


def validate(model: torch.nn.Module, subjects: Sequence[Subject], cfg: ModelConfig,
             images: Sequence[np.ndarray] | None = None, return_prob: bool = False):
    """Sliding-window prediction on each subject and its metrics (nDSC, Dice, lesion F1)."""
    from .inference import predict_probability
    from .metrics import evaluate_pair

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out, probs = [], []
    try:
        for i, s in enumerate(subjects):
            img = (images[i] if images is not None
                   else normalise(s.image, cfg.normalisation, cfg.landmarks))
            prob = predict_probability(model, img, cfg.roi_size, cfg.overlap, cfg.lesion_class,
                                       device=device)
            out.append(evaluate_pair(s.mask, prob >= cfg.threshold, spacing=s.spacing))
            probs.append(prob)
    finally:
        model.train(was_training)
    return (out, probs) if return_prob else out


def _ema(model: torch.nn.Module, decay: float):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


#: how the patches of a step are drawn (stored in train_state.pt; states without it drew all
#: patches of a step from one random state, before the per-patch seeds)
SAMPLING = "per-patch seeds (seed, step, k)"


_CROP_KEYS = ("image", "label", "fg_idx", "bg_idx")


def _draw_patches(items: list, xform, seed: int, step: int, patches: range,
                  carvemix_p: float = 0.0):
    """Patches ``patches`` (indices into the step's global batch) of step ``step``.

    The step's subject is drawn from ``(seed, step)`` and patch ``k``'s crop and augmentation
    from ``(seed, step, k)`` alone, so that any split of the global batch over ranks draws the
    patches one process draws. ``xform`` draws one patch (``augmentations(roi, 1, recipe)``).
    With probability ``carvemix_p`` a patch is drawn from the step's subject with lesions of
    another training scan pasted in (:func:`carvemix`; its draws seeded from
    ``(seed, step, k, 1)``).

    Returns
    -------
    x : Tensor, shape (len(patches), C, X, Y, Z), float32
    y : Tensor, shape (len(patches), 1, X, Y, Z), float32 (0 / 1 labels)
    """
    rs = np.random.default_rng([seed, step])
    item = items[int(rs.integers(len(items)))]
    xs, ys = [], []
    for k in patches:
        xform.set_random_state(seed=int(np.random.default_rng([seed, step, k]).integers(2**31)))
        source = item
        if carvemix_p > 0 and len(items) > 1:
            rm = np.random.default_rng([seed, step, k, 1])
            if rm.random() < carvemix_p:
                donors = [d for d in items if d is not item]
                source = carvemix(item, donors[int(rm.integers(len(donors)))], rm)
        # the crop deep-copies every key it does not crop: pass only what it needs
        (sample,) = xform({key: source[key] for key in _CROP_KEYS})
        xs.append(torch.as_tensor(np.asarray(sample["image"])))
        ys.append(torch.as_tensor(np.asarray(sample["label"])))
    return torch.stack(xs).float(), torch.stack(ys).float()


def _has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _save_state(path: Path, step: int, model, ema, opt, running: list, history: list,
                settings: dict, sittings: list) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"step": step, "sampling": SAMPLING, "settings": json.dumps(settings),
                "sittings": json.dumps(sittings), "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else {},
                "optimizer": opt.state_dict(), "running": torch.tensor(running, dtype=torch.float64),
                "history": json.dumps(history)}, tmp)
    os.replace(tmp, path)


def _check_resume_settings(state: dict, settings: dict, path: Path) -> None:
    """Refuse to resume with settings other than the interrupted run's (one-line
    :class:`InputError` naming them): the result would be neither run. Subject names are
    compared when both runs recorded them (their number always). States written before the
    settings were stored are not checked."""
    if "settings" not in state:
        return
    saved = json.loads(state["settings"])
    now = json.loads(json.dumps(settings))  # the same types as the stored copy
    # names are compared when both runs have them (the Python API may leave them out)
    diff = [k for k in now if k in saved and saved[k] != now[k]
            and not (k == "train_subjects" and not (saved[k] and now[k]))]
    if diff:
        was = ", ".join(f"{k} {saved[k]}" for k in diff)
        given = ", ".join(f"{k} {now[k]}" for k in diff)
        raise InputError(f"--resume: the interrupted run in {path.parent} was started with "
                         f"{was}; this command gives {given}. Resume with the same settings, "
                         f"or use --overwrite to start again")


def read_init_config(folder):
    """The config of the one-network checkpoint ``folder`` to fine-tune from
    (``train --init-from``).

    Raises
    ------
    InputError
        Not a readable checkpoint folder, or an ensemble (one line, naming ``--init-from``).
    """
    from .errors import ModelError
    from .models.checkpoint import read_config

    folder = Path(folder)
    try:
        icfg = read_config(folder)
    except ModelError as e:
        raise InputError(f"--init-from: {e}") from None
    if icfg.members:
        raise InputError(f"--init-from {folder} is an ensemble of {len(icfg.members)} members; "
                         f"give one member's folder (e.g. {folder / icfg.members[0]})")
    return icfg


def check_init_from(folder, architecture: str, arguments: dict, normalisation: str):
    """The config of checkpoint ``folder`` if a run of ``architecture`` / ``arguments`` /
    ``normalisation`` can start from its weights (``train --init-from``).

    Raises
    ------
    InputError
        See :func:`read_init_config`; another architecture, arguments or normalisation.
    """
    icfg = read_init_config(folder)
    ours, theirs = (architecture, dict(arguments)), (icfg.architecture, dict(icfg.arguments))
    if json.loads(json.dumps(ours)) != json.loads(json.dumps(theirs)):
        raise InputError(f"--init-from {folder} holds {icfg.architecture} "
                         f"{icfg.arguments or '(defaults)'}, not {architecture} "
                         f"{arguments or '(defaults)'}: give the same --architecture and "
                         f"--channels")
    if icfg.normalisation != normalisation:
        raise InputError(f"--init-from {folder} was trained with --normalisation "
                         f"{icfg.normalisation}, not {normalisation}")
    return icfg


def _initial_network(folder, architecture: str, arguments: dict, normalisation: str):
    """The network of checkpoint ``folder`` to fine-tune, and its provenance.

    Returns
    -------
    model : torch.nn.Module
        ``folder``'s network with its weights, in training mode.
    init : dict
        ``folder`` (resolved path), ``sha256`` of its weights file, ``trained_on`` (its
        training subjects, added to the new model's), ``threshold`` (its lesion probability
        threshold, kept) and ``landmarks`` (its standard histogram scale; empty without
        histogram normalisation).

    Raises
    ------
    InputError
        See :func:`check_init_from`; also weights that do not fit its config.
    """
    import hashlib

    from .errors import ModelError
    from .models.checkpoint import WEIGHTS_NAME, _load_network

    folder = Path(folder)
    icfg = check_init_from(folder, architecture, arguments, normalisation)
    try:
        model = _load_network(folder, icfg, folder / "config.json").train()
    except ModelError as e:
        raise InputError(f"--init-from: {e}") from None
    digest = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    return model, {"folder": str(folder.resolve()), "sha256": digest,
                   "trained_on": list(icfg.trained_on), "threshold": icfg.threshold,
                   "landmarks": icfg.landmarks}


def _plot_history(history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [h["loss"] for h in history], "k.-")
    ax[0].set(xlabel="step", ylabel="training loss (Dice + CE)")
    v = [(h["step"], h["val_ndsc"], h.get("val_f1", float("nan"))) for h in history
         if "val_ndsc" in h]
    if v:
        ax[1].plot([a for a, _, _ in v], [b for _, b, _ in v], "b.-", label="nDSC")
        ax[1].plot([a for a, _, _ in v], [c for _, _, c in v], "r.-", label="lesion F1")
        ax[1].legend()
    ax[1].set(xlabel="step", ylabel="validation (EMA weights)", ylim=(0, 1))
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def train(train_subjects: Sequence[Subject], val_subjects: Sequence[Subject], out_dir: str | Path,
          architecture: str = "unet3d", arguments: dict | None = None,
          roi_size: Sequence[int] = (96, 96, 96), steps: int = 1200, batch_size: int = 2,
          lr: float = 1e-3, val_every: int = 100, seed: int = 0, threshold: float = 0.5,
          overlap: float = 0.25, progress: bool = True, command: str = "",
          data_description: str = "", recipe: str = "v2", ema_decay: float = 0.999,
          warmup: int = 100, checkpoint_every: int = 0, resume: bool = False,
          stop_after: int | None = None, save_val_prob: bool = False,
          trained_on=(), normalisation: str = "zscore_nonzero", device: str = "cpu",
          echo=None, init_from: str | Path | None = None) -> dict:
    """Train and save the final (EMA) weights in ``out_dir``.

    Under ``torchrun`` (``WORLD_SIZE`` = W > 1) every rank runs this function and the model is
    wrapped in ``DistributedDataParallel``:

    * ``batch_size`` is the **global batch** of a step: each rank draws ``batch_size / W`` of
      its patches (rank ``r`` the patches ``r·b/W .. (r+1)·b/W - 1``; each patch is drawn from
      ``(seed, step, k)`` alone), so the ranks' shares are disjoint and together they are the
      batch one process draws;
    * the gradients are averaged over the ranks, which is the gradient of the single-process
      loss of the global batch (the loss is a mean over equal-sized patches), and the
      learning rate is the one given for the global batch: **not scaled** with W (the same
      run on 1 or W processes gives the same weights, up to float rounding);
    * batch norm: on GPUs the network's batch-norm layers become ``SyncBatchNorm``
      (statistics over the global batch, as in one process); on the CPU (gloo; PyTorch has no
      CPU SyncBatchNorm) each rank normalises with its own patches' statistics and the running
      statistics are rank 0's, so a model with batch norm trained on several CPU processes
      differs from the single-process run (instance norm, as in ``nnunet``, does not);
    * rank 0 alone validates and writes files (``train_state.pt``, the weights,
      ``config.json``, history, log); on ``resume`` every rank reads ``train_state.pt``, and a
      run may be resumed with another number of ranks.

    Parameters
    ----------
    train_subjects, val_subjects : sequence of Subject
        Scans with lesion masks. Validation only reports (nDSC, lesion F1 every ``val_every``
        steps); it never selects a checkpoint.
    out_dir : path
        Receives ``config.json`` + ``model.safetensors`` (final EMA weights, or the raw weights
        when ``ema_decay`` is 0), ``last/`` (final raw weights), ``history.json``,
        ``history.png``, ``train.log`` and, while running, ``train_state.pt``.
    steps : int
        Optimiser steps; each uses ``batch_size`` patches (each centred on a lesion voxel with
        probability 1/2, else on a background voxel).
    batch_size : int
        Patches per step over all ranks (the global batch); a multiple of ``WORLD_SIZE``.
    lr : float
        Peak learning rate of AdamW for the global batch (see :func:`lr_at`).
    recipe : {"v1", "v2", "v3", "v2-carvemix"}
        Augmentation recipe, see :func:`augmentations`.
    ema_decay : float
        Decay of the exponential moving average of the weights (0 = none).
    checkpoint_every : int
        Write ``train_state.pt`` (model, EMA, optimiser, history) every this many steps (0 = only
        at validation steps).
    resume : bool
        Continue from ``out_dir/train_state.pt``; the result equals the uninterrupted run.
        The settings that shape the run (architecture and arguments, patch size, batch size,
        learning rate, steps, seed, recipe, normalisation, EMA decay, warm-up, training
        subjects) must be the interrupted run's (:class:`InputError` naming the others).
    stop_after : int, optional
        Stop (with a state file, without final weights) after this step; for tests and for
        splitting a run across sittings.
    save_val_prob : bool
        Save the final validation probability maps as ``val_prob_<i>.nii.gz``.
    trained_on : sequence of str
        Names of the training subjects, stored in ``config.json`` (``trained_on``).
    normalisation : {"zscore_nonzero", "histogram"}
        Input normalisation (:func:`instance_saliency.io.normalise`). ``"histogram"`` learns
        the standard scale as the mean of the training scans' landmarks
        (:func:`instance_saliency.io.histogram_landmarks`) and stores it in ``config.json``.
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``; under torchrun ``"cuda"`` is each rank's
        ``cuda:LOCAL_RANK`` (:meth:`instance_saliency.distributed.World.device`).
    echo : callable, optional
        Receives one-line messages on rank 0 (the set-up of a distributed run, a resume of a
        state written before the per-patch sampling).
    init_from : path, optional
        Fine-tuning: a checkpoint folder of one network (not an ensemble) whose weights start
        the run instead of a random initialisation. Its architecture, arguments and
        normalisation must be the ones given; with ``"histogram"`` its standard scale
        (``landmarks``) is kept rather than learnt again, so that the network keeps seeing
        inputs on the scale it was trained on; its lesion probability threshold is kept too
        (``threshold`` is then ignored). The folder and the SHA256 of its weights are
        recorded (``training.init_from``), its training subjects are added to ``trained_on``
        (the new model saw them too) and a resumed run must name the same folder.

    Returns
    -------
    dict
        Training summary (also stored in ``config.json`` under ``training``): rank 0's, on
        every rank.

    Raises
    ------
    InputError
        Unknown recipe or normalisation, ``resume`` without a state file or with other
        settings than the interrupted run's, a ``batch_size`` that is not a multiple of
        ``WORLD_SIZE``, or an ``init_from`` folder of another architecture, arguments or
        normalisation, holding an ensemble, or not a readable checkpoint folder.
    DistributedError
        Under torchrun: the ranks cannot meet, or another rank did not answer in time.
    """
    from .distributed import World, process_group, timeout_s

    world = World.from_environment()
    if batch_size % world.size:
        raise InputError(f"--batch-size {batch_size} (the global batch) must be a multiple of "
                         f"the number of processes, WORLD_SIZE={world.size}")
    device = world.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_NAME
    if resume and not state_path.is_file():
        raise InputError(f"--resume: {state_path} not found (no interrupted run in {out_dir})")
    fh = None
    if world.is_main:  # one writer of train.log
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    log.setLevel(logging.INFO)
    echo = echo if (echo is not None and world.is_main) else (lambda m: None)
    try:
        with process_group(world, device, timeout_s(1800)) as group:
            return _train(group, train_subjects, val_subjects, out_dir, architecture,
                          arguments, roi_size, steps, batch_size, lr, val_every, seed,
                          threshold, overlap, progress, command, data_description, recipe,
                          ema_decay, warmup, checkpoint_every, resume, stop_after,
                          save_val_prob, trained_on, normalisation, device, echo, init_from)
    finally:
        if fh is not None:
            log.removeHandler(fh)
            fh.close()


def _train(group, train_subjects, val_subjects, out_dir: Path, architecture, arguments,
           roi_size, steps, batch_size, lr, val_every, seed, threshold, overlap, progress,
           command, data_description, recipe, ema_decay, warmup, checkpoint_every, resume,
           stop_after, save_val_prob, trained_on, normalisation, device, echo,
           init_from=None) -> dict:
    """:func:`train` on one rank, inside its process group (a stand-in for one process)."""
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    world = group.world
    main = world.is_main
    per_rank = batch_size // world.size
    mine = range(world.rank * per_rank, (world.rank + 1) * per_rank)
    state_path = out_dir / STATE_NAME
    set_determinism(seed)
    torch.manual_seed(seed)
    arguments = dict(arguments or {})
    model = build_model(architecture, **arguments)
    cfg = ModelConfig(architecture=architecture, arguments=arguments, roi_size=list(roi_size),
                      overlap=overlap, threshold=threshold, trained_on=[str(t) for t in trained_on],
                      normalisation=normalisation)
    init = None
    if init_from is not None:
        model, init = _initial_network(init_from, architecture, arguments, normalisation)
        cfg.landmarks = list(init.pop("landmarks"))
        cfg.threshold = init["threshold"]  # chosen for the starting model; kept, not re-tuned
        # the scans the starting weights saw are scans this model saw (held-out rules)
        from .datasets import saw_any

        cfg.trained_on += [t for t in init["trained_on"] if not saw_any(cfg.trained_on, [t])]
    elif normalisation == "histogram":
        cfg.landmarks = np.mean([histogram_landmarks(s.image) for s in train_subjects],
                                axis=0).round(6).tolist()
    items = [_to_item(s, cfg, lesions=recipe in CARVEMIX) for s in train_subjects]
    val_images = [normalise(s.image, cfg.normalisation, cfg.landmarks) for s in val_subjects
                  ] if main else []
    xform = augmentations(roi_size, 1, recipe)  # one patch per draw, see _draw_patches
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    cuda = torch.device(device).type == "cuda"
    if not _has_batch_norm(model):
        batch_norm = "none"
    elif not world.distributed:
        batch_norm = "statistics of the global batch"
    elif cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        batch_norm = "SyncBatchNorm: statistics of the global batch"
    else:
        batch_norm = ("per process: statistics of each rank's patches, running statistics of "
                      "rank 0 (no SyncBatchNorm on the CPU)")
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ema = _ema(model, ema_decay) if ema_decay > 0 else None
    history: list = []
    running: list = []
    sittings: list = []
    start = 1
    # what a resumed run must share with the interrupted one to continue it exactly
    settings = {"architecture": architecture, "arguments": arguments,
                "roi_size": list(roi_size), "batch_size": batch_size, "lr": lr, "steps": steps,
                "seed": seed, "recipe": recipe, "normalisation": normalisation,
                "ema_decay": ema_decay, "warmup": warmup,
                "n_train_subjects": len(train_subjects),
                "train_subjects": [str(t) for t in trained_on],
                "init_from": init["folder"] if init else None}
    if resume:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_resume_settings(st, settings, state_path)
        try:
            model.load_state_dict(st["model"])
        except RuntimeError:
            raise InputError(f"--resume: {state_path} holds another network than --architecture "
                             f"{architecture} with {arguments or 'its defaults'}") from None
        opt.load_state_dict(st["optimizer"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        running = [float(v) for v in st["running"]]
        history = json.loads(st["history"])
        sittings = json.loads(st.get("sittings", "[]"))  # states before session 9: none
        start = int(st["step"]) + 1
        log.info(json.dumps({"resumed_at_step": start - 1}))
        if st.get("sampling") != SAMPLING:
            note = (f"{STATE_NAME} was written before patches were drawn one seed each: the "
                    f"steps after {start - 1} draw other patches than the interrupted run would")
            log.info(note)
            echo(f"note: {note}")
    net = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[torch.device(device).index]
                                      if cuda else None)
    setup = {"processes": world.size, "global_batch": batch_size, "batch_per_process": per_rank,
             "lr": lr, "lr_rule": "the learning rate of the global batch, not scaled with the "
             "number of processes", "batch_norm": batch_norm, "device": device}
    log.info(json.dumps(setup))
    # one entry per sitting: a run resumed on another number of processes or another device
    # says so in its config.json (the top-level fields are the last sitting's)
    sittings.append({"from_step": start, **setup})
    if world.distributed:
        echo(f"training on {world.size} processes ({device}): global batch {batch_size} = "
             f"{per_rank} patch(es) per process x {world.size}; learning rate {lr:g} for the "
             f"global batch (not scaled); batch norm: {batch_norm}")
    t0 = time.time() - (history[-1]["time_s"] if history else 0.0)
    last = min(steps, stop_after) if stop_after else steps
    it = range(start, last + 1)
    if progress and main:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train", unit="step", initial=start - 1, total=steps)
    model.train()
    eval_model = ema.module if ema is not None else model
    for step in it:
        # every random draw of this step depends on (seed, step[, patch]) alone: exact resume,
        # and the ranks' shares of the global batch are the patches one process would draw
        x, y = _draw_patches(items, xform, seed, step, mine, CARVEMIX.get(recipe, 0.0))
        x, y = x.to(device), y.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()  # DDP: gradients averaged over the ranks
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        running.append(group.mean(loss.detach()))  # the loss of the global batch
        is_val = step % val_every == 0 or step == steps
        if is_val:
            rec = {"step": step, "loss": float(np.mean(running)), "lr": lr_at(step, steps, lr, warmup),
                   "time_s": round(time.time() - t0, 1)}
            running = []
            if main:  # the other ranks wait at their next step
                if val_subjects:
                    res, probs = validate(eval_model, val_subjects, cfg, val_images,
                                          return_prob=True)
                    rec["val"] = res
                    rec["val_ndsc"] = float(np.mean([r["ndsc"] for r in res]))
                    rec["val_f1"] = float(np.nanmean([r["lesion_f1"] for r in res]))
                    if step == steps and save_val_prob:
                        from .io import save_map

                        for i, (s, p) in enumerate(zip(val_subjects, probs)):
                            save_map(out_dir / f"val_prob_{i}.nii.gz", p, s.affine)
                history.append(rec)
                log.info(json.dumps({k: v for k, v in rec.items() if k != "val"}))
                atomic_write_text(out_dir / "history.json", json.dumps(history, indent=1))
                _plot_history(history, out_dir / "history.png")
        if main and ((checkpoint_every and step % checkpoint_every == 0) or is_val
                     or step == last):
            _save_state(state_path, step, model, ema, opt, running, history, settings,
                        sittings)
    if last < steps:  # stopped early on purpose: the state file continues the run
        group.barrier()  # the state is written when any rank returns
        return {"stopped_at": last}
    summary = {
        "command": command, "data": data_description, "steps": steps, "batch_size": batch_size,
        "processes": world.size, "batch_per_process": per_rank,
        "lr_rule": setup["lr_rule"], "batch_norm": batch_norm,
        "roi_size": list(roi_size), "lr": lr, "seed": seed, "recipe": recipe,
        "ema_decay": ema_decay, "normalisation": normalisation, "warmup": warmup, "schedule": "linear warm-up + cosine to 2 %",
        "sampling": SAMPLING, "weights": "EMA" if ema is not None else "last step",
        "init_from": init, "sittings": sittings,
        "val_at_last": history[-1].get("val") if history else None,
        "train_time_s": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
    }
    if main:
        save_checkpoint(out_dir / "last", model.eval(), cfg)
        save_checkpoint(out_dir, eval_model.eval(), cfg)
        cfg.training = summary
        for folder in (out_dir, out_dir / "last"):
            atomic_write_text(folder / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        state_path.unlink(missing_ok=True)
    return group.broadcast(summary)  # rank 0's; the model is written when any rank returns
