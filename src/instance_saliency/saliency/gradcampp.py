"""Instance Grad-CAM++: class-activation maps of an instance target at a chosen layer.

Grad-CAM++ (Chattopadhay et al. 2018, "Grad-CAM++: Improved Visual Explanations for Deep
Convolutional Networks", WACV, eqs. 19–20) with the instance target ``T`` as the score. With
``g = ∂T/∂A`` at the layer's activations ``A`` (channels ``k``, positions ``i``):

``α_ki = g_ki² / (2 g_ki² + Σ_j A_kj · g_ki³)``   (0 where ``g_ki = 0``),
``w_k  = Σ_i α_ki · ReLU(g_ki)``,
``L    = ReLU(Σ_k w_k A_k)`` upsampled (trilinear) to the input grid.

The original derivation uses ``Y = exp(T)``; the factor ``exp(T)`` cancels in ``α`` and only
scales ``w`` globally, so it is dropped here: large lesions (large summed logits) cannot
overflow, and maps of different instances stay comparable. Sums over positions run over every
spatial axis (2D and 3D alike).

Sliding-window mode: the layer's activations exist per window. The windows that touch the
instance are treated as one activation map: ``Σ_j`` and ``Σ_i`` run over all their positions;
each window's map ``L_w = ReLU(Σ_k w_k A_k)`` is upsampled to the window and blended with the
Gaussian importance of those windows only, ``L(v) = Σ_w imp_w(v) L_w(v) / Σ_w imp_w(v)``. The
ReLU comes before upsampling, as in the formula above (and in MONAI's and pytorch-grad-cam's
CAMs); the optional signed map is the same construction without the ReLU.

Instance HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful
explanations of convolutional neural networks", arXiv:2011.08891, eq. 3) uses the same base:
``L = ReLU(Σ_k g_k ⊙ A_k)`` — the element-wise product of gradient and activation, summed over
channels, with no spatial averaging of the gradient, so each position keeps its own gradient
and the map stays where the target's gradient flows (:func:`hirescam`). Its sliding-window
construction is Grad-CAM++'s: each window's map is computed from that window's own gradients
and activations, upsampled and blended.

Ensembles (folds × test-time mirrorings, :mod:`instance_saliency.models`): each member's map is
computed at the layer of its own network (a mirrored member's map flipped back to the input's
orientation) and the maps are averaged with the members' weights — the natural extension, since
Grad-CAM++ is not linear in the network; the returned channel weights are the weighted mean of
the members' weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.base import members_of
from . import _speed
from ._speed import check_precision, fast_networks, input_format, precision_context
from .base import capture_activations, models_state_guard, resolve_layer
from .engine import (SparseMap, WindowPlan, _batches, _is_cropped, cotangent,
                     cotangent_crop, packed_vjps, window_inputs)
from .smoothgrad import InstanceSaliency, _as_input, plan_pad


def _weight_terms(gradients: torch.Tensor, sum_a: torch.Tensor) -> torch.Tensor:
    """``Σ_i α_ki ReLU(g_ki)`` over the positions of one piece, given ``Σ_j A_kj`` (K,).

    ``gradients``: ``(K, *spatial)``. Summing these terms over pieces (windows) gives the
    weights of :func:`gradcampp_weights`.
    """
    K = gradients.shape[0]
    g = gradients.reshape(K, -1).double()
    g2 = g * g
    denom = 2 * g2 + sum_a.double().reshape(K, 1) * g2 * g
    alpha = torch.where((g != 0) & (denom != 0), g2 / torch.where(denom != 0, denom, 1.0),
                        torch.zeros_like(g))
    return (alpha * F.relu(g)).sum(1)


def gradcampp_weights(activations: torch.Tensor, gradients: torch.Tensor,
                      eps: float = 0.0) -> torch.Tensor:
    """Grad-CAM++ channel weights without the ``exp(T)`` factor.

    Parameters
    ----------
    activations, gradients : torch.Tensor, shape (N, K, *spatial)
        ``A`` and ``∂T/∂A``. The ``N`` pieces (windows) are pooled as one map.

    Returns
    -------
    torch.Tensor, shape (K,)
        ``w_k = Σ α_ki ReLU(g_ki)`` (Chattopadhay et al. 2018, eqs. 19–20).
    """
    K = activations.shape[1]
    sum_a = activations.transpose(0, 1).reshape(K, -1).double().sum(1)
    return sum(_weight_terms(g, sum_a) for g in gradients).float()


def _upsample(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear/bilinear upsampling of ``(N, *spatial)`` maps to ``size``."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    if tuple(cam.shape[1:]) == tuple(size):
        return cam
    return F.interpolate(cam[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]


def hirescam(model: torch.nn.Module, x, targets: Sequence, layer: str, **kwargs
             ) -> list[InstanceSaliency]:
    """Instance HiResCAM (Draelos & Carin 2020, eq. 3): ``ReLU(Σ_k g_k ⊙ A_k)`` per window,
    upsampled and blended as in :func:`gradcampp`.

    Parameters and returns as :func:`gradcampp` (same keyword arguments); the method name of
    the results is ``"hirescam"`` and ``InstanceSaliency.weights`` holds each channel's
    contribution ``Σ_i g_ki A_ki`` summed over the target's windows.
    """
    return gradcampp(model, x, targets, layer, _variant="hirescam", **kwargs)


def gradcampp(model: torch.nn.Module, x, targets: Sequence, layer: str, *,
              mode: str = "sliding", roi_size: Sequence[int] = (96, 96, 96),
              overlap: float = 0.25, grid=None, sw_batch_size: int = 4,
              signed: bool = False, device: str | torch.device = "cpu",
              progress: bool = False, precision: str = "fp32", grad_batch: int | None = None,
              layer_sums: Sequence | None = None, _variant: str = "gradcampp"
              ) -> list[InstanceSaliency]:
    """Instance Grad-CAM++ for many targets, sharing each window's forward pass.

    Parameters
    ----------
    model : torch.nn.Module or SegmentationModel
        Segmentation network, or a model with several members (see the module notes); state
        restored afterwards; run in eval mode.
    x : torch.Tensor or ndarray, shape (C, X, Y, Z)
        Normalised input.
    targets : sequence of MaskTarget
        Logit-space (linear) targets.
    layer : str
        Module name of the layer (``dict(model.named_modules())`` key); see
        :data:`instance_saliency.models.DEFAULT_CAM_LAYER` for each architecture's default.
    mode, roi_size, overlap, grid, sw_batch_size
        As in :func:`~.smoothgrad.smoothgrad`.
    signed : bool
        Also return the map built without the ReLU (``maps["signed"]``; upsampling is linear
        and blending convex, so ``raw >= ReLU(signed)``, equal where no zero crossing is
        interpolated).
    device, precision, grad_batch
        As in :func:`~.smoothgrad.smoothgrad` (activations, gradients and maps stay on the
        device until the maps are returned).
    layer_sums : sequence of dict, optional
        One per member of ``model`` (in order): window index -> ``Σ_j A_kj``, the layer's
        activations summed over the window, ``(K,)`` float64, from a forward pass that has
        already run on these windows (the prediction; :func:`record_layer_sums`). They spare
        the pass without gradients; missing or ``None``: that pass runs.

    Returns
    -------
    list of InstanceSaliency
        ``maps["raw"]``: ``(1, X, Y, Z)`` map after ReLU, not normalised (units: activation ×
        weight); ``maps["signed"]`` when requested. The channel weights ``(K,)`` are in
        ``InstanceSaliency.weights`` (see :func:`gradcampp_weights`).

    Notes
    -----
    Two passes over the windows: ``Σ_j A_kj`` over each target's windows first (a pass
    without gradients, unless ``layer_sums`` gives them), then activations and gradients at
    the layer, whose per-window share of the weights is added at once, so no gradient tensor
    is kept: memory stays at the activations of the needed windows whatever the number of
    targets. Batch norms are folded and PReLUs frozen for the passes (as in
    :func:`~.smoothgrad.smoothgrad`; nothing is folded into the layer itself).

    Raises
    ------
    ValueError
        Unknown layer, non-linear target, bad shapes, unknown or unsupported precision,
        ``layer_sums`` not one per member.
    """
    check_precision(precision, device)
    legacy = _speed.LEGACY
    x = _as_input(x).to(device)
    dev = x.device
    if grad_batch is None:
        grad_batch = 1 if dev.type == "cpu" else 4
    shape = tuple(x.shape[1:])
    for tg in targets:
        if not tg.is_linear:
            raise ValueError("Grad-CAM++ needs logit-space (linear) targets")
        tshape = tuple(getattr(tg, "shape", None) or tg.mask.shape)
        if tshape != shape:
            raise ValueError(f"target mask shape {tshape} != input shape {shape}")
    members = members_of(model)
    for mem in members:
        resolve_layer(mem.net, layer)  # ValueError before any work
    if layer_sums is not None and len(layer_sums) != len(members):
        raise ValueError(f"layer_sums has {len(layer_sums)} entries for {len(members)} members")
    if legacy:
        layer_sums = None
    # targets' masks used as their bounding-box crops (never a full-grid mask per target)
    plan = WindowPlan.create((t.mask for t in targets) if legacy else
                             (t if _is_cropped(t) else t.mask for t in targets),
                             shape, mode, roi_size, overlap, grid)
    xp = plan_pad(plan, x[None])
    nt = len(targets)
    regions = [plan.target_region(t) for t in range(nt)]
    # Per target, the member maps are built one target at a time (float64) and added into
    # that target's accumulator: float32 for a single member (the float64 map cast once, as
    # before), float64 across several members. Nothing else of region size is held, so the
    # peak is the returned maps plus one target's temporaries (issue 14: 5.9 GB -> ~1.5 GB
    # on the demo scan).
    acc_dtype = torch.float32 if len(members) == 1 else torch.float64
    raw: list = [None] * nt
    sgn: list = [None] * nt
    weights: list = [None] * nt
    cots = None if legacy else {(t, w): cotangent_crop(plan, targets[t], w, dev)
                                for t in range(nt) for w in plan.target_windows[t]}
    imp_cache: dict = {}
    # batch norms folded (except into the layer itself), PReLUs frozen, during the call
    with models_state_guard(model), fast_networks(model, keep=(layer,)):
        for i, mem in enumerate(members):
            if legacy:
                acts, w_m, hires = _cam_member_legacy(mem, layer, plan, xp, targets,
                                                      sw_batch_size,
                                                      progress and len(members) == 1, _variant)
            else:
                acts, w_m, hires = _cam_member(mem, layer, plan, xp, targets, sw_batch_size,
                                               progress and len(members) == 1, _variant,
                                               layer_sums[i] if layer_sums else None, cots,
                                               precision, grad_batch)
            for t in range(nt):
                if legacy:
                    r_t, s_t = _cam_target_maps_legacy(mem, plan, acts, w_m[t], t, regions[t],
                                                       signed, hires)
                else:
                    r_t, s_t = _cam_target_maps(mem, plan, acts, w_m[t], t, regions[t],
                                                signed, hires, imp_cache)
                for store, m_t in ((raw, r_t), (sgn, s_t)):
                    if m_t is None:
                        continue
                    m_t = (mem.weight * m_t).to(acc_dtype) if mem.weight != 1 else \
                        m_t.to(acc_dtype)
                    store[t] = m_t if store[t] is None else store[t] + m_t
                del r_t, s_t
                wt = mem.weight * w_m[t].double()
                weights[t] = wt if weights[t] is None else weights[t] + wt
            del acts, hires
    results = []
    for t, tg in enumerate(targets):
        maps = {"raw": SparseMap(regions[t], raw[t].float()[None].cpu().numpy(), shape)}
        raw[t] = None
        if signed:
            maps["signed"] = SparseMap(regions[t], sgn[t].float()[None].cpu().numpy(), shape)
            sgn[t] = None
        results.append(InstanceSaliency(tg.name, _variant, maps, len(plan.target_windows[t]),
                                        weights[t].float().cpu().numpy()))
    return results


class LayerSums:
    """Per-window sums of a layer's activations recorded during sliding-window passes
    (:func:`record_layer_sums`)."""

    def __init__(self, n_members: int):
        self.n_members = int(n_members)
        self.calls: list = []  # per layer call, in order: (B, K) float64

    def per_member(self, n_windows: int, sw_batch_size: int) -> list | None:
        """The sums as :func:`gradcampp`'s ``layer_sums``: one dict per member, window index
        -> ``(K,)`` float64, for passes over windows ``0 .. n_windows − 1`` in batches of
        ``sw_batch_size`` (as :func:`~instance_saliency.inference.sliding_window_logits` runs
        them), each batch through every member in order. None when the recorded calls do not
        match that order (then :func:`gradcampp` computes the sums itself)."""
        sizes = [min(sw_batch_size, n_windows - w0) for w0 in range(0, n_windows, sw_batch_size)]
        if len(self.calls) != len(sizes) * self.n_members:
            return None
        out: list = [{} for _ in range(self.n_members)]
        i = 0
        for b, w0 in zip(sizes, range(0, n_windows, sw_batch_size)):
            for m in range(self.n_members):
                c = self.calls[i]
                i += 1
                if c.shape[0] != b:
                    return None
                for j in range(b):
                    out[m][w0 + j] = c[j].clone()  # a normal tensor (not an inference tensor)
        return out


@contextlib.contextmanager
def record_layer_sums(model, layer: str) -> Iterator[LayerSums]:
    """Record ``Σ_j A_kj`` of ``layer`` (each window's activations summed over positions, per
    channel, float64) on every forward pass of ``model``'s networks inside the block.

    Used around the prediction of ``explain``: Grad-CAM++ needs these sums before its
    backward passes, and the prediction has just run every window through every member, so
    :func:`gradcampp` (``layer_sums=``) skips its own pass without gradients. The sums are
    the same for a mirrored member (a sum over all positions does not see the flip). Costs
    ``K`` numbers per window; the hooks are removed on exit.

    Raises
    ------
    ValueError
        No such layer.
    """
    from ..models.base import distinct_networks

    members = members_of(model)
    rec = LayerSums(len(members))

    def hook(_mod, _inp, out):
        if isinstance(out, torch.Tensor):
            a = out.detach().float()
            rec.calls.append(a.reshape(a.shape[0], a.shape[1], -1).double().sum(2))

    handles = [resolve_layer(net, layer).register_forward_hook(hook)
               for net in distinct_networks(members)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _weight_terms_fast(gradients: torch.Tensor, sum_a: torch.Tensor) -> torch.Tensor:
    """:func:`_weight_terms` with fewer operations: for ``g > 0``,
    ``α · ReLU(g) = g³ / (2 g² + s g³) = g / (2 + s g)`` (``s = Σ_j A_kj``), and only
    positive gradients contribute; terms whose denominator is zero are 0 as there. Float64;
    equal to :func:`_weight_terms` up to float64 rounding."""
    K = gradients.shape[0]
    g = F.relu(gradients.reshape(K, -1)).double()
    d = g * sum_a.double().reshape(K, 1)
    d += 2.0
    g /= d
    g.masked_fill_(d == 0, 0.0)
    return g.sum(1)


def _cam_member(member, layer: str, plan: WindowPlan, xp: torch.Tensor, targets,
                sw_batch_size: int, progress: bool, variant: str = "gradcampp",
                sums: dict | None = None, cots: dict | None = None, precision: str = "fp32",
                grad_batch: int = 1):
    """The layer's activations and every target's Grad-CAM++ (or HiResCAM) channel weights,
    one member.

    Parameters
    ----------
    sums : dict of int -> torch.Tensor, optional
        Per window, ``Σ_j A_kj`` ``(K,)`` float64 (e.g. recorded during prediction,
        :func:`record_layer_sums`). Without them (or when a needed window is missing), a
        forward pass without gradients computes them first.
    cots : dict, optional
        ``(t, w) ->`` :func:`~.engine.cotangent_crop`.

    Returns
    -------
    acts : dict of int -> torch.Tensor
        Activations ``(K, *layer_window)`` of each needed window (in the member's
        orientation), on the device.
    weights : list of torch.Tensor
        Per target ``(K,)`` float32 channel weights.
    hires : dict
        HiResCAM only: ``(t, w) -> Σ_k g_k ⊙ A_k`` at the layer's resolution (else empty).
    """
    model = member.module
    module = resolve_layer(member.net, layer)
    dev = xp.device
    needed = sorted({w for ws in plan.target_windows for w in ws})
    users = {w: [t for t, ws in enumerate(plan.target_windows) if w in ws] for w in needed}
    if cots is None:
        cots = {(t, w): cotangent_crop(plan, targets[t], w, dev) for w in needed
                for t in users[w]}
    acts: dict[int, torch.Tensor] = {}
    weights: dict = {t: None for t in range(len(targets))}
    hires: dict = {}  # HiResCAM: (t, w) -> Σ_k g_k ⊙ A_k at the layer's resolution
    batches = _batches(plan, needed, sw_batch_size,
                       lambda w: (-len(users[w]), w))  # packed backward passes waste little
    pass2 = batches
    if progress:
        from tqdm.auto import tqdm

        pass2 = tqdm(batches, desc="HiResCAM" if variant == "hirescam" else "Grad-CAM++",
                     unit="batch", leave=False)
    fmt = input_format(model, dev, xp.ndim)

    def inputs(wb):
        inp = window_inputs(plan, xp, wb)
        return inp if fmt is None else inp.contiguous(memory_format=fmt)

    with capture_activations(module) as store:
        if variant == "hirescam":  # no sums needed: no pass without gradients
            sums = {w: torch.zeros(0, dtype=torch.float64) for w in needed}
        elif sums is None or any(w not in sums for w in needed):
            # pass 1 (no gradients): the sums of the layer's activations over each window
            sums = {}
            for wb in batches:
                store.clear()
                with torch.no_grad(), precision_context(precision, dev):
                    model(inputs(wb))
                if len(store) != 1:
                    raise ValueError(f"layer {layer!r} ran {len(store)} times in one forward "
                                     "pass")
                a = store[0].float()
                for j, w in enumerate(wb):
                    sums[w] = a[j].reshape(a.shape[1], -1).double().sum(1)
                store.clear()
        sum_a = {t: sum(sums[w].to(dev) for w in plan.target_windows[t])
                 for t in range(len(targets))}
        # pass 2: activations and gradients at the layer; each window's share of the weights
        # is added at once (one backward carries a different target on each window row)
        for wb in pass2:
            store.clear()
            inp = inputs(wb)
            with torch.enable_grad():
                with precision_context(precision, dev):
                    out = model(inp)
                out = out.float()
            if len(store) != 1:
                raise ValueError(f"layer {layer!r} ran {len(store)} times in one forward pass")
            A = store[0]
            for j, w in enumerate(wb):
                acts[w] = A[j].detach().float()
            rounds = [[(j, w, users[w][r]) for j, w in enumerate(wb) if r < len(users[w])]
                      for r in range(max(len(users[w]) for w in wb))]
            for assign, g in packed_vjps(out, A, rounds, cots, targets, 1, grad_batch):
                for j, w, t in assign:
                    gj = g[j].detach()
                    if variant == "hirescam":
                        prod = gj.double() * acts[w].double()
                        hires[(t, w)] = prod.sum(0).float()
                        term = prod.reshape(prod.shape[0], -1).sum(1)
                    else:
                        term = _weight_terms_fast(gj, sum_a[t])
                    weights[t] = term if weights[t] is None else weights[t] + term
            store.clear()
            del out, A
    return acts, [weights[t].float() for t in range(len(targets))], hires


def _cam_target_maps(member, plan: WindowPlan, acts, w_t: torch.Tensor, t: int, region,
                     signed: bool, hires: dict | None = None, imp_cache: dict | None = None):
    """Target ``t``'s map after ReLU and (when ``signed``) its signed map, float64, on the
    target's region, in input orientation (a mirrored member's maps are flipped back); each
    window's map is blended with the windows' Gaussian importance (else ``None``). With
    ``hires`` (HiResCAM), a window's map is ``hires[(t, w)]`` instead of ``Σ_k w_k A_k``.
    On the device of ``w_t``; the importance map is converted once (``imp_cache``)."""
    flip_dims = list(member.flip)
    dev = w_t.device
    rshape = tuple(s.stop - s.start for s in region)
    num = torch.zeros(rshape, dtype=torch.float64, device=dev) if signed else None
    num_raw = torch.zeros(rshape, dtype=torch.float64, device=dev)
    den = torch.zeros(rshape, dtype=torch.float64, device=dev)
    w_t = w_t.float()
    imp_cache = {} if imp_cache is None else imp_cache
    for w in plan.target_windows[t]:
        size = plan.windows[w][1]
        if size not in imp_cache:
            imp_cache[size] = (plan.grid.importance if plan.grid is not None
                               else torch.ones(size)).to(dev, torch.float64)
        cam_w = (hires[(t, w)][None] if hires
                 else torch.einsum("k,k...->...", w_t, acts[w])[None])
        raw_w = _upsample(F.relu(cam_w), size)[0]  # ReLU, then upsample
        if flip_dims:  # a mirrored member saw the window flipped: flip its map back
            raw_w = torch.flip(raw_w, flip_dims)
        dst, win_sl = plan.region_part(w, region)
        imp = imp_cache[size][win_sl]
        num_raw[dst].addcmul_(imp, raw_w[win_sl])
        if signed:
            cam_w = _upsample(cam_w, size)[0]
            if flip_dims:
                cam_w = torch.flip(cam_w, flip_dims)
            num[dst].addcmul_(imp, cam_w[win_sl])
        den[dst] += imp
    safe_den = torch.where(den > 0, den, 1.0)
    raw = torch.where(den > 0, num_raw / safe_den, 0.0)
    sgn = torch.where(den > 0, num / safe_den, 0.0) if signed else None
    return raw, sgn


def _cam_member_legacy(member, layer: str, plan: WindowPlan, xp: torch.Tensor, targets,
                sw_batch_size: int, progress: bool, variant: str = "gradcampp"):
    """:func:`_cam_member` as before issue 15 (``_speed.LEGACY``): a forward pass of its own
    for the activations, tensors gathered on the CPU. The layer's activations and every
    target's Grad-CAM++ (or HiResCAM) channel weights, one member.

    Returns
    -------
    acts : dict of int -> torch.Tensor
        Activations ``(K, *layer_window)`` of each needed window (in the member's
        orientation).
    weights : list of torch.Tensor
        Per target ``(K,)`` float32 channel weights.
    hires : dict
        HiResCAM only: ``(t, w) -> Σ_k g_k ⊙ A_k`` at the layer's resolution (else empty).
    """
    model = member.module
    module = resolve_layer(member.net, layer)
    needed = sorted({w for ws in plan.target_windows for w in ws})
    users = {w: [t for t, ws in enumerate(plan.target_windows) if w in ws] for w in needed}
    acts: dict[int, torch.Tensor] = {}
    weights = {t: torch.zeros(0, dtype=torch.float64) for t in range(len(targets))}
    hires: dict = {}  # HiResCAM: (t, w) -> Σ_k g_k ⊙ A_k at the layer's resolution
    batches = _batches(plan, needed, sw_batch_size,
                       lambda w: (-len(users[w]), w))  # packed backward passes waste little
    pass2 = batches
    if progress:
        from tqdm.auto import tqdm

        pass2 = tqdm(batches, desc="HiResCAM" if variant == "hirescam" else "Grad-CAM++",
                     unit="batch", leave=False)
    with capture_activations(module) as store:
        # pass 1 (no gradients): the layer's activations of every window, and their sums
        for wb in batches:
            store.clear()
            with torch.no_grad():
                model(window_inputs(plan, xp, wb))
            if len(store) != 1:
                raise ValueError(f"layer {layer!r} ran {len(store)} times in one forward pass")
            for j, w in enumerate(wb):
                acts[w] = store[0][j].detach().cpu()
        store.clear()
        sum_a = {t: sum(acts[w].reshape(acts[w].shape[0], -1).double().sum(1)
                        for w in plan.target_windows[t]) for t in range(len(targets))}
        # pass 2: gradients at the layer; each window's share of the weights is added at once
        # (one backward carries a different target on each window row of the batch)
        for wb in pass2:
            store.clear()
            inp = window_inputs(plan, xp, wb)
            with torch.enable_grad():
                out = model(inp)
            A = store[0]
            rounds = [[(j, w, users[w][r]) for j, w in enumerate(wb) if r < len(users[w])]
                      for r in range(max(len(users[w]) for w in wb))]
            for i, assign in enumerate(rounds):
                cot = torch.zeros_like(out)
                for j, w, t in assign:
                    cot[j, targets[t].class_index] = cotangent(plan, targets[t], w, out.device)
                (g,) = torch.autograd.grad(out, A, cot, retain_graph=i < len(rounds) - 1)
                for j, w, t in assign:
                    gj = g[j].detach().cpu()
                    if variant == "hirescam":
                        prod = gj.double() * A[j].detach().cpu().double()
                        hires[(t, w)] = prod.sum(0).float()
                        term = prod.reshape(prod.shape[0], -1).sum(1)
                    else:
                        term = _weight_terms(gj, sum_a[t])
                    weights[t] = term if weights[t].numel() == 0 else weights[t] + term
            store.clear()
            del out, A
    return acts, [weights[t].float() for t in range(len(targets))], hires


def _cam_target_maps_legacy(member, plan: WindowPlan, acts, w_t: torch.Tensor, t: int, region,
                     signed: bool, hires: dict | None = None):
    """:func:`_cam_target_maps` as before issue 15. Target ``t``'s map after ReLU and (when
    ``signed``) its signed map, float64, on the target's region, in input orientation (a mirrored member's maps are flipped back); each
    window's map is blended with the windows' Gaussian importance (else ``None``). With
    ``hires`` (HiResCAM), a window's map is ``hires[(t, w)]`` instead of ``Σ_k w_k A_k``."""
    flip_dims = list(member.flip)
    rshape = tuple(s.stop - s.start for s in region)
    num = torch.zeros(rshape, dtype=torch.float64) if signed else None
    num_raw = torch.zeros(rshape, dtype=torch.float64)
    den = torch.zeros(rshape, dtype=torch.float64)
    w_t = w_t.float()
    for w in plan.target_windows[t]:
        cam_w = (hires[(t, w)][None] if hires
                 else torch.einsum("k,k...->...", w_t, acts[w])[None])
        raw_w = _upsample(F.relu(cam_w), plan.windows[w][1])[0]  # ReLU, then upsample
        if flip_dims:  # a mirrored member saw the window flipped: flip its map back
            raw_w = torch.flip(raw_w, flip_dims)
        dst, win_sl = plan.region_part(w, region)
        imp = (plan.grid.importance if plan.grid is not None
               else torch.ones(plan.windows[w][1]))[win_sl].double()
        num_raw[dst] += imp * raw_w[win_sl].double()
        if signed:
            cam_w = _upsample(cam_w, plan.windows[w][1])[0]
            if flip_dims:
                cam_w = torch.flip(cam_w, flip_dims)
            num[dst] += imp * cam_w[win_sl].double()
        den[dst] += imp
    safe_den = torch.where(den > 0, den, 1.0)
    raw = torch.where(den > 0, num_raw / safe_den, 0.0)
    sgn = torch.where(den > 0, num / safe_den, 0.0) if signed else None
    return raw, sgn
