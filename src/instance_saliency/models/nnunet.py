"""nnU-Net v2 trained-model folders as models, explained exactly as nnU-Net predicts.

A trained-model folder (``<Trainer>__<Plans>__<configuration>/``) holds ``dataset.json``,
``plans.json`` and ``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``). It is loaded
with nnU-Net's own code (the optional extra ``instance-saliency[nnunet]``) and run through
nnU-Net's own pipeline (Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nat. Methods 18, 2021; nnunetv2 2.6):

1. **Axis order.** nnU-Net reads images through SimpleITK (or its nibabel reader, which
   transposes the same way): arrays are ``(z, y, x)``; the user's NIfTI arrays here are
   ``(x, y, z)``, so images are transposed ``(2, 1, 0)`` on the way in and maps on the way out.
2. **Preprocessing**: the plans' preprocessor class (``run_case_npy``): ``transpose_forward``,
   crop to the non-zero bounding box, the plans' per-channel normalisation, resampling to the
   configuration's spacing.
3. **Sliding window**: nnU-Net's window positions (``compute_steps_for_sliding_window``, tile
   step size 0.5 by default), its Gaussian importance map (``compute_gaussian``, σ = 1/8 of the
   patch), symmetric zero padding to the patch size; logits blended as
   ``Σ_w g·out_w / Σ_w g``. nnU-Net 2.x accumulates that sum in float16; here it is float32
   (the mathematically intended sum).
4. **Mirroring and folds**: the plain prediction and every flip combination of the checkpoint's
   ``inference_allowed_mirroring_axes`` are averaged, then the folds are averaged — one
   ensemble of equally weighted members (:mod:`.base`).
5. **Export**: ``convert_predicted_logits_to_segmentation_with_correct_shape`` (resampling of
   the logits back to the cropped shape, softmax, un-cropping with background outside the box,
   ``transpose_backward``); the lesion mask is the argmax.

Saliency is taken with respect to the network's input (nnU-Net's normalised, resampled space)
and brought back to the user's grid by the inverse steps: the configuration's probability
resampling (linear) back to the cropped shape when the spacings differ, zero outside the
cropping box, ``transpose_backward`` and the ``(z, y, x) -> (x, y, z)`` transpose. When the
input is already at the plans' spacing there is no resampling and every step is an exact
re-indexing; otherwise an instance's target on the network grid is its mask resampled with the
configuration's segmentation resampling, and the map is resampled back (both recorded in
``run.json``).

Checkpoints are pickles. They are read with ``torch.load(weights_only=True)`` and an explicit
allow-list of the plain types nnU-Net stores (numpy scalars and dtypes in its training log):
no code in a checkpoint can run; anything else is refused with a one-line message.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, ModelError, ModelWarning
from .base import Prepared, SegmentationModel, ensemble_members

NNUNET_EXTRA = "pip install 'instance-saliency[nnunet]'"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
#: readers whose arrays are the file's voxel array transposed (2, 1, 0), spacing reversed
_TRANSPOSING_READERS = ("SimpleITKIO", "NibabelIO")
_REORIENTING_READERS = ("NibabelIOWithReorient",)


def is_nnunet_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` looks like an nnU-Net v2 trained-model folder (by its files)."""
    f = Path(folder)
    return f.is_dir() and (f / "plans.json").is_file() and (f / "dataset.json").is_file()


