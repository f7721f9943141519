"""Instance SmoothGrad: signed, per-modality input gradients of instance targets, averaged
over noisy copies of the input.

``M_T(x) = 1/N Σ_n ∂T/∂x (x + ε_n)``, ``ε_n ~ N(0, σ²)``, ``σ = noise_level · (max − min)``
of the normalised FLAIR channel (Smilkov et al. 2017, "SmoothGrad: removing noise by adding
noise", arXiv:1706.03825, eq. 3; seed paper: Spagnolo et al. 2024, arXiv:2406.09335, Sec. 2.2,
noise_level 0.05, N = 50). Variants: ``"squared"`` = ``1/N Σ (∂T/∂x)²`` (SmoothGrad-Squared,
Hooker et al. 2019) and ``"vargrad"`` = the variance over samples (Adebayo et al. 2018).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..models.base import as_module, members_of
from . import _speed
from ._speed import check_precision, fast_networks, input_format, precision_context
from .base import draw_noise, models_state_guard, noise_sigma, prefetch
from .engine import (SparseMap, WindowPlan, _batches, _is_cropped, cotangent,
                     cotangent_crop, packed_vjps, window_inputs)

VARIANTS = ("mean", "squared", "vargrad")
AGGREGATIONS = ("target", "maxabs")


@dataclass
class InstanceSaliency:
    """Saliency of one target.

    Attributes
    ----------
    name : str or None
        The target's name.
    method : str
        ``"smoothgrad"`` or ``"gradcampp"``.
    maps : dict of str -> SparseMap
        Variant name -> map ``(C, X, Y, Z)`` (SmoothGrad: C = input channels, units logit per
        unit of normalised intensity; Grad-CAM++: C = 1).
    n_windows : int
        Windows the target depends on (sliding mode) or 1.
    """

    name: str | None
    method: str
    maps: dict = field(default_factory=dict)
    n_windows: int = 1
    weights: np.ndarray | None = None


def _as_input(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 4:
        raise ValueError(f"input must be (C, X, Y, Z), got shape {tuple(t.shape)}")
    return t.detach().float()


def _grads_linear(model, plan: WindowPlan, xp: torch.Tensor, targets, active, regions,
                  sw_batch_size: int, pack: bool = True, into: dict | None = None,
                  acc: dict | None = None, scale: float = 1.0, cots: dict | None = None,
                  grad_batch: int = 1, precision: str = "fp32") -> dict:
    """Per target ``t`` in ``active``: ``(S, C, *region_t)`` input gradients for one chunk.

    With ``into`` (target -> ``(C, *region_t)`` tensor), the gradients are instead summed over
    the chunk's samples straight into ``into[t]`` (no per-sample buffers; used when only the
    mean map is wanted) and an empty dict is returned. With ``acc`` (target -> ``(S, C,
    *region_t)``), per-sample gradients are added to it (ensemble members, one after another).
    ``scale`` multiplies the target (an ensemble member's weight). Accumulators live on the
    device of ``xp``; nothing leaves the device here.

    One forward per window batch, shared by all targets. With ``pack`` (default), each
    backward pass carries, for every window row of the batch, the cotangent of a different
    target: the rows of a batch are independent (eval mode), so one vector-Jacobian product
    yields the gradients of several targets at once, and a batch needs as many backward passes
    as the largest number of targets touching one of its windows. ``grad_batch`` > 1 runs that
    many of these backward passes as one (``torch.autograd.grad(..., is_grads_batched=True)``:
    the same values, fewer and larger kernels; for GPUs). ``cots``: ``(t, w) ->``
    :func:`~.engine.cotangent_crop` (built here when not given).
    """
    S, C = xp.shape[:2]
    dev = xp.device
    if into is not None:
        acc = into
    elif acc is None:
        acc = {t: torch.zeros((S, C) + tuple(s.stop - s.start for s in regions[t]), device=dev)
               for t in active}
    needed = {w for t in active for w in plan.target_windows[t]}
    users = {w: [t for t in active if w in plan.target_windows[t]] for w in needed}
    if cots is None:
        cots = {(t, w): cotangent_crop(plan, targets[t], w, dev) for w in needed
                for t in users[w]}
    order = (lambda w: (-len(users[w]), w)) if pack else None
    fmt = input_format(model, dev, xp.ndim)
    for wb in _batches(plan, needed, sw_batch_size, order):
        inp = window_inputs(plan, xp, wb)
        if fmt is not None:
            inp = inp.contiguous(memory_format=fmt)
        inp.requires_grad_(True)
        with torch.enable_grad():
            with precision_context(precision, dev):
                out = model(inp)
            out = out.float()
        if pack:
            rounds = [[(j, w, users[w][r]) for j, w in enumerate(wb) if r < len(users[w])]
                      for r in range(max(len(users[w]) for w in wb))]
        else:
            rounds = [[(j, w, t) for j, w in enumerate(wb) if t in users[w]]
                      for t in sorted({t for w in wb for t in users[w]})]
        for assign, g in packed_vjps(out, inp, rounds, cots, targets, S, grad_batch, scale):
            for j, w, t in assign:
                dst, win_sl = plan.region_part(w, regions[t])
                rows = g[j * S:(j + 1) * S][(slice(None), slice(None)) + win_sl]
                if into is None:
                    acc[t][(slice(None), slice(None)) + dst] += rows
                else:
                    for s_ in rows:  # sample by sample, in order
                        acc[t][(slice(None),) + dst] += s_
        del out, inp
    return {} if into is not None else acc


def _grads_linear_legacy(model, plan: WindowPlan, xp: torch.Tensor, targets, active, regions,
                  sw_batch_size: int, pack: bool = True, into: dict | None = None,
                  acc: dict | None = None, scale: float = 1.0) -> dict:
    """:func:`_grads_linear` as before issue 15 (``_speed.LEGACY``): cotangents rebuilt for
    every round, gradients gathered on the CPU. Per target ``t`` in ``active``: ``(S, C,
    *region_t)`` input gradients for one chunk.

    With ``into`` (target -> ``(C, *region_t)`` tensor), the gradients are instead summed over
    the chunk's samples straight into ``into[t]`` (no per-sample buffers; used when only the
    mean map is wanted) and an empty dict is returned. With ``acc`` (target -> ``(S, C,
    *region_t)``), per-sample gradients are added to it (ensemble members, one after another).
    ``scale`` multiplies the target (an ensemble member's weight).

    One forward per window batch, shared by all targets. With ``pack`` (default), each
    backward pass carries, for every window row of the batch, the cotangent of a different
    target: the rows of a batch are independent (eval mode), so one vector-Jacobian product
    yields the gradients of several targets at once, and a batch needs as many backward passes
    as the largest number of targets touching one of its windows.
    """
    S, C = xp.shape[:2]
    if into is not None:
        acc = into
    elif acc is None:
        acc = {t: torch.zeros((S, C) + tuple(s.stop - s.start for s in regions[t]))
               for t in active}
    needed = {w for t in active for w in plan.target_windows[t]}
    users = {w: [t for t in active if w in plan.target_windows[t]] for w in needed}
    order = (lambda w: (-len(users[w]), w)) if pack else None
    for wb in _batches(plan, needed, sw_batch_size, order):
        inp = window_inputs(plan, xp, wb).requires_grad_(True)
        with torch.enable_grad():
            out = model(inp)
        if pack:
            rounds = [[(j, w, users[w][r]) for j, w in enumerate(wb) if r < len(users[w])]
                      for r in range(max(len(users[w]) for w in wb))]
        else:
            rounds = [[(j, w, t) for j, w in enumerate(wb) if t in users[w]]
                      for t in sorted({t for w in wb for t in users[w]})]
        for i, assign in enumerate(rounds):
            cot = torch.zeros_like(out)
            for j, w, t in assign:
                cot[j * S:(j + 1) * S, targets[t].class_index] = \
                    cotangent(plan, targets[t], w, out.device)
            if scale != 1.0:
                cot = cot * scale
            (g,) = torch.autograd.grad(out, inp, cot, retain_graph=i < len(rounds) - 1)
            for j, w, t in assign:
                dst, win_sl = plan.region_part(w, regions[t])
                rows = g[j * S:(j + 1) * S][(slice(None), slice(None)) + win_sl].detach().cpu()
                if into is None:
                    acc[t][(slice(None), slice(None)) + dst] += rows
                else:
                    for r in rows:  # sample by sample, in order
                        acc[t][(slice(None),) + dst] += r
        del out, inp
    return {} if into is not None else acc


def _grads_maxabs(model, plan: WindowPlan, xp: torch.Tensor, target, t: int, region,
                  sw_batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """Max-abs aggregation for one target: ``(S, C, *region)``.

    For each lesion voxel ``v`` the input gradient of ``logit(v)`` is computed; at each input
    voxel the signed value of largest magnitude over ``v`` is kept (seed paper's code).
    Costs one backward pass per lesion voxel.
    """
    S, C = xp.shape[:2]
    ws = plan.target_windows[t]
    inp = window_inputs(plan, xp, ws).requires_grad_(True)
    with torch.enable_grad():
        with precision_context(precision, xp.device):
            out = model(inp)
        out = out.float()
    best = torch.zeros((S, C) + tuple(s.stop - s.start for s in region), device=xp.device)
    voxels = np.argwhere(target.mask)
    k = target.class_index
    for n, v in enumerate(voxels):
        cot = torch.zeros_like(out)
        for j, w in enumerate(ws):
            start, size = plan.windows[w]
            local = [int(a) + b - st for a, b, st in zip(v, plan.pad_before, start)]
            if all(0 <= c < s for c, s in zip(local, size)):
                cot[(slice(j * S, (j + 1) * S), k) + tuple(local)] = \
                    plan.blend(w, out.device)[tuple(local)]
        (g,) = torch.autograd.grad(out, inp, cot, retain_graph=n < len(voxels) - 1)
        tot = torch.zeros_like(best)
        for j, w in enumerate(ws):
            dst, win_sl = plan.region_part(w, region)
            tot[(slice(None), slice(None)) + dst] += \
                g[j * S:(j + 1) * S][(slice(None), slice(None)) + win_sl].detach()
        best = torch.where(tot.abs() > best.abs(), tot, best)
    return best


def _grads_generic(model, plan: WindowPlan, xp: torch.Tensor, target, t: int, region,
                   sw_batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """Any target on its mask (non-linear, e.g. probability space): assemble the blended logits
    over the mask's bounding box from the target's windows, score, differentiate."""
    S, C = xp.shape[:2]
    ws = plan.target_windows[t]
    bb = target.bbox()
    inp = window_inputs(plan, xp, ws).requires_grad_(True)
    with torch.enable_grad():
        with precision_context(precision, xp.device):
            out = model(inp)
        out = out.float()
        logits = torch.zeros((S, out.shape[1]) + tuple(s.stop - s.start for s in bb),
                             device=out.device)
        for j, w in enumerate(ws):
            img_sl, win_sl = plan.window_image_part(w)
            lo = [max(a.start, b.start) for a, b in zip(img_sl, bb)]
            hi = [min(a.stop, b.stop) for a, b in zip(img_sl, bb)]
            if any(l_ >= h for l_, h in zip(lo, hi)):
                continue
            src = tuple(slice(l_ - a.start + ws_.start, h - a.start + ws_.start)
                        for l_, h, a, ws_ in zip(lo, hi, img_sl, win_sl))
            dst = tuple(slice(l_ - b.start, h - b.start) for l_, h, b in zip(lo, hi, bb))
            blend = plan.blend(w, out.device)[src]
            logits[(slice(None), slice(None)) + dst] = (
                logits[(slice(None), slice(None)) + dst]
                + out[j * S:(j + 1) * S][(slice(None), slice(None)) + src] * blend)
        score = target.crop(bb)(logits).sum()
    (g,) = torch.autograd.grad(score, inp)
    acc = torch.zeros((S, C) + tuple(s.stop - s.start for s in region), device=xp.device)
    for j, w in enumerate(ws):
        dst, win_sl = plan.region_part(w, region)
        acc[(slice(None), slice(None)) + dst] += \
            g[j * S:(j + 1) * S][(slice(None), slice(None)) + win_sl].detach()
    return acc


def smoothgrad(model: torch.nn.Module, x, targets: Sequence, *, mode: str = "sliding",
               roi_size: Sequence[int] = (96, 96, 96), overlap: float = 0.25, grid=None,
               n_samples: int = 50, noise_level: float = 0.05, per_channel_noise: bool = False,
               noise: torch.Tensor | None = None, seed: int = 0, batch_size: int = 1,
               sw_batch_size: int = 4, variants: Sequence[str] = ("mean",),
               aggregation: str = "target", pack: bool = True,
               device: str | torch.device = "cpu", progress: bool = False,
               precision: str = "fp32", grad_batch: int | None = None
               ) -> list[InstanceSaliency]:
    """Instance SmoothGrad for many targets, sharing each noisy forward pass.

    Parameters
    ----------
    model : torch.nn.Module or SegmentationModel
        A network mapping ``(b, C, *window)`` to ``(b, K, *window)`` logits, or a model whose
        members (folds × test-time mirrorings, :mod:`instance_saliency.models`) are averaged
        in logit space: the ensemble target is the weighted sum of the members' targets, so
        its exact gradient is the weighted sum of each member's window-sparse gradient. State
        is restored after the call (:func:`~.base.model_state_guard`); it runs in eval mode.
    x : torch.Tensor or ndarray, shape (C, X, Y, Z)
        Normalised input (not modified).
    targets : sequence of MaskTarget
        One per instance; linear targets (logit space) use the window-sparse path, others a
        per-target path (exact too, but without sharing between targets).
    mode : {"sliding", "patch", "whole"}
        See :mod:`.engine`. ``"sliding"`` is exact with respect to sliding-window inference.
    roi_size, overlap, grid
        Sliding-window parameters (``grid`` overrides them).
    n_samples : int
        Noise samples N (seed paper: 50). With ``noise_level=0`` use 1: the plain gradient.
    noise_level : float
        σ as a fraction of the FLAIR intensity range (seed paper: 0.05).
    per_channel_noise : bool
        Use each channel's own range for σ.
    noise : torch.Tensor, shape (N, C, X, Y, Z), optional
        Explicit noise (overrides ``n_samples``, ``noise_level`` and ``seed``).
    seed : int
        Seed of the noise generator; results do not depend on ``batch_size``.
    batch_size : int
        Noise samples per chunk (memory/speed only; the same maps up to float32 summation
        order, about 1e-7 relative).
    sw_batch_size : int
        Windows per forward pass.
    variants : sequence of {"mean", "squared", "vargrad"}
        Maps to return.
    aggregation : {"target", "maxabs"}
        ``"target"``: gradient of the instance target (default). ``"maxabs"``: per sample,
        at each input voxel the signed gradient of largest magnitude among the per-voxel
        gradients of the instance's logits (seed paper's code; one backward per lesion voxel).
    pack : bool
        Share backward passes between targets on different windows of a batch (exact when the
        model treats batch items independently, as every network in eval mode does; set False
        for a model whose eval-mode output for one item depends on the others).
    device : str or torch.device
        Where the network passes and the accumulation run; the maps stay on it until they
        are returned (as NumPy arrays).
    precision : {"fp32", "bf16", "fp16"}
        Numeric precision of the network passes: ``fp32`` (default; IEEE float32 on every
        device, TF32 switched off on CUDA) or ``torch.autocast`` to bf16/fp16 (faster on GPUs;
        measured error in docs/performance.md). Gradients are accumulated in float32 either
        way.
    grad_batch : int or None
        Backward passes of one window batch run together (``is_grads_batched``): the same
        values with fewer, larger kernels. ``None``: 1 on the CPU (no gain there), 4 on other
        devices.

    Notes
    -----
    For the passes, batch norms are folded into the convolutions before them and one-parameter
    PReLUs are frozen (:func:`~._speed.fast_networks`, undone on return): float32 rounding
    changes, about 1e-7 relative, except where it moves a pre-activation across a PReLU kink,
    which changes the gradient locally (as any change of summation order does: see
    docs/performance.md). Each target's cotangent is built once, not per sample.

    Returns
    -------
    list of InstanceSaliency
        In the order of ``targets``; ``maps[variant]`` is a :class:`~.engine.SparseMap` of shape
        ``(C, X, Y, Z)`` in logit per unit of normalised intensity (squared variants: its square).

    Raises
    ------
    ValueError
        Bad shapes, unknown mode/variant/aggregation/precision, a precision the device does not
        support, empty target masks, ``maxabs`` with a non-linear target.
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown SmoothGrad variant {v!r}; known: {VARIANTS}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: {AGGREGATIONS}")
    check_precision(precision, device)
    legacy = _speed.LEGACY
    x = _as_input(x).to(device)
    dev = x.device
    if grad_batch is None:
        grad_batch = 1 if dev.type == "cpu" else 4
    C, shape = x.shape[0], tuple(x.shape[1:])
    for tg in targets:
        tshape = tuple(getattr(tg, "shape", None) or tg.mask.shape)
        if tshape != shape:
            raise ValueError(f"target mask shape {tshape} != input shape {shape}")
        if aggregation == "maxabs" and not tg.is_linear:
            raise ValueError("maxabs aggregation needs logit-space targets")
    if noise is not None:
        noise = torch.as_tensor(noise).float()
        if noise.ndim != 5 or tuple(noise.shape[1:]) != (C,) + shape:
            raise ValueError(f"noise must be (N, {C}, *{shape}), got {tuple(noise.shape)}")
        n_samples = noise.shape[0]
        noise_iter = (noise[i].to(device) for i in range(n_samples))
    else:
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        sigma = noise_sigma(x, noise_level, per_channel_noise)
        noise_iter = draw_noise((C,) + shape, sigma, n_samples, seed,
                                "cpu" if dev.type != "cpu" and not legacy else device)
        if dev.type != "cpu" and not legacy:  # drawn on the CPU (reproducible), overlapped
            noise_iter = prefetch(noise_iter, dev)
    whole = as_module(model)
    # targets' masks used as their bounding-box crops (never a full-grid mask per target)
    plan = WindowPlan.create((t.mask for t in targets) if legacy else
                             (t if _is_cropped(t) else t.mask for t in targets),
                             shape, mode, roi_size, overlap, grid)
    regions = [plan.target_region(t) for t in range(len(targets))]
    acc_dev = torch.device("cpu") if legacy else dev  # accumulators stay on the device
    sums = [torch.zeros((C,) + tuple(s.stop - s.start for s in r), device=acc_dev)
            for r in regions]
    sqs = [torch.zeros_like(s) for s in sums] if set(variants) - {"mean"} else None
    linear = [t for t, tg in enumerate(targets) if tg.is_linear and aggregation == "target"]
    other = [t for t in range(len(targets)) if t not in linear]
    # each target's cotangent on each of its windows, built once (a crop around the target)
    cots = None if legacy else {(t, w): cotangent_crop(plan, targets[t], w, dev)
                                for t in linear for w in plan.target_windows[t]}
    chunks = range(0, n_samples, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="SmoothGrad", unit="chunk", leave=False)
    # batch norms folded into the convolutions, PReLUs frozen, for the duration of the call
    with models_state_guard(model), fast_networks(model):
        members = members_of(model)
        for c0 in chunks:
            n = min(batch_size, n_samples - c0)
            xs = torch.stack([x + next(noise_iter) for _ in range(n)])
            xp = plan_pad(plan, xs)
            direct = {t: sums[t] for t in linear} if sqs is None else None
            grads: dict = {}
            if linear:
                acc = None if direct is not None else {
                    t: torch.zeros((n, C) + tuple(s.stop - s.start for s in regions[t]),
                                   device=acc_dev)
                    for t in linear}
                for mem in members:  # the ensemble's gradient: weighted sum of the members'
                    if legacy:
                        _grads_linear_legacy(mem.module, plan, xp, targets, linear, regions,
                                             sw_batch_size, pack, direct, acc, mem.weight)
                    else:
                        _grads_linear(mem.module, plan, xp, targets, linear, regions,
                                      sw_batch_size, pack, direct, acc, mem.weight, cots,
                                      grad_batch, precision)
                grads = acc if acc is not None else {}
            for t in other:
                fn = _grads_maxabs if aggregation == "maxabs" else _grads_generic
                grads[t] = fn(whole, plan, xp, targets[t], t, regions[t], sw_batch_size,
                              precision).to(acc_dev)
            for t, g in grads.items():
                for gs in g:  # sample by sample, in order: chunking does not change sums
                    sums[t] += gs
                    if sqs is not None:
                        sqs[t] += gs * gs
            del xs, xp, grads
    results = []
    for t, tg in enumerate(targets):
        # in place, and the sums dropped as each target's maps are made: the returned maps
        # are the only region-sized arrays left (no second copy of every target's sums)
        mean = sums[t].div_(n_samples)
        sums[t] = None
        maps = {}
        for v in variants:
            if v == "mean":
                arr = mean
            elif v == "squared":
                arr = sqs[t] / n_samples
            else:
                arr = (sqs[t] / n_samples - mean * mean).clamp_min(0)
            maps[v] = SparseMap(regions[t], arr.float().cpu().numpy(), shape)
        if sqs is not None:
            sqs[t] = None
        results.append(InstanceSaliency(tg.name, "smoothgrad", maps,
                                        len(plan.target_windows[t])))
    return results


def plan_pad(plan: WindowPlan, xs: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(S, C, *image)`` inputs to the plan's padded shape."""
    from ..inference import pad_to

    return pad_to(xs, plan.padded_shape, plan.pad_before)
