"""Speed helpers of the saliency engine: networks prepared for input gradients, numeric
precision, and the private switch to the previous code path.

``LEGACY = True`` runs the code path before issue 15 (no batch-norm folding, Grad-CAM++
activations from a forward pass of its own, cotangents rebuilt for every sample, accumulators
on the CPU). It is kept for ``benchmarks/bench_cpu_speed.py``, which runs both paths side by
side, and for the tests that compare them; it is not part of the API.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator

import torch

#: private switch: the code path before issue 15 (see the module notes)
LEGACY = False
#: private switch: few-channel strided convolutions in the sub-pixel form (benchmarks)
SUBPIXEL = True

#: numeric precisions of the network passes (``explain --precision``)
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
          torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


# ------------------------------------------------------------------------------------------
# batch-norm folding


def _plain_sequential(m: torch.nn.Module) -> bool:
    """A container whose forward is ``nn.Sequential``'s (children applied in order) and that
    has no hooks of its own."""
    return (isinstance(m, torch.nn.Sequential) and type(m).forward is torch.nn.Sequential.forward
            and not _has_hooks(m))


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _leading_norm(m: torch.nn.Module):
    """``(container, name)`` of the batch norm that ``m`` applies first to its input, when
    ``m`` is (a chain of plain sequential containers starting with) a batch norm; else None."""
    if isinstance(m, _NORMS):
        return None  # the caller handles a norm that is itself the next sibling
    if _plain_sequential(m) and len(m):
        name, child = next(iter(m._modules.items()))
        if child is None:
            return None
        if isinstance(child, _NORMS):
            return m, name
        return _leading_norm(child)
    return None


def _foldable(conv: torch.nn.Module, bn: torch.nn.Module) -> bool:
    transposed = isinstance(conv, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                                   torch.nn.ConvTranspose3d))
    out_ch = conv.weight.shape[1] * conv.groups if transposed else conv.weight.shape[0]
    return (not bn.training and bn.track_running_stats and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == out_ch
            and (not transposed or conv.groups == 1) and not _has_hooks(conv)
            and not _has_hooks(bn) and conv.weight.dtype == bn.running_var.dtype)


def _fold_pairs(net: torch.nn.Module, keep: Iterable[str] = ()) -> list:
    """``(sequential, conv name, norm container, norm name)`` of every convolution that is
    directly followed by an eval-mode batch norm in a plain sequential container, except
    convolutions named in ``keep`` (their own outputs must stay as they are)."""
    keep = set(keep)
    names = {id(m): n for n, m in net.named_modules()}
    pairs = []
    for seq in net.modules():
        if not _plain_sequential(seq):
            continue
        items = [(n, c) for n, c in seq._modules.items() if c is not None]
        for (na, a), (nb, b) in zip(items, items[1:]):
            if not isinstance(a, _CONVS) or names.get(id(a)) in keep:
                continue
            loc = (seq, nb) if isinstance(b, _NORMS) else _leading_norm(b)
            if loc is not None and _foldable(a, getattr(loc[0], loc[1])):
                pairs.append((seq, na, loc[0], loc[1]))
    return pairs


def _folded_params(conv: torch.nn.Module, bn: torch.nn.Module):
    """Weight and bias of ``conv`` followed by ``bn`` (eval mode) as one convolution:
    ``W · s`` and ``b · s + β − μ s`` with ``s = γ / √(σ² + ε)`` per output channel, computed
    in float64 and stored in the weights' dtype."""
    with torch.no_grad():
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        scale = inv * bn.weight.double() if bn.weight is not None else inv
        shift = (bn.bias.double() if bn.bias is not None else 0.0) \
            - bn.running_mean.double() * scale
        transposed = isinstance(conv, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                                       torch.nn.ConvTranspose3d))
        w = conv.weight.double()
        shape = [1] * w.ndim
        shape[1 if transposed else 0] = -1
        weight = (w * scale.reshape(shape)).to(conv.weight.dtype)
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        bias = (b * scale + shift).to(conv.weight.dtype)
    return (torch.nn.Parameter(weight, requires_grad=False),
            torch.nn.Parameter(bias, requires_grad=False))