def _import_nnunet(folder) -> None:
    """Import nnunetv2 (and its path module, which prints three lines about nnUNet_raw /
    nnUNet_preprocessed / nnUNet_results when they are unset: irrelevant for inference from a
    results folder, so they are kept off the user's terminal)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import nnunetv2  # noqa: F401
            import nnunetv2.paths  # noqa: F401
    except ImportError:
        raise ModelError(f"{folder} is an nnU-Net v2 model folder, but nnunetv2 is not "
                         f"installed; install the extra: {NNUNET_EXTRA}") from None


def _safe_globals() -> list:
    """The plain types an nnU-Net checkpoint may contain besides tensors and containers.

    nnU-Net's training log (``logging``) holds numpy float scalars, pickled as
    ``numpy.core.multiarray.scalar(dtype, bytes)`` (``numpy._core`` under numpy 2); a
    ``torch.device`` sits in ``init_args``. Reconstructing these runs no user code.
    """
    import numpy.dtypes as npd

    try:
        from numpy._core import multiarray as ma
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as ma
    allow = [np.dtype, np.ndarray, ma._reconstruct, ma.scalar,
             (ma.scalar, "numpy.core.multiarray.scalar"),
             (ma.scalar, "numpy._core.multiarray.scalar"),
             (ma._reconstruct, "numpy.core.multiarray._reconstruct"),
             (ma._reconstruct, "numpy._core.multiarray._reconstruct"),
             torch.device]
    allow += [getattr(npd, n) for n in dir(npd) if n.endswith("DType")
              and isinstance(getattr(npd, n), type)]
    return allow


def _unreadable_reason(e: BaseException) -> str:
    """Why ``torch.load`` could not read a file, in words (no internal library text)."""
    text = " ".join(str(e).split())
    if isinstance(e, EOFError) or any(k in text for k in (
            "central directory", "failed reading zip archive", "unexpected EOF",
            "Ran out of input", "truncated", "file read failed")):
        return ("is truncated or damaged (an incomplete PyTorch checkpoint); copy or download "
                "it again")
    if isinstance(e, OSError):
        return f"cannot be read ({e.strerror or type(e).__name__})"
    first = text[:100] + ("…" if len(text) > 100 else "")
    return f"is not a readable PyTorch checkpoint ({first or type(e).__name__})"


def describe_state_dict_mismatch(expected: dict, state: dict) -> str:
    """One line on how ``state`` (loaded weights) differs from ``expected`` (the network's).

    Names the first tensor whose shape differs (both shapes) and counts the missing and
    unexpected keys; empty when they match.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape = [k for k in expected if k in state and hasattr(state[k], "shape")
             and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"{k} has shape {tuple(state[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} in the network"
                     + (f" ({len(shape)} tensors differ in shape)" if len(shape) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    return "; ".join(parts)


def load_checkpoint_safely(path: str | os.PathLike) -> dict:
    """Read an nnU-Net checkpoint without running code from it.

    Returns
    -------
    dict
        The checkpoint (``network_weights``, ``init_args``, ``trainer_name``,
        ``inference_allowed_mirroring_axes``, ...).

    Raises
    ------
    ModelError
        Not a readable checkpoint, or it needs a global outside the allow-list (named).
    """
    p = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())
        m = re.search(r"(?:Unsupported global|unsupported GLOBAL|GLOBAL)[:\s]+([\w.]+)", msg)
        what = f" ({m.group(1)})" if m else ""
        raise ModelError(f"{p} refused: the checkpoint needs code or types outside the "
                         f"allow-list of plain nnU-Net contents{what}; nothing was run") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, TypeError, IndexError) as e:
        raise ModelError(f"{p} {_unreadable_reason(e)}") from None
    if not isinstance(obj, dict) or "network_weights" not in obj:
        raise ModelError(f"{p} is not an nnU-Net checkpoint (no 'network_weights')")
    return obj


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"nnU-Net model folder {path.parent} has no {path.name}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return d


def available_folds(folder: Path, checkpoint: str = DEFAULT_CHECKPOINT) -> list:
    """Folds (``int`` or ``"all"``) with ``fold_<f>/<checkpoint>`` in ``folder``, sorted."""
    out = []
    for d in folder.glob("fold_*"):
        f = d.name[5:]
        if (d / checkpoint).is_file() and (f.isdigit() or f == "all"):
            out.append(int(f) if f.isdigit() else "all")
    return sorted(out, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


def channel_names(dataset_json: dict, where: str = "dataset.json") -> list:
    """Input channel names in order (``channel_names``, or the older ``modality``)."""
    ch = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(ch, dict) or not ch:
        raise ModelError(f"{where} has no 'channel_names'")
    try:
        keys = sorted(ch, key=lambda k: int(k))
    except (TypeError, ValueError):
        raise ModelError(f"{where}: channel_names keys must be 0, 1, ...; got {list(ch)}") from None
    return [str(ch[k]) for k in keys]


def _labels(dataset_json: dict, where: str) -> dict:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError(f"{where} has no 'labels'")
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise ModelError(f"{where}: region-based labels ({name!r}: {v}) are not supported; "
                             "explain a model trained on plain labels")
        if not isinstance(v, int) or isinstance(v, bool):
            raise ModelError(f"{where}: label {name!r} has value {v!r}, not an integer")
    return labels


def resolve_lesion_label(labels: dict, lesion_label, where: str) -> tuple[list, int]:
    """Output class names (in output-channel order) and the lesion's output channel.

    ``lesion_label``: a label name (case-insensitive) or its integer value; ``None`` = the only
    foreground label.

    Raises
    ------
    ModelError
        No such label; or several foreground labels and none chosen.
    """
    outputs = sorted(((v, n) for n, v in labels.items() if n != "ignore"), key=lambda t: t[0])
    values = [v for v, _ in outputs]
    if values != list(range(len(values))):
        raise ModelError(f"{where}: labels must be consecutive from 0, got {values}")
    names = [n for _, n in outputs]
    fg = [n for v, n in outputs if v != 0]
    listing = ", ".join(f"{n}={v}" for v, n in outputs)
    if lesion_label is None:
        if len(fg) != 1:
            raise ModelError(f"{where} has {len(fg)} foreground labels ({listing}); choose the "
                             f"lesion class with --lesion-label NAME|INDEX")
        return names, names.index(fg[0])
    s = str(lesion_label).strip()
    if s.lstrip("-").isdigit():
        v = int(s)
        if v not in values or v == 0:
            raise ModelError(f"--lesion-label {s}: not a foreground label of {where} ({listing})")
        return names, values.index(v)
    hit = [n for n in fg if n.lower() == s.lower()]
    if not hit:
        raise ModelError(f"--lesion-label {s!r}: no such foreground label in {where} ({listing})")
    return names, names.index(hit[0])


class NnUNetModel(SegmentationModel):
    """An nnU-Net v2 trained-model folder (folds × mirroring) behind the common interface."""

    kind = "nnunet"

    def prepare(self, image: np.ndarray, spacing: Sequence[float], affine=None) -> Prepared:
        """nnU-Net's preprocessing of a raw ``(C, X, Y, Z)`` image (channel order
        :attr:`channels`) with voxel ``spacing`` (mm, per array axis).

        Raises
        ------
        InputError
            The image's channel count differs from the model's.
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import (
            bounding_box_to_slice, insert_crop_into_image)
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape)

        pm, cm, lm = self.plans_manager, self.configuration_manager, self.label_manager
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != len(self.channels):
            raise InputError(f"nnU-Net model {self.source} expects {len(self.channels)} channel(s) "
                             f"{self.channels}, got an image of shape {image.shape}")
        user_shape = tuple(image.shape[1:])
        spacing = [float(s) for s in spacing]
        ornt = None
        if self.reader in _REORIENTING_READERS:  # nibabel reorientation to RAS first
            from nibabel import orientations as no

            if affine is None:
                raise InputError(f"{self.reader} needs the image affine")
            ornt = no.io_orientation(np.asarray(affine))
            image = np.stack([no.apply_orientation(c, ornt) for c in image])
            perm = [int(a) for a in ornt[:, 0]]
            spacing = [spacing[perm.index(i)] for i in range(3)]
        data = np.ascontiguousarray(image.transpose(0, 3, 2, 1), dtype=np.float32)
        props = {"spacing": spacing[::-1]}
        pre = cm.preprocessor_class(verbose=False)
        x, _, props = pre.run_case_npy(data, None, props, pm, cm, self.dataset_json)
        x = np.ascontiguousarray(x, dtype=np.float32)
        net_shape = tuple(x.shape[1:])
        cropped = tuple(int(s) for s in props["shape_after_cropping_and_before_resampling"])
        bbox = props["bbox_used_for_cropping"]
        before = tuple(int(s) for s in props["shape_before_cropping"])
        orig_sp = [props["spacing"][i] for i in pm.transpose_forward]
        resampled = cropped != net_shape
        tf = list(pm.transpose_forward)
        tb = list(pm.transpose_backward)

        def back_axes(a):  # (K, *before) in nnU-Net order -> (K, X, Y, Z) user order
            a = a.transpose([0] + [i + 1 for i in tb]).transpose(0, 3, 2, 1)
            if ornt is not None:
                a = np.stack([_unorient(c, ornt) for c in a])
            return np.ascontiguousarray(a, dtype=np.float32)

        def to_net(mask):
            m = np.asarray(mask, bool)
            if ornt is not None:
                from nibabel import orientations as no

                m = no.apply_orientation(m, ornt).astype(bool)
            m = m.transpose(2, 1, 0).transpose(tf)[bounding_box_to_slice(bbox)]
            if resampled:
                m = cm.resampling_fn_seg(m[None].astype(np.int8), net_shape, orig_sp,
                                         cm.spacing)[0] > 0
            return np.ascontiguousarray(m)

        def to_user(a):
            a = np.asarray(a, dtype=np.float32)
            if resampled:
                a = np.asarray(cm.resampling_fn_probabilities(a, cropped, cm.spacing, orig_sp),
                               dtype=np.float32)
            full = np.zeros((a.shape[0],) + before, dtype=np.float32)
            full = insert_crop_into_image(full, a, bbox)
            return back_axes(full)

        def probabilities(logits):
            t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
            threads = torch.get_num_threads()
            _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
                t, pm, cm, lm, dict(props), return_probabilities=True,
                num_threads_torch=threads)
            probs = np.asarray(probs, dtype=np.float32).transpose(0, 3, 2, 1)
            if ornt is not None:
                probs = np.stack([_unorient(c, ornt) for c in probs])
            return np.ascontiguousarray(probs, dtype=np.float32)

        mapping = {
            "reader_axis_order": f"{self.reader}: arrays (z, y, x) = user (x, y, z) transposed",
            "transpose_forward": tf, "bbox_used_for_cropping": [list(map(int, b)) for b in bbox],
            "shape_before_cropping": list(before), "shape_after_cropping": list(cropped),
            "network_shape": list(net_shape), "original_spacing_zyx": props["spacing"],
            "network_spacing": list(cm.spacing),
            "resampled": bool(resampled),
            "normalization_schemes": list(cm.normalization_schemes),
            "maps_back": ("exact re-indexing: inverse transpose, zero outside the cropping box"
                          if not resampled else
                          "maps resampled back with the configuration's probability "
                          f"resampling ({cm.configuration.get('resampling_fn_probabilities')}, "
                          f"{cm.configuration.get('resampling_fn_probabilities_kwargs')}) to "
                          "the cropped shape, then zero outside the cropping box and inverse "
                          "transpose; instance targets use the instance mask resampled with "
                          f"the segmentation resampling ({cm.configuration.get('resampling_fn_seg')})"
                          " — approximate, not the exact adjoint of the resampling"),
        }
        if ornt is not None:
            mapping["reoriented"] = "RAS (nibabel io_orientation), inverted on the way back"
        return Prepared(x, user_shape, to_net, to_user, probabilities, not resampled, mapping)

    def grid(self, shape: Sequence[int]):
        """nnU-Net's windows and Gaussian for a network-space ``shape`` (float32)."""
        import itertools

        from nnunetv2.inference.sliding_window_prediction import (
            compute_gaussian, compute_steps_for_sliding_window)

        from ..inference import WindowGrid

        patch = tuple(int(p) for p in self.roi_size)
        padded = tuple(max(p, int(s)) for p, s in zip(patch, shape))
        steps = compute_steps_for_sliding_window(padded, patch, self.step_size)
        starts = list(itertools.product(*steps))  # x outer, z inner: nnU-Net's order
        gauss = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10,
                                 dtype=torch.float32, device=torch.device("cpu"))
        return WindowGrid.from_windows(shape, patch, starts, gauss)


def _unorient(a: np.ndarray, ornt) -> np.ndarray:
    """Inverse of ``nibabel.orientations.apply_orientation(x, ornt)`` for 3D arrays."""
    from nibabel import orientations as no

    inv = np.zeros_like(np.asarray(ornt, dtype=float))
    # ornt[i] = (new axis of input axis i, flip); invert: output axis j came from input i
    for i, (j, flip) in enumerate(np.asarray(ornt)):
        inv[int(j)] = (i, flip)
    return no.apply_orientation(a, inv)


def _build_network(trainer_name: str, pm, cm, dataset_json: dict, where: str
                   ) -> tuple[torch.nn.Module, list]:
    """Build the configuration's network as nnU-Net's predictor does (deep supervision off);
    with the base trainer's builder when the trainer class is not installed (warning)."""
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    notes = []
    trainer = None
    if trainer_name and trainer_name != "nnUNetTrainer":
        try:
            trainer = recursive_find_python_class(
                os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), trainer_name,
                "nnunetv2.training.nnUNetTrainer")
        except Exception:  # a broken third-party trainer module: fall back as below
            trainer = None
        if trainer is None:
            notes.append(f"trainer class {trainer_name!r} of {where} is not installed; the "
                         "network was built from plans.json as nnU-Net's base nnUNetTrainer "
                         "builds it")
    trainer = trainer or nnUNetTrainer
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    try:
        net = trainer.build_network_architecture(
            cm.network_arch_class_name, cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import, n_in, n_out, enable_deep_supervision=False)
    except Exception as e:
        first = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
        raise ModelError(f"cannot build the network of {where} from plans.json "
                         f"({cm.network_arch_class_name}): {first}") from None
    return net, notes


