"""Architecture registry and checkpoints (``config.json`` + ``model.safetensors``).

The three architectures of the seed paper (Spagnolo et al. 2024, arXiv:2406.09335), built with
MONAI for 2 input channels (FLAIR, MPRAGE) and 2 output channels (background, lesion). Any other
``torch.nn.Module`` mapping ``(B, C_in, X, Y, Z)`` to ``(B, C_out, X, Y, Z)`` logits works with the
rest of the package. Checkpoints are loaded without unpickling.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from .errors import ModelError
from .io import CHANNELS, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _unet3d(in_channels=2, out_channels=2, channels=(32, 64, 128, 256, 512),
            strides=(2, 2, 2, 2), num_res_units=0, norm="batch", dropout=0.0):
    """MONAI ``UNet`` as in the Shifts MS-WML baseline (batch norm, no residual units)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                channels=tuple(channels), strides=tuple(strides),
                num_res_units=num_res_units, norm=norm, dropout=dropout)


def _nnunet(in_channels=2, out_channels=2, filters=(32, 64, 128, 256, 320),
            strides=(1, 2, 2, 2, 2), kernel_size=3):
    """MONAI ``DynUNet`` configured as an nnU-Net 3D full-resolution net.

    Instance norm (affine), leaky ReLU (slope 0.01, in place), kernel 3 at every level,
    first stride 1 then stride-2 levels, transposed-convolution upsampling, no deep supervision
    at inference.
    """
    from monai.networks.nets import DynUNet

    n = len(strides)
    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=[kernel_size] * n, strides=list(strides),
                   upsample_kernel_size=list(strides[1:]), filters=list(filters)[:n],
                   norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}))


def _swin_unetr(in_channels=2, out_channels=2, feature_size=24, use_v2=False):
    """MONAI ``SwinUNETR`` (input sides must be divisible by 32)."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=in_channels, out_channels=out_channels,
                     feature_size=feature_size, use_v2=use_v2, spatial_dims=3)


#: architecture name -> builder(**arguments) -> nn.Module
ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {
    "unet3d": _unet3d,
    "nnunet": _nnunet,
    "swin_unetr": _swin_unetr,
}

#: default Grad-CAM++ layer per architecture: a decoder level near full resolution
#: (the last decoder level before the full-resolution output block, at 1/2 resolution)
DEFAULT_CAM_LAYER = {
    "unet3d": "model.1.submodule.2",
    "nnunet": "upsamples.2",
    "swin_unetr": "decoder2",
}


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
        Input normalisation (``"zscore_nonzero"``, see :func:`instance_saliency.io.zscore_nonzero`).
    roi_size : list of 3 int
        Sliding-window ROI (patch) size in voxels.
    overlap : float
        Sliding-window overlap fraction.
    threshold : float
        Lesion-probability threshold of the binary mask.
    lesion_class : int
        Output channel of the lesion logit.
    training : dict
        Training summary (command, data, steps, validation figures, time).
    """

    architecture: str
    arguments: dict = field(default_factory=dict)
    channels: list = field(default_factory=lambda: list(CHANNELS))
    normalisation: str = "zscore_nonzero"
    roi_size: list = field(default_factory=lambda: [96, 96, 96])
    overlap: float = 0.25
    threshold: float = 0.5
    lesion_class: int = 1
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
        return cls(**d)


def build_model(architecture: str, **arguments) -> torch.nn.Module:
    """Build an architecture of :data:`ARCHITECTURES` by name.

    Raises
    ------
    ModelError
        Unknown name or arguments the builder does not accept.
    """
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[architecture](**arguments)
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as e:
        msg = " ".join(str(e).split())  # one line (MONAI messages can end in a newline)
        raise ModelError(f"cannot build {architecture} with {arguments}: {msg}") from None


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


def load_checkpoint(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, ModelConfig]:
    """Load a checkpoint folder into an eval-mode model; never unpickles.

    Parameters
    ----------
    folder : path, optional
        Folder with ``config.json`` and ``model.safetensors``; ``None`` = shipped default model.
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else default_model_dir()
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    if not cfg_path.is_file():
        raise ModelError(f"model folder {folder} has no {CONFIG_NAME}")
    if not w_path.is_file():
        raise ModelError(f"model folder {folder} has no {WEIGHTS_NAME}")
    try:
        cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except TypeError as e:
        raise ModelError(f"{cfg_path}: {e}") from None
    try:
        model = build_model(cfg.architecture, **cfg.arguments)
    except ModelError as e:  # name the file that holds the arguments
        raise ModelError(f"{cfg_path}: {e}") from None
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{w_path} is not a valid safetensors file ({e})") from None
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
    return model.to(device).eval(), cfg


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
