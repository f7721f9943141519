"""Our checkpoint format: a folder with ``config.json`` + ``model.safetensors``.

Loaded without unpickling (safetensors). ``config.json`` names the architecture of
:mod:`.registry`, its arguments, the input channels (by name), the normalisation, the sliding
window (ROI, overlap), the lesion threshold and class, and optionally an ensemble
(``members``: sub-folders averaged in logit space) and test-time flips (``mirror_axes``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..io import CHANNELS, atomic_write_text
from .registry import build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    """Everything needed to rebuild and run a checkpoint (stored as ``config.json``).

    Attributes
    ----------
    architecture : str
        Key of :data:`ARCHITECTURES`.
    arguments : dict
        Keyword arguments of the builder.
    channels : list of str
        Input channel names, in order (``["FLAIR", "MPRAGE"]``).
    normalisation : str
        Input normalisation: ``"zscore_nonzero"`` (:func:`instance_saliency.io.zscore_nonzero`)
        or ``"histogram"`` (:func:`instance_saliency.io.standardise_histogram` onto
        ``landmarks``).
    landmarks : list of list of float
        Standard histogram landmarks per channel (``"histogram"`` only; learnt on the
        training scans).
    roi_size : list of 3 int
        Sliding-window ROI (patch) size in voxels.
    overlap : float
        Sliding-window overlap fraction.
    threshold : float
        Lesion-probability threshold of the binary mask.
    lesion_class : int
        Output channel of the lesion logit.
    mirror_axes : list of int
        Test-time mirroring: spatial axes (0, 1, 2) whose flip combinations are averaged with
        the plain prediction in logit space, as nnU-Net does (empty = none).
    members : list of str
        Ensemble: sub-folders (each a checkpoint of this architecture) whose logits are
        averaged; the folder then holds no weights of its own. With ``"histogram"``
        normalisation a member may keep its own ``landmarks``: the ensemble's ``landmarks``
        are then the common input standard and each member sees it through an exact
        :class:`~.base.HistogramRemap`.
    trained_on : list of str
        Subjects (public registry names or manifest names) whose scans trained these weights;
        used to keep a demo honest (members that saw the demo scan are left out).
    training : dict
        Training summary (command, data, steps, validation figures, time).
    """

    architecture: str
    arguments: dict = field(default_factory=dict)
    channels: list = field(default_factory=lambda: list(CHANNELS))
    normalisation: str = "zscore_nonzero"
    landmarks: list = field(default_factory=list)
    roi_size: list = field(default_factory=lambda: [96, 96, 96])
    overlap: float = 0.25
    threshold: float = 0.5
    lesion_class: int = 1
    mirror_axes: list = field(default_factory=list)
    members: list = field(default_factory=list)
    trained_on: list = field(default_factory=list)
    training: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ModelError(f"{source}: expected a JSON object")
        if "architecture" not in d:
            raise ModelError(f"{source}: missing key 'architecture'")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"{source}: unknown keys {sorted(unknown)}")
        if not isinstance(d.get("arguments", {}), dict):
            raise ModelError(f"{source}: 'arguments' must be a JSON object, "
                             f"got {d['arguments']!r}")
        from ..io import HISTOGRAM_PERCENTILES, NORMALISATIONS

        norm = d.get("normalisation", "zscore_nonzero")
        if norm not in NORMALISATIONS:
            raise ModelError(f"{source}: unknown normalisation {norm!r}; known: "
                             f"{', '.join(NORMALISATIONS)}")
        if norm == "histogram":
            try:
                lm = np.asarray(d.get("landmarks") or [], dtype=float)
            except (TypeError, ValueError):
                lm = np.zeros(0)
            n_ch = len(d.get("channels", CHANNELS))
            if (lm.shape != (n_ch, len(HISTOGRAM_PERCENTILES))
                    or np.any(np.diff(lm, axis=1) <= 0)):
                raise ModelError(f"{source}: 'landmarks' must be {n_ch} increasing rows of "
                                 f"{len(HISTOGRAM_PERCENTILES)} values for histogram "
                                 "normalisation")
        return cls(**d)


def _aliases(state: dict) -> dict:
    """Key -> earlier key of the very same tensor, for modules registered twice.

    MONAI's ``DynUNet`` (nnunet) holds every block both in its own list and in
    ``skip_layers``, so its state dict names each tensor twice; safetensors stores one copy.
    """
    first, out = {}, {}
    for k, v in state.items():
        if v.numel() == 0:
            continue
        sig = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if sig in first:
            out[k] = first[sig]
        else:
            first[sig] = k
    return out


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, config: ModelConfig) -> None:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    aliases = _aliases(sd)
    state = {k: v.detach().cpu().contiguous() for k, v in sd.items() if k not in aliases}
    tmp = folder / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"architecture": config.architecture})
    os.replace(tmp, folder / WEIGHTS_NAME)
    atomic_write_text(folder / CONFIG_NAME, json.dumps(asdict(config), indent=2) + "\n")


def default_model_dir() -> Path:
    """Folder of the shipped default model (inside the installed package)."""
    return Path(str(resources.files("instance_saliency") / "weights" / "default"))


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """``config.json`` of a checkpoint folder.

    Raises
    ------
    ModelError
        Missing folder or file, invalid JSON, unknown keys.
    """
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    if not cfg_path.is_file():
        raise ModelError(f"model folder {folder} has no {CONFIG_NAME}")
    try:
        return ModelConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except (TypeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_path}: {e}") from None


def _load_network(folder: Path, cfg: ModelConfig, cfg_path: Path) -> torch.nn.Module:
    """Build ``cfg``'s architecture and load ``folder/model.safetensors`` into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    w_path = folder / WEIGHTS_NAME
    if not w_path.is_file():
        raise ModelError(f"model folder {folder} has no {WEIGHTS_NAME}")
    try:
        model = build_model(cfg.architecture, **cfg.arguments)
    except ModelError as e:  # name the file that holds the arguments
        raise ModelError(f"{cfg_path}: {e}") from None
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        text = " ".join(str(e).split())
        if any(k in text for k in ("incomplete metadata", "not fully covered", "too small",
                                   "unexpected end")):
            raise ModelError(f"{w_path} is truncated or damaged (an incomplete safetensors "
                             "file); copy or download it again") from None
        raise ModelError(f"{w_path} is not a valid safetensors file ({text[:100]})") from None
    expected = model.state_dict()
    for k, src in _aliases(expected).items():  # second names of shared tensors
        if k not in state and src in state:
            state[k] = state[src]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{w_path} does not match {cfg.architecture}{cfg.arguments}: "
                         f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(f"{w_path}: shape mismatch for {k}: {tuple(v.shape)} in the file, "
                             f"{tuple(expected[k].shape)} in {cfg.architecture}{cfg.arguments}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_checkpoint_model(folder: str | os.PathLike | None = None,
                          device: str | torch.device = "cpu", mirroring: bool | None = None,
                          exclude_subjects=()):
    """Load a checkpoint folder (single network or ensemble) as a
    :class:`~.base.SegmentationModel`; never unpickles.

    Parameters
    ----------
    folder : path, optional
        Checkpoint folder; ``None`` = the shipped default model.
    device : str or torch.device
    mirroring : bool, optional
        Override the test-time mirroring of ``config.json`` (``False``: none).
    exclude_subjects : sequence of str
        Leave out ensemble members trained on any of these subjects (``trained_on``, names
        compared case-insensitively: ``p39`` is ``P39``), e.g. the scan being explained in the
        demo, so that its TP/FP/FN come from unseen data.

    Raises
    ------
    ModelError
        See :func:`load_checkpoint`; an ensemble member folder that is missing or of another
        architecture, channels or window.
    """
    from .base import SegmentationModel, ensemble_members
    from .registry import DEFAULT_CAM_LAYER

    folder = Path(folder) if folder is not None else default_model_dir()
    cfg = read_config(folder)
    cfg_path = folder / CONFIG_NAME
    n_in = cfg.arguments.get("in_channels", 2)  # every registry builder defaults to 2
    if not isinstance(cfg.channels, list) or not cfg.channels or len(cfg.channels) != n_in:
        raise ModelError(f"{cfg_path} declares {len(cfg.channels or [])} input channel(s) "
                         f"{cfg.channels}, but its network takes {n_in}")
    from ..datasets import saw_any

    excluded = {str(s_) for s_ in exclude_subjects}
    used_on: list = []
    landmarks = cfg.landmarks
    if cfg.members:
        nets, member_landmarks = [], []
        for name in cfg.members:
            sub = folder / str(name)
            if not _is_inside_folder(sub, folder):
                raise ModelError(f"{cfg_path}: ensemble member {name!r} is outside {folder}")
            mcfg = read_config(sub)
            # members may differ in their histogram standard (each fold learnt its own):
            # they are then fed through an exact remap from the ensemble's standard
            keys = ["architecture", "arguments", "channels", "roi_size", "normalisation"]
            if cfg.normalisation != "histogram":
                keys.append("landmarks")
            for key in keys:
                if getattr(mcfg, key) != getattr(cfg, key):
                    raise ModelError(f"ensemble member {sub} differs from {cfg_path} in {key!r}")
            if saw_any(mcfg.trained_on, excluded):
                continue
            used_on.append({"member": str(name), "trained_on": list(mcfg.trained_on)})
            nets.append((str(name), _load_network(sub, mcfg, sub / CONFIG_NAME).to(device)))
            member_landmarks.append(mcfg.landmarks)
        if not nets:
            raise ModelError(f"every member of {folder} was trained on "
                             f"{', '.join(sorted(excluded))}")
        if cfg.normalisation == "histogram":
            if all(lm == member_landmarks[0] for lm in member_landmarks):
                landmarks = member_landmarks[0]  # e.g. one member left: its own standard
            else:
                from .base import HistogramRemap

                nets = [(n, net, None if lm == landmarks
                         else HistogramRemap(landmarks, lm).to(device))
                        for (n, net), lm in zip(nets, member_landmarks)]
    else:
        if saw_any(cfg.trained_on, excluded):
            raise ModelError(f"{folder} was trained on {', '.join(sorted(excluded))}")
        nets = [("model", _load_network(folder, cfg, cfg_path).to(device))]
        used_on.append({"member": "model", "trained_on": list(cfg.trained_on)})
    axes = [] if mirroring is False else list(cfg.mirror_axes)
    model = SegmentationModel(
        ensemble_members(nets, axes), cfg.channels,
        source=str(folder) if folder != default_model_dir() else "shipped default",
        lesion_class=cfg.lesion_class, threshold=cfg.threshold,
        cam_layer=DEFAULT_CAM_LAYER.get(cfg.architecture), roi_size=cfg.roi_size,
        overlap=cfg.overlap, normalisation=cfg.normalisation, landmarks=landmarks,
        info={"architecture": cfg.architecture, "mirror_axes": axes,
              "members_trained_on": used_on,
              "excluded_subjects": sorted(excluded), "config": asdict(cfg)})
    model.kind = "checkpoint"
    model.config = cfg
    return model


def _is_inside_folder(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
        return True
    except ValueError:
        return False


def load_checkpoint(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, ModelConfig]:
    """Load a checkpoint folder into an eval-mode module; never unpickles.

    Parameters
    ----------
    folder : path, optional
        Folder with ``config.json`` and ``model.safetensors``; ``None`` = shipped default model.
        For an ensemble (``members`` in ``config.json``) or a model with test-time mirroring
        the module returned averages the members' logits (:class:`~.base.EnsembleNetwork`).
    device : str or torch.device

    Returns
    -------
    model : torch.nn.Module (in eval mode), config : ModelConfig

    Raises
    ------
    ModelError
        Missing folder or file, invalid JSON, unknown architecture or arguments, a corrupted
        weights file, missing/unexpected keys or shape mismatch.
    """
    m = load_checkpoint_model(folder, device)
    return m.network.eval(), m.config


def load_legacy_state_dict(path: str | os.PathLike) -> dict:
    """Load a legacy ``.pt``/``.pth`` state dict with ``torch.load(weights_only=True)``.

    Raises
    ------
    ModelError
        The file holds anything but tensors and plain containers (no code is executed).
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} refused: not a plain weights file ({type(e).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return obj
