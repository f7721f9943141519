"""Architecture registry: the seed paper's three architectures, built with MONAI.

Spagnolo et al. 2024 (arXiv:2406.09335) compare a 3D U-Net, nnU-Net and Swin UNETR; here each
is built by name for ``in_channels`` inputs (default 2: FLAIR, MPRAGE) and 2 outputs
(background, lesion). Any other ``torch.nn.Module`` mapping ``(B, C_in, X, Y, Z)`` to
``(B, C_out, X, Y, Z)`` logits works with the rest of the package (see :mod:`.module`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelError


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