class FrozenPReLU(torch.nn.Module):
    """A single-parameter ``nn.PReLU`` with its slope fixed, as ``F.leaky_relu``: the same
    values and input gradients bit for bit (``x if x > 0 else a·x``; gradient ``1`` or
    ``a``), but its backward pass does not compute the slope's gradient, which
    ``nn.PReLU``'s always does (measured: 6× faster backward on a 16×48³ activation)."""

    def __init__(self, slope: float):
        super().__init__()
        self.slope = float(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.leaky_relu(x, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


def _frozen_prelus(net: torch.nn.Module) -> list:
    """``(parent, name, prelu)`` of every single-parameter PReLU without hooks."""
    out = []
    for parent in net.modules():
        for name, child in parent._modules.items():
            if (isinstance(child, torch.nn.PReLU) and child.weight.numel() == 1
                    and not _has_hooks(child)):
                out.append((parent, name, child))
    return out


# ------------------------------------------------------------------------------------------
# sub-pixel transposed convolutions (few-channel ends of a 3D U-Net)

#: largest channel count at which the sub-pixel form is used (measured on the 2-core CPU,
#: batch 4, channels-last, 48³ → 96³: 32 → 2 channels 94 → 35 ms, 16 → 2 channels 53 →
#: 22 ms; at 64 → 16 channels the direct kernel is faster, 23 against 58 ms)
SUBPIXEL_MAX_CHANNELS = 4


def _subpixel_taps(k: int, s: int, p: int) -> tuple[int, dict]:
    """Per axis: ``(left, taps)`` of the sub-pixel form of a transposed convolution (kernel
    ``k``, stride ``s``, padding ``p``): output ``s·m + r`` is ``Σ_j x[m − left + j] ·
    w[taps[r, j]]`` (derived from ``o = s·i − p + k``)."""
    pairs = {(r, d): s * d + r + p for r in range(s) for d in range(-k, k + 1)
             if 0 <= s * d + r + p < k}
    left = max(d for _, d in pairs)
    return left, {(r, left - d): kk for (r, d), kk in pairs.items()}


def subpixel_plan(weight_shape, stride, padding, output_padding, in_size) -> dict | None:
    """How :func:`conv_transpose3d_subpixel` computes a 3D transposed convolution, or None
    when it cannot (each axis must give ``stride`` outputs per input position: output length
    a multiple of the stride)."""
    k = weight_shape[2:]
    if len(k) != 3 or len(set(k)) != 1 or len(set(stride)) != 1 or len(set(padding)) != 1:
        return None
    k, s, p = k[0], stride[0], padding[0]
    out = [(n - 1) * s - 2 * p + k + op for n, op in zip(in_size, output_padding)]
    if any(o % s or o <= 0 for o in out):
        return None
    left, taps = _subpixel_taps(k, s, p)
    width = max(j for _, j in taps) + 1
    return {"k": k, "s": s, "left": left, "taps": taps, "width": width,
            "m": [o // s for o in out]}


def subpixel_weight(weight: torch.Tensor, plan: dict) -> torch.Tensor:
    """Weight ``(s³·C_out, C_in, T, T, T)`` of the ordinary convolution of the sub-pixel form
    (output channels ordered phase-major), from a transposed convolution's weight
    ``(C_in, C_out, k, k, k)``; taps that no phase uses are zero."""
    s, t, taps = plan["s"], plan["width"], plan["taps"]
    c_in, c_out = weight.shape[:2]
    v = weight.new_zeros((s, s, s, c_out, c_in, t, t, t))
    w = weight.detach().transpose(0, 1)
    for (r0, j0), k0 in taps.items():
        for (r1, j1), k1 in taps.items():
            for (r2, j2), k2 in taps.items():
                v[r0, r1, r2, :, :, j0, j1, j2] = w[:, :, k0, k1, k2]
    return v.reshape(s ** 3 * c_out, c_in, t, t, t)


def conv_transpose3d_subpixel(x: torch.Tensor, v: torch.Tensor, bias, plan: dict,
                              c_out: int) -> torch.Tensor:
    """``F.conv_transpose3d`` (groups 1, dilation 1) as one ordinary convolution with
    ``s³·C_out`` output channels followed by a pixel shuffle (Shi et al. 2016, "Real-time
    single image and video super-resolution using an efficient sub-pixel convolutional neural
    network", CVPR): the same sums in another order (float32 rounding, about 5e-7 relative).
    oneDNN's transposed 3D convolution is slow when one side has few channels; its ordinary
    convolution is not. Output in channels-last memory, ``(B, C_out, s·m, s·m, s·m)``."""
    s, m, t, left = plan["s"], plan["m"], plan["width"], plan["left"]
    pad = max(left, max(mi - 1 - left + t - 1 - (n - 1) for mi, n in zip(m, x.shape[2:])), 0)
    y = torch.nn.functional.conv3d(x, v, None, 1, pad)
    y = y[(slice(None), slice(None)) + tuple(slice(pad - left, pad - left + mi) for mi in m)]
    b = x.shape[0]
    # (B, m, m, m, [phase, phase, phase, C_out]) -> (B, m, s, m, s, m, s, C_out): the memory
    # order of a channels-last output (reshape and permute only, so that it also runs under
    # the vmap of batched gradients)
    out = y.permute(0, 2, 3, 4, 1).reshape(b, *m, s, s, s, c_out) \
        .permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, *(s * mi for mi in m), c_out) \
        .permute(0, 4, 1, 2, 3)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


class _SubpixelUp(torch.autograd.Function):
    """Transposed convolution: sub-pixel forward; backward = its adjoint, the ordinary
    strided convolution (what autograd runs for ``conv_transpose3d`` too). Input gradient
    only (the weights are constants here)."""

    @staticmethod
    def forward(ctx, x, mod, v, plan):
        ctx.mod = mod
        return conv_transpose3d_subpixel(x, v, mod.bias, plan, mod.out_channels)

    @staticmethod
    def backward(ctx, g):
        mod = ctx.mod
        return (torch.nn.functional.conv3d(g, mod.weight, None, mod.stride, mod.padding),
                None, None, None)


class _SubpixelGradConv(torch.autograd.Function):
    """Strided convolution: the ordinary forward; its input gradient (a transposed
    convolution) in the sub-pixel form."""

    @staticmethod
    def forward(ctx, x, runner):
        mod = runner.mod
        ctx.runner, ctx.in_size = runner, tuple(x.shape[2:])
        return torch.nn.functional.conv3d(x, mod.weight, mod.bias, mod.stride, mod.padding)

    @staticmethod
    def backward(ctx, g):
        mod = ctx.runner.mod
        op = [n - ((o - 1) * s - 2 * p + k) for n, o, s, p, k in
              zip(ctx.in_size, g.shape[2:], mod.stride, mod.padding, mod.kernel_size)]
        plan = subpixel_plan(mod.weight.shape, mod.stride, mod.padding, op, g.shape[2:])
        if plan is None or any(not 0 <= o < s for o, s in zip(op, mod.stride)):
            return torch.nn.grad.conv3d_input((g.shape[0], mod.in_channels) + ctx.in_size,
                                              mod.weight, g, mod.stride, mod.padding), None
        v = ctx.runner.weight_for(plan, g.dtype)
        return conv_transpose3d_subpixel(g, v, None, plan, mod.in_channels), None


class _SubpixelRunner(torch.nn.Module):
    """Holds the original convolution (as ``mod``) and its sub-pixel weights, computed once
    per shape of the form and dtype."""

    def __init__(self, mod: torch.nn.Module):
        super().__init__()
        self.mod = mod
        self._v: dict = {}

    def weight_for(self, plan: dict, dtype) -> torch.Tensor:
        key = (plan["width"], dtype)
        if key not in self._v:
            self._v[key] = subpixel_weight(self.mod.weight.to(dtype), plan).contiguous(
                memory_format=torch.channels_last_3d)
        return self._v[key]


class SubpixelConvTranspose3d(_SubpixelRunner):
    """An ``nn.ConvTranspose3d`` with few output channels (a U-Net's last layer), run in the
    sub-pixel form for input gradients (:func:`conv_transpose3d_subpixel`); the original
    module otherwise (weights that need gradients, shapes the form does not cover, GPUs)."""

    def forward(self, x):
        m = self.mod
        plan = subpixel_plan(m.weight.shape, m.stride, m.padding, m.output_padding, x.shape[2:])
        if plan is None or m.weight.requires_grad or x.device.type != "cpu":
            return m(x)
        return _SubpixelUp.apply(x, m, self.weight_for(plan, x.dtype), plan)


class SubpixelGradConv3d(_SubpixelRunner):
    """A strided ``nn.Conv3d`` with few input channels (a U-Net's first layer): the same
    forward; its input gradient in the sub-pixel form (:class:`_SubpixelGradConv`)."""

    def forward(self, x):
        m = self.mod
        if m.weight.requires_grad or x.device.type != "cpu" or not x.requires_grad:
            return m(x)
        return _SubpixelGradConv.apply(x, self)


def _subpixel_sites(net: torch.nn.Module, keep: Iterable[str] = ()) -> list:
    """``(parent, name, replacement class)`` of the few-channel strided 3D convolutions."""
    keep = set(keep)
    names = {id(m): n for n, m in net.named_modules()}
    out = []
    for parent in net.modules():
        for name, c in parent._modules.items():
            if not isinstance(c, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) \
                    or names.get(id(c)) in keep or _has_hooks(c):
                continue
            if c.groups != 1 or any(d != 1 for d in c.dilation) or c.padding_mode != "zeros" \
                    or max(c.stride) == 1:
                continue
            if isinstance(c, torch.nn.ConvTranspose3d):
                if c.out_channels <= SUBPIXEL_MAX_CHANNELS:
                    out.append((parent, name, SubpixelConvTranspose3d))
            elif type(c) is torch.nn.Conv3d and isinstance(c.padding, tuple) \
                    and c.in_channels <= SUBPIXEL_MAX_CHANNELS:
                out.append((parent, name, SubpixelGradConv3d))
    return out


def _apply_subpixel(net: torch.nn.Module, keep: Iterable[str] = ()) -> list:
    """Swap few-channel strided convolutions for their sub-pixel runners; return the undo
    list."""
    undo = []
    for parent, name, cls in _subpixel_sites(net, keep):
        mod = parent._modules[name]
        undo.append((None, None, None, parent, name, mod))
        parent._modules[name] = cls(mod)
    return undo


def _apply_folds(net: torch.nn.Module, keep: Iterable[str] = ()) -> list:
    """Fold in place; return what :func:`_undo_folds` needs to put the originals back (the
    original parameter and module objects themselves, untouched)."""
    undo, seen = [], set()
    for seq, conv_name, bn_parent, bn_name in _fold_pairs(net, keep):
        conv, bn = getattr(seq, conv_name), getattr(bn_parent, bn_name)
        if id(conv) in seen or id(bn) in seen:  # a module used twice: leave it
            continue
        seen.update((id(conv), id(bn)))
        weight, bias = _folded_params(conv, bn)
        undo.append((conv, conv._parameters["weight"], conv._parameters.get("bias"), bn_parent,
                     bn_name, bn))
        conv._parameters["weight"] = weight
        conv._parameters["bias"] = bias
        bn_parent._modules[bn_name] = torch.nn.Identity()
    return undo


def _apply_prelus(net: torch.nn.Module) -> list:
    """Swap single-parameter PReLUs for :class:`FrozenPReLU` in place; return the undo list."""
    undo = []
    for parent, name, prelu in _frozen_prelus(net):
        undo.append((None, None, None, parent, name, prelu))
        parent._modules[name] = FrozenPReLU(prelu.weight.detach().reshape(()).item())
    return undo


def _undo_folds(undo: list) -> None:
    for conv, weight, bias, parent, name, module in reversed(undo):
        if conv is not None:
            conv._parameters["weight"] = weight
            conv._parameters["bias"] = bias
        parent._modules[name] = module


def fold_batchnorm(net: torch.nn.Module, keep: Iterable[str] = ()) -> torch.nn.Module:
    """A copy of ``net`` with every eval-mode batch norm folded into the convolution before it.

    In eval mode a batch norm is a fixed per-channel affine map, ``y = (x − μ) γ / √(σ² + ε) +
    β``; after a convolution (or transposed convolution) it is folded into that convolution's
    weights and bias (computed in float64, stored in the weights' dtype) and replaced by
    ``nn.Identity``, so neither its forward nor its backward pass runs. The result equals the
    original up to float32 rounding (measured on the shipped model: 4e-7 relative on the
    logits, 2e-7 on input gradients). Module names are kept, so a layer looked up by name
    (Grad-CAM++) is still found; its output is unchanged unless the layer *is* a folded
    convolution, which ``keep`` excludes. The saliency methods fold for the duration of a call
    only (:func:`fast_networks`).

    Only pairs whose order of execution is certain are folded: a convolution and the next
    child of an ``nn.Sequential`` (or of a subclass that keeps its ``forward``, as MONAI's
    ``Convolution`` and ``ADN``) that starts with the batch norm, without hooks on either.

    Parameters
    ----------
    net : torch.nn.Module
        In eval mode (batch norms in training mode are left alone).
    keep : iterable of str
        Module names (``net.named_modules()``) whose outputs must not change.

    Returns
    -------
    torch.nn.Module
        ``net`` itself when nothing can be folded, else a folded deep copy (folded parameters
        without gradients). ``net`` is not modified.
    """
    keep = tuple(keep)
    if not _fold_pairs(net, keep):
        return net
    new = copy.deepcopy(net)
    _apply_folds(new, keep)
    return new


@contextlib.contextmanager
def fast_networks(model, keep: Iterable[str] = ()) -> Iterator[None]:
    """Inside the block, every distinct network of ``model`` (a torch module or a
    :class:`~instance_saliency.models.SegmentationModel`) runs faster for input gradients,
    in place:

    * eval-mode batch norms are folded into the convolutions before them (see
      :func:`fold_batchnorm`; float32 rounding changes, about 1e-7 relative): the folded
      weights are new parameters put in the original parameters' slots, and each batch norm's
      slot holds an ``nn.Identity``;
    * single-parameter ``nn.PReLU`` modules are replaced by :class:`FrozenPReLU` (the same
      values and gradients bit for bit; no gradient of the slope is computed);
    * strided 3D convolutions with at most :data:`SUBPIXEL_MAX_CHANNELS` channels on their
      narrow side (a U-Net's first layer and last transposed layer) compute their transposed
      convolution — the last layer's forward, the first layer's input gradient — in the
      sub-pixel form on the CPU (:func:`conv_transpose3d_subpixel`; float32 rounding, about
      5e-7 relative; no pre-activation before a non-linearity changes).

    On exit, also after an exception, the original parameter and module objects are put
    back (their values were never changed). Does nothing under ``LEGACY``. Use inside
    :func:`~.base.models_state_guard` (which sets eval mode first).
    """
    from ..models.base import distinct_networks, members_of

    undo: list = []
    try:
        if not LEGACY:
            keep = tuple(keep)
            for net in distinct_networks(members_of(model)):
                undo += _apply_folds(net, keep)
                undo += _apply_prelus(net)
                if SUBPIXEL:
                    undo += _apply_subpixel(net, keep)
        yield
    finally:
        _undo_folds(undo)


# ------------------------------------------------------------------------------------------
# memory format


def _channels_last_types() -> tuple:
    """Module classes whose forward is known to use only layout-agnostic torch operations
    (built-in layers, MONAI's UNet blocks, the package's wrappers). Exact classes: a subclass
    may override ``forward``."""
    types = [torch.nn.Sequential, torch.nn.ModuleList, torch.nn.Identity, *_CONVS, *_NORMS,
             torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
             torch.nn.GroupNorm, torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.PReLU,
             torch.nn.ELU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Sigmoid, torch.nn.Tanh,
             torch.nn.Dropout, torch.nn.Dropout3d, torch.nn.MaxPool3d, torch.nn.AvgPool3d,
             FrozenPReLU, SubpixelConvTranspose3d, SubpixelGradConv3d]
    try:
        from monai.networks.blocks import ADN, Convolution
        from monai.networks.layers.simplelayers import SkipConnection
        from monai.networks.nets import UNet

        types += [ADN, Convolution, SkipConnection, UNet]
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    from ..models.base import Mirrored

    types.append(Mirrored)
    return tuple(types)


def input_format(module: torch.nn.Module, device, ndim: int = 5):
    """Memory format for the saliency passes' inputs: ``torch.channels_last_3d`` on the CPU
    for a 3D network built only from layers known to handle any layout (:func:`_channels_last_types`:
    torch's layers and MONAI's UNet blocks), else ``None`` (contiguous, as given).

    oneDNN's 3D convolutions run faster on channels-last data, forward and backward alike
    (measured on the shipped model, one 96³ window pair: forward 238 → 157 ms, three
    backward passes 568 → 448 ms on one thread), and the format propagates through the
    network from its input. The values change by float32 summation order only (2e-7 relative
    on input gradients). Other modules are left alone: a ``view`` or an extension reading raw
    memory could fail or misread non-contiguous data. Not used on GPUs (untested there) nor
    under ``LEGACY``.
    """
    if LEGACY or ndim != 5 or torch.device(device).type != "cpu":
        return None
    allowed = _channels_last_types()
    if all(type(m) in allowed for m in module.modules()):
        return torch.channels_last_3d
    return None


# ------------------------------------------------------------------------------------------
# precision


def check_precision(precision: str, device) -> None:
    """Refuse a precision this device cannot run, with a one-line ``ValueError``.

    Raises
    ------
    ValueError
        Unknown precision, or bf16/fp16 not supported on ``device`` (a CUDA GPU without bf16;
        a CPU without the instructions oneDNN needs for them).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision bf16 is not supported by this GPU "
                             f"({torch.cuda.get_device_name(dev)}); use fp16 or fp32")
        return
    if dev.type == "cpu":
        probe = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[precision]
        try:
            ok = bool(probe())
        except (AttributeError, RuntimeError):
            ok = False
        if not ok:
            raise ValueError(f"precision {precision} is not supported on this CPU (oneDNN "
                             f"needs AVX-512 or AMX for it); use fp32")
        return
    raise ValueError(f"precision {precision} is only available on cpu and cuda devices, "
                     f"not {dev.type}")


@contextlib.contextmanager
def precision_context(precision: str, device) -> Iterator[None]:
    """Network passes at ``precision`` inside the block.

    bf16/fp16: ``torch.autocast``. fp32 on CUDA: TF32 is switched off for convolutions and
    matrix products (cuDNN uses TF32 for float32 convolutions by default, about 1e-3 relative
    error), so fp32 means IEEE float32 on every device. On CUDA, cuDNN's autotuner
    (``torch.backends.cudnn.benchmark``) is on inside the block (the window shapes repeat).
    The settings are restored on exit.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        if precision in _DTYPES:
            with torch.autocast(device_type=dev.type, dtype=_DTYPES[precision]):
                yield
        else:
            yield
        return
    saved = [(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)]
    try:
        torch.backends.cudnn.benchmark = True
        if precision not in _DTYPES:
            new_api = False
            for owner in (torch.backends.cudnn.conv, torch.backends.cuda.matmul):
                if hasattr(owner, "fp32_precision"):
                    new_api = True
                    saved.append((owner, "fp32_precision", owner.fp32_precision))
                    owner.fp32_precision = "ieee"
            if not new_api:  # older torch
                for owner in (torch.backends.cudnn, torch.backends.cuda.matmul):
                    saved.append((owner, "allow_tf32", owner.allow_tf32))
                    owner.allow_tf32 = False
            yield
        else:
            with torch.autocast(device_type=dev.type, dtype=_DTYPES[precision]):
                yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
