"""Models: one interface (:class:`SegmentationModel`) over every kind of model.

========================  =====================================================================
file                      loads
========================  =====================================================================
``registry.py``           the seed paper's architectures by name (MONAI UNet, DynUNet, SwinUNETR)
``checkpoint.py``         our checkpoint folders (``config.json`` + ``model.safetensors``),
                          single networks or ensembles with test-time mirroring
``module.py``             any ``torch.nn.Module`` given in Python
``nnunet.py``             nnU-Net v2 trained-model folders (folds, mirroring, its preprocessing)
``base.py``               the interface, members (folds × mirrorings) and their average
``channels.py``           matching the user's images to the model's channels by name
========================  =====================================================================

:func:`load_model` picks the kind from what it is given, so callers never branch on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelError
from .base import (EnsembleNetwork, HistogramRemap, Member, Mirrored, Prepared,  # noqa: F401
                   SegmentationModel, as_module, ensemble_members, members_of, mirror_combinations)
from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, ModelConfig, default_model_dir,  # noqa: F401
                         load_checkpoint, load_checkpoint_model, load_legacy_state_dict,
                         read_config, save_checkpoint)
from .module import from_module  # noqa: F401
from .registry import ARCHITECTURES, DEFAULT_CAM_LAYER, build_model  # noqa: F401


def model_kind(spec: str | os.PathLike | None) -> str:
    """``"checkpoint"`` or ``"nnunet"`` for a ``--model`` value (folder), by its files.

    Raises
    ------
    ModelError
        Not a folder, or a folder of neither kind (the message says what each needs).
    """
    if spec is None:
        return "checkpoint"
    from .nnunet import is_nnunet_folder

    p = Path(spec)
    if p.is_file():
        raise ModelError(f"--model {p} is a file; give the model folder{_folder_hint(p)}")
    if not p.is_dir():
        raise ModelError(f"model folder not found: {p}")
    if (p / CONFIG_NAME).is_file():
        return "checkpoint"
    if is_nnunet_folder(p):
        return "nnunet"
    # a model folder with one of its files missing: name the file
    if (p / WEIGHTS_NAME).is_file():
        raise ModelError(f"model folder {p} has {WEIGHTS_NAME} but no {CONFIG_NAME}")
    nn = [n for n in ("dataset.json", "plans.json") if (p / n).is_file()]
    folds = sorted(d.name for d in p.glob("fold_*") if d.is_dir())
    if nn or folds:
        missing = [n for n in ("dataset.json", "plans.json") if n not in nn]
        have = ", ".join(nn + [f"{f}/" for f in folds[:3]])
        raise ModelError(f"nnU-Net model folder {p} has {have} but no {' or '.join(missing)}")
    inner = sorted(d.name for d in p.iterdir() if d.is_dir() and is_nnunet_folder(d))
    hint = (f"; it contains nnU-Net model folder(s) {', '.join(inner[:4])}: pass one of them"
            if inner else "")
    raise ModelError(f"{p} is not a model folder: expected {CONFIG_NAME} + {WEIGHTS_NAME} "
                     f"(instance-saliency checkpoint) or dataset.json + plans.json + "
                     f"fold_N/checkpoint_final.pth (nnU-Net v2 trained model){hint}")


def _folder_hint(file: Path) -> str:
    """`` (e.g. DIR)`` naming the model folder that holds ``file``, when there is one."""
    from .nnunet import is_nnunet_folder

    for d in (file.parent, file.parent.parent):
        if (d / CONFIG_NAME).is_file() or is_nnunet_folder(d):
            return f" that holds it: --model {d}"
    return (" (an instance-saliency checkpoint folder with config.json + model.safetensors, or "
            "an nnU-Net v2 trained-model folder with dataset.json, plans.json, fold_N/)")


def load_model(spec: str | os.PathLike | None = None, device="cpu", *, folds=None,
               checkpoint: str | None = None, mirroring: bool | None = None,
               step_size: float | None = None, lesion_label=None,
               exclude_subjects=()) -> SegmentationModel:
    """Load any model folder as a :class:`SegmentationModel`.

    Parameters
    ----------
    spec : path or None
        A checkpoint folder, an nnU-Net v2 trained-model folder, or ``None`` (the shipped
        default model).
    device : str or torch.device
    folds, checkpoint, step_size, lesion_label
        nnU-Net options (:func:`.nnunet.load_nnunet_model`); refused for other kinds.
    mirroring : bool, optional
        Test-time mirroring (nnU-Net default on; checkpoints: as in ``config.json``).
    exclude_subjects : sequence of str
        Checkpoints only: leave out ensemble members trained on these subjects (their
        ``trained_on``); nnU-Net folders do not record their training scans.

    Raises
    ------
    ModelError, InputError
    """
    from ..errors import InputError

    kind = model_kind(spec)
    if kind == "nnunet":
        from .nnunet import DEFAULT_CHECKPOINT, load_nnunet_model

        return load_nnunet_model(spec, device, folds=folds,
                                 checkpoint=checkpoint or DEFAULT_CHECKPOINT,
                                 mirroring=True if mirroring is None else mirroring,
                                 step_size=0.5 if step_size is None else step_size,
                                 lesion_label=lesion_label)
    given = [n for n, v in (("--folds", folds), ("--checkpoint", checkpoint),
                            ("--step-size", step_size), ("--lesion-label", lesion_label))
             if v not in (None, [], ())]
    if given:
        raise InputError(f"{', '.join(given)} apply to nnU-Net model folders only; "
                         f"{spec or 'the shipped model'} is an instance-saliency checkpoint")
    return load_checkpoint_model(spec, device, mirroring, exclude_subjects=exclude_subjects)