def _default_cam_layer(net: torch.nn.Module) -> str | None:
    """The decoder stage at 1/2 resolution (the last but one), when the net has
    ``decoder.stages`` (nnU-Net's PlainConvUNet / ResidualEncoderUNet)."""
    stages = getattr(getattr(net, "decoder", None), "stages", None)
    if isinstance(stages, torch.nn.ModuleList) and len(stages) >= 2:
        return f"decoder.stages.{len(stages) - 2}"
    return None


def load_nnunet_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
                      folds: Sequence | None = None, checkpoint: str = DEFAULT_CHECKPOINT,
                      mirroring: bool = True, step_size: float = 0.5,
                      lesion_label=None) -> NnUNetModel:
    """Load an nnU-Net v2 trained-model folder.

    Parameters
    ----------
    folder : path
        ``<Trainer>__<Plans>__<configuration>/`` with ``dataset.json``, ``plans.json`` and
        ``fold_<f>/<checkpoint>``.
    folds : sequence of int or "all", optional
        Folds to average (nnU-Net's ``-f``); default every numbered fold present
        (``fold_all`` only when asked for, as nnU-Net does).
    checkpoint : str
        ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.
    mirroring : bool
        Test-time mirroring over the checkpoint's ``inference_allowed_mirroring_axes``.
    step_size : float
        Tile step size as a fraction of the patch (nnU-Net default 0.5), in (0, 1].
    lesion_label : str or int, optional
        Label name or value of the lesion class; default the only foreground label.

    Returns
    -------
    NnUNetModel

    Raises
    ------
    ModelError
        nnunetv2 not installed (names the extra), missing file or fold, unreadable or unsafe
        checkpoint, weights that do not fit the plans' network, a 2D or cascade configuration,
        region-based labels, an unknown lesion label.
    InputError
        ``step_size`` outside (0, 1].
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    dataset_json = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    if not (0 < float(step_size) <= 1):
        raise InputError(f"--step-size must lie in (0, 1], got {step_size}")
    if checkpoint not in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth"):
        raise InputError(f"--checkpoint must be checkpoint_final.pth, checkpoint_best.pth or "
                         f"checkpoint_latest.pth, got {checkpoint!r}")
    present = available_folds(folder, checkpoint)
    if folds is None or len(folds) == 0:
        # as nnU-Net's auto_detect_available_folds: fold_all only when asked for
        folds = [f for f in present if f != "all"]
        if not folds:
            raise ModelError(f"nnU-Net model folder {folder} has no fold_*/{checkpoint} "
                             "(fold_all is used only with --folds all)")
    else:
        want = []
        for f in folds:
            s = str(f).strip()
            if not (s.isdigit() or s == "all"):
                raise InputError(f"--folds: {s!r} is not a fold number or 'all'")
            want.append(int(s) if s.isdigit() else "all")
        missing = [f for f in want if f not in present]
        if missing:
            have = ", ".join(map(str, present)) or "none"
            raise ModelError(f"fold(s) {', '.join(map(str, missing))} of {folder} have no "
                             f"{checkpoint} (folds present: {have})")
        folds = want
    where = f"{folder / 'dataset.json'}"
    labels = _labels(dataset_json, where)
    channels = channel_names(dataset_json, where)
    class_names, lesion_class = resolve_lesion_label(labels, lesion_label, where)
    _import_nnunet(folder)
    ckpts = [load_checkpoint_safely(folder / f"fold_{f}" / checkpoint) for f in folds]
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        pm = PlansManager(plans)
    except Exception as e:
        raise ModelError(f"{folder / 'plans.json'} is not a valid nnU-Net plans file "
                         f"({type(e).__name__}: {e})") from None
    first = ckpts[0]
    init = first.get("init_args") if isinstance(first.get("init_args"), dict) else {}
    conf_name = init.get("configuration") or folder.name.split("__")[-1]
    try:
        cm = pm.get_configuration(conf_name)
        patch = list(cm.patch_size)
    except Exception:
        raise ModelError(f"{folder / 'plans.json'} has no configuration {conf_name!r}") from None
    if len(patch) != 3:
        raise ModelError(f"configuration {conf_name!r} of {folder} is 2D; only 3D nnU-Net "
                         "configurations are supported")
    if cm.previous_stage_name is not None:
        raise ModelError(f"configuration {conf_name!r} of {folder} is a cascade stage; only "
                         "single-stage configurations are supported")
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    notes = []
    if reader not in _TRANSPOSING_READERS + _REORIENTING_READERS:
        notes.append(f"plans.json names the image reader {reader!r}; images are passed in "
                     "SimpleITK axis order (z, y, x) as its readers do")
    trainer_name = str(first.get("trainer_name") or folder.name.split("__")[0])
    nets = []
    for f, ck in zip(folds, ckpts):
        net, n = _build_network(trainer_name, pm, cm, dataset_json, str(folder))
        for msg in n:
            if msg not in notes:
                notes.append(msg)
        sd = ck["network_weights"]
        if not isinstance(sd, dict):
            raise ModelError(f"{folder}/fold_{f}/{checkpoint}: network_weights is not a state dict")
        why = describe_state_dict_mismatch(net.state_dict(), sd)
        try:
            if why:
                raise RuntimeError(why)
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            why = why or " ".join(str(e).split())[:160]
            raise ModelError(f"{folder}/fold_{f}/{checkpoint} does not fit the network built "
                             f"from plans.json: {why}") from None
        nets.append((f"fold_{f}", net.to(device).eval()))
    axes = first.get("inference_allowed_mirroring_axes") if mirroring else None
    axes = tuple(int(a) for a in axes) if axes else ()
    model = NnUNetModel(
        ensemble_members(nets, axes), channels, source=str(folder), class_names=class_names,
        lesion_class=lesion_class, threshold=0.5, decision="argmax",
        cam_layer=_default_cam_layer(nets[0][1]), roi_size=patch,
        info={"folds": [str(f) for f in folds], "checkpoint": checkpoint,
              "configuration": conf_name, "plans_name": pm.plans_name,
              "trainer": trainer_name, "mirror_axes": list(axes), "tile_step_size": step_size,
              "network_class": cm.network_arch_class_name, "patch_size": patch,
              "spacing": list(cm.spacing), "image_reader": reader,
              "blending": "float32 sum of Gaussian-weighted window logits (nnU-Net 2.x sums "
                          "in float16 on the CPU)"})
    model.plans_manager, model.configuration_manager = pm, cm
    model.label_manager = pm.get_label_manager(dataset_json)
    model.dataset_json = dataset_json
    model.step_size = float(step_size)
    model.reader = reader
    model.warnings = notes
    for msg in notes:
        warnings.warn(msg, ModelWarning, stacklevel=2)
    return model
