"""Can a lesion's map be trusted? Per-lesion sanity and faithfulness checks.

Three checks, each measured per lesion instance and per saliency method, with the same exact
window-sparse machinery as the maps (only the sliding windows that touch a lesion are re-run):

**Model-parameter randomisation** (Adebayo et al. 2018, "Sanity checks for saliency maps",
NeurIPS). The network's parameterised layers (convolutions, transposed convolutions, linear
layers; normalisation layers keep their statistics) are split into ``stages`` contiguous groups.
*Cascading*: stage ``s`` re-initialises groups ``1..s`` counted from the output (stage 0 = the
trained network, the last stage = every such layer random, the data-free variant).
*Independent*: only group ``s``. After each stage the lesion's map is recomputed and compared
with the trained network's map of the same lesion inside the lesion dilated by ``margin_mm``:
Spearman rank correlation of ``|map|`` and of the signed map (all channels pooled), and SSIM
(Wang et al. 2004; ``skimage.metrics.structural_similarity``) on the region's bounding box,
averaged over channels. A map that depends on what the model learned falls towards 0. The
weights are restored bit for bit afterwards.

**Deletion and insertion** (Samek et al. 2017, "Evaluating the visualization of what a deep
neural network has learned", IEEE TNNLS; Petsiuk et al. 2018, RISE). Inside the lesion's
neighbourhood (the lesion dilated by ``margin_mm``) input elements are replaced in descending
saliency order in ``steps`` equal steps by a baseline, and the lesion's target (its summed
lesion logit, as in the maps) is recomputed. SmoothGrad ranks (channel, voxel) elements; the
CAMs rank voxels (all channels of a voxel together). The area over the perturbation curve is
the mean drop of the target over the steps k = 1..steps; random orders (``random_orders`` seeds)
give the reference (reported in logit units: the mean drop of the lesion's *mean* logit,
``AOPC = mean_k (m_0 - m_k)`` with ``m = T / n_voxels``, so that lesions of any size and either
target reduction compare). Insertion starts from the all-baseline neighbourhood and restores
elements in the same order (``insertion = mean_k (T_k - T_base) / |T_0 - T_base|``). Baselines:
``"background"`` — each channel's value outside the brain after normalisation (the mode of the
volume's border voxels; 0 for the z-score); ``"blur"`` — a Gaussian-blurred copy of the input
(σ = ``blur_sigma_mm``); ``"road"`` — noisy linear imputation (Rong et al. 2022, "A consistent
and efficient evaluation strategy for attribution methods", ICML): removed voxels take the
solution of the discrete Laplace equation with the kept voxels as boundary, plus Gaussian noise
of ``road_noise`` × the channel's standard deviation, so that the removal leaves no sharp
edge for the network to react to. A lesion is *detected* while at least ``detect_fraction`` of
its voxels stay above the model's threshold (the IoU ≥ 0.25 rule of lesion F1 for a prediction
inside the lesion).

**Context** (the seed paper's dilation experiment, Spagnolo et al. 2024, arXiv:2406.09335,
Sect. 3.4). For each TP lesion: keep the lesion and a shell of ``d`` mm around it, replace every
other voxel by the background value, re-predict, and record the Dice of the re-predicted mask
with the original instance (the re-predicted components that overlap it) and the summed logit,
for each ``d`` in
``context_mm``; the *recovery distance* is the smallest ``d`` from which the lesion is detected
at every larger ``d`` tested.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError

CHECKS = ("randomisation", "deletion", "context")
BASELINES = ("background", "blur", "road")


@dataclass
class CheckConfig:
    """Parameters of :func:`run_checks` (recorded in ``checks.json``).

    Attributes
    ----------
    checks : tuple of str
        Subset of :data:`CHECKS`.
    methods : tuple of str
        Saliency methods to check (``smoothgrad``, ``gradcampp``, ``hirescam``).
    n_samples : int
        SmoothGrad noise samples used inside the checks (maps are recomputed).
    margin_mm : float
        Neighbourhood of a lesion (dilation, mm) for similarity and deletion.
    stages : int
        Randomisation stages (groups of parameterised layers, from the output).
    independent : bool
        Also randomise each group alone (independent randomisation).
    steps : int
        Deletion / insertion steps.
    random_orders : int
        Random-order seeds for the deletion reference.
    baselines : tuple of str
        Deletion baselines (:data:`BASELINES`); insertion uses the first that is not
        ``road`` (ROAD imputes removed voxels from kept ones: there is no fixed image to
        insert into; with ``road`` alone there is no insertion curve). Default the
        background value only: ``road`` adds one sparse Laplace solve and a distinct input per
        step and order (with the defaults 25 inputs per lesion to the default's 34), ``blur``
        a distinct input per step and order.
    blur_sigma_mm, road_noise : float
        Blur baseline σ (mm); ROAD noise (fraction of the channel's standard deviation).
    detect_fraction : float
        A lesion counts as detected while this fraction of its voxels stays above threshold.
    context_mm : tuple of float
        Shell widths of the context experiment (mm).
    lesions : tuple of int or None
        Lesion labels to check (default: every predicted lesion).
    max_lesions : int or None
        Check at most this many predicted lesions per run: the largest (most voxels; ties by
        label), a reproducible sample for full scans and cohorts (default: all).
    seed : int
    sw_batch_size : int
        Windows per forward/backward pass (memory only; default 2, as ``explain``'s
        :class:`~instance_saliency.explain.ExplainConfig`, whose default it was lowered to for
        memory).
    """

    checks: tuple = CHECKS
    methods: tuple = ("smoothgrad", "gradcampp", "hirescam")
    n_samples: int = 8
    noise_level: float = 0.05
    margin_mm: float = 10.0
    stages: int = 4
    independent: bool = False
    steps: int = 5
    random_orders: int = 2
    baselines: tuple = ("background",)
    blur_sigma_mm: float = 5.0
    road_noise: float = 0.01
    detect_fraction: float = 0.25
    context_mm: tuple = tuple(float(d) for d in range(16))
    lesions: tuple | None = None
    max_lesions: int | None = None
    seed: int = 0
    sw_batch_size: int = 2

    def validate(self) -> None:
        """Raise :class:`InputError` for unknown names or out-of-range values."""
        from .explain import METHODS

        bad = [c for c in self.checks if c not in CHECKS]
        if bad or not self.checks:
            raise InputError(f"unknown check(s) {bad}; choose from {', '.join(CHECKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad or not self.baselines:
            raise InputError(f"unknown baseline(s) {bad}; choose from {', '.join(BASELINES)}")
        for name, v, lo in (("--n-samples", self.n_samples, 1), ("--stages", self.stages, 1),
                            ("--steps", self.steps, 1), ("--random-orders", self.random_orders, 0),
                            ("sw_batch_size", self.sw_batch_size, 1)):
            if int(v) < lo:
                raise InputError(f"{name} must be at least {lo}")
        if not (self.margin_mm >= 0 and np.isfinite(self.margin_mm)):
            raise InputError("--margin-mm must be a finite number >= 0")
        if not (0 < self.detect_fraction <= 1):
            raise InputError("--detect-fraction must be in (0, 1]")
        if self.max_lesions is not None and int(self.max_lesions) < 1:
            raise InputError("--max-lesions must be at least 1")
        if any(not (d >= 0 and np.isfinite(d)) for d in self.context_mm):
            raise InputError("--context-mm values must be finite and >= 0")
        if "context" in self.checks and (not self.context_mm or any(
                b <= a for a, b in zip(self.context_mm, self.context_mm[1:]))):
            raise InputError("--context-mm must be one or more increasing distances, got "
                             f"{list(self.context_mm)}")


# --------------------------------------------------------------------------- geometry


def dilate_mm(mask: np.ndarray, margin_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, world mm) of ``mask`` (mask included).

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    margin_mm : float
    spacing : 3 floats (mm)

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
    """
    from scipy import ndimage

    if margin_mm <= 0:
        return mask.astype(bool).copy()
    return ndimage.distance_transform_edt(~mask.astype(bool), sampling=spacing) <= margin_mm


def background_values(x: np.ndarray) -> np.ndarray:
    """Per-channel value outside the brain: the mode of the volume's border voxels.

    Parameters
    ----------
    x : ndarray, shape (C, X, Y, Z)
        Normalised input.

    Returns
    -------
    ndarray, shape (C,)
    """
    out = []
    for c in range(x.shape[0]):
        a = x[c]
        border = np.concatenate([a[0].ravel(), a[-1].ravel(), a[:, 0].ravel(), a[:, -1].ravel(),
                                 a[:, :, 0].ravel(), a[:, :, -1].ravel()])
        vals, counts = np.unique(border, return_counts=True)
        out.append(float(vals[counts.argmax()]))
    return np.array(out, dtype=np.float32)


def road_impute(x: np.ndarray, removed: np.ndarray, noise: float, rng) -> np.ndarray:
    """Noisy linear imputation (ROAD; Rong et al. 2022) of the ``removed`` voxels.

    Each removed voxel takes the mean of its 6-neighbours inside the volume (the discrete
    Laplace equation, solved jointly over the removed set with the kept voxels as boundary),
    then Gaussian noise of ``noise`` × the channel's standard deviation is added.

    Parameters
    ----------
    x : ndarray, shape (C, X, Y, Z)
    removed : ndarray of bool, shape (X, Y, Z)
    noise : float
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, shape (C, X, Y, Z): a copy of ``x`` with the removed voxels imputed.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    out = x.copy()
    idx = np.argwhere(removed)
    m = len(idx)
    if m == 0:
        return out
    pos = -np.ones(removed.shape, dtype=np.int64)
    pos[tuple(idx.T)] = np.arange(m)
    rows, cols = [np.arange(m)], [np.arange(m)]
    deg = np.zeros(m)
    rhs = np.zeros((x.shape[0], m))
    off_r, off_c = [], []
    for ax in range(3):
        for step in (-1, 1):
            nb = idx.copy()
            nb[:, ax] += step
            inside = (nb[:, ax] >= 0) & (nb[:, ax] < removed.shape[ax])
            deg += inside
            i_in = np.flatnonzero(inside)
            nbi = nb[i_in]
            p = pos[tuple(nbi.T)]
            unknown = p >= 0
            off_r.append(i_in[unknown])
            off_c.append(p[unknown])
            known = i_in[~unknown]
            kv = x[(slice(None),) + tuple(nbi[~unknown].T)]
            np.add.at(rhs, (slice(None), known), kv)
    r = np.concatenate(rows + off_r)
    c = np.concatenate(cols + off_c)
    v = np.concatenate([np.maximum(deg, 1.0), -np.ones(sum(len(o) for o in off_r))])
    A = coo_matrix((v, (r, c)), shape=(m, m)).tocsc()
    for ch in range(x.shape[0]):
        sol = spsolve(A, rhs[ch])
        sd = float(x[ch].std())
        out[(ch,) + tuple(idx.T)] = (sol + rng.normal(0.0, noise * sd, m)).astype(x.dtype)
    return out


# --------------------------------------------------------------------------- prediction


class LocalPredictor:
    """Exact sliding-window logits at a lesion's voxels from the windows that touch it.

    Parameters
    ----------
    network : torch.nn.Module
        The model's averaging network (members × mirrorings).
    grid : WindowGrid
        Sliding-window grid of the network's grid.
    lesion_class : int
    threshold : float or None
        Lesion-probability threshold; ``None`` = argmax decision.
    """

    def __init__(self, network, grid, lesion_class: int, threshold, sw_batch_size: int = 2):
        self.net = network
        self.grid = grid
        self.lesion_class = int(lesion_class)
        self.threshold = threshold
        self.sw = max(1, int(sw_batch_size))
        self.forwards = 0

    def logits(self, xs: Sequence[np.ndarray], mask: np.ndarray,
               windows: Sequence[int] | None = None) -> np.ndarray:
        """Logits ``(len(xs), K, n_voxels)`` at the voxels of ``mask`` for each input.

        Exact: every window that contains a voxel of ``mask`` is run (``windows`` defaults to
        them), and the blend weights are the full grid's. The network runs as in the saliency
        passes (:func:`~.saliency._speed.fast_networks`: batch norms folded, PReLUs frozen;
        channels-last on the CPU): float32 rounding only, about 1e-7 relative.
        """
        from .saliency._speed import fast_networks, input_format
        from .saliency.base import models_state_guard

        g = self.grid
        ws = list(windows) if windows is not None else g.windows_touching(mask)
        idx = np.argwhere(mask) + np.asarray(g.pad_before)
        roi = np.asarray(g.roi_size)
        imp = g.importance
        norm = g.norm[tuple(idx.T)].double()
        jobs = [(i, w) for i in range(len(xs)) for w in ws]
        acc = None
        padded = [g.pad(torch.as_tensor(np.asarray(x, np.float32))[None]) for x in xs]
        dev = next(self.net.parameters()).device
        fmt = input_format(self.net, dev)
        with torch.no_grad(), models_state_guard(self.net), fast_networks(self.net):
            for b in range(0, len(jobs), self.sw):
                chunk = jobs[b:b + self.sw]
                batch = torch.cat([padded[i][(slice(None), slice(None)) + g.window_slices(w)]
                                   for i, w in chunk]).to(dev)
                if fmt is not None:
                    batch = batch.contiguous(memory_format=fmt)
                out = self.net(batch).double().cpu()
                self.forwards += len(chunk)
                if acc is None:
                    acc = torch.zeros((len(xs), out.shape[1], len(idx)), dtype=torch.float64)
                for j, (i, w) in enumerate(chunk):
                    st = g.starts[w]
                    sel = np.flatnonzero(np.all((idx >= st) & (idx < st + roi), axis=1))
                    loc = idx[sel] - st
                    vals = out[j][(slice(None),) + tuple(loc.T)] * imp[tuple(loc.T)].double()
                    acc[i][:, sel] += vals
        return (acc / norm).numpy()

    def detected(self, logits: np.ndarray) -> np.ndarray:
        """Per input, the fraction of voxels whose lesion decision is positive ``(len,)``."""
        t = torch.from_numpy(logits)
        if self.threshold is None:
            pos = t.argmax(1) == self.lesion_class
        else:
            pos = torch.softmax(t, 1)[:, self.lesion_class] >= self.threshold
        return pos.double().mean(1).numpy()


# --------------------------------------------------------------------------- randomisation


def randomisation_layers(network: torch.nn.Module) -> list[str]:
    """Names of the parameterised layers (conv, transposed conv, linear), input to output."""
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    return [n for n, m in network.named_modules()
            if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def layer_groups(names: Sequence[str], stages: int) -> list[list[str]]:
    """Split layers into ``stages`` contiguous groups, the first group nearest the output."""
    rev = list(names)[::-1]
    k = max(1, min(int(stages), len(rev)))
    edges = np.linspace(0, len(rev), k + 1).round().astype(int)
    return [rev[a:b] for a, b in zip(edges[:-1], edges[1:])]


@contextlib.contextmanager
def randomised(networks: Sequence[torch.nn.Module], names: Sequence[str], seed: int):
    """Re-initialise the named layers of each network (their own ``reset_parameters``, seeded)
    for the duration of the block; the original state dicts are restored exactly afterwards.

    Raises
    ------
    RuntimeError
        A restored parameter differs from the original (never expected).
    """
    saved = [copy.deepcopy(n.state_dict()) for n in networks]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for net in networks:
                mods = dict(net.named_modules())
                for name in names:
                    mods[name].reset_parameters()
        yield
    finally:
        for net, st in zip(networks, saved):
            net.load_state_dict(st)
            now = net.state_dict()
            if any(not torch.equal(now[k], st[k]) for k in st):
                raise RuntimeError("weights were not restored exactly after randomisation")


def similarity(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> dict:
    """Spearman rank correlation of ``|a|`` and ``|b|`` and of the signed maps (channels pooled)
    inside ``region``, and SSIM on the region's bounding box (mean over channels).

    Parameters
    ----------
    a, b : ndarray, shape (C, X, Y, Z)
    region : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    dict with ``spearman_abs``, ``spearman_signed``, ``ssim`` (NaN where undefined, e.g. a
    constant map).
    """
    import warnings

    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    va, vb = a[:, region].ravel(), b[:, region].ravel()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, fa, fb in (("spearman_abs", np.abs(va), np.abs(vb)), ("spearman_signed", va, vb)):
            out[key] = (float(spearmanr(fa, fb).statistic)
                        if np.ptp(fa) > 0 and np.ptp(fb) > 0 else float("nan"))
    idx = np.argwhere(region)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
    vals = []
    for c in range(a.shape[0]):
        ca, cb = a[c][box].astype(np.float64), b[c][box].astype(np.float64)
        rng = float(max(ca.max(), cb.max()) - min(ca.min(), cb.min()))
        win = min(7, *[s if s % 2 else s - 1 for s in ca.shape])
        if rng <= 0 or win < 3:
            vals.append(float("nan"))
            continue
        vals.append(float(structural_similarity(ca, cb, data_range=rng, win_size=win)))
    out["ssim"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


# --------------------------------------------------------------------------- deletion


def deletion_order(sal: np.ndarray, region: np.ndarray, per_channel: bool) -> np.ndarray:
    """Elements of ``region`` in descending saliency order.

    Returns ``(n, 4)`` int indices ``(c, x, y, z)`` (``per_channel``) or ``(n, 3)`` voxel
    indices (CAM maps: the voxel's value over channels summed). Ties keep index order.
    """
    vox = np.argwhere(region)
    if per_channel:
        C = sal.shape[0]
        vals = np.concatenate([sal[c][region] for c in range(C)])
        el = np.concatenate([np.column_stack([np.full(len(vox), c), vox]) for c in range(C)])
    else:
        vals = sal.sum(0)[region]
        el = vox
    return el[np.argsort(-vals, kind="stable")]


def _apply(x: np.ndarray, elements: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Copy of ``x`` with ``elements`` (channel+voxel or voxel indices) taken from ``source``."""
    out = x.copy()
    if elements.shape[1] == 4:
        ix = tuple(elements.T)
        out[ix] = source[ix]
    else:
        ix = (slice(None),) + tuple(elements.T)
        out[ix] = source[ix]
    return out


def _removed_voxels(elements: np.ndarray, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(elements[:, -3:].T)] = True
    return m


def perturbation_curve(pred: LocalPredictor, x: np.ndarray, lesion: np.ndarray,
                       order: np.ndarray, steps: int, baseline: np.ndarray | None,
                       reduction: str = "sum", insertion: bool = False,
                       road: tuple | None = None, windows=None,
                       cache: dict | None = None, cache_key=None) -> tuple[np.ndarray, np.ndarray]:
    """Target and detected fraction after each of ``steps`` perturbation steps.

    Parameters
    ----------
    x : ndarray, shape (C, X, Y, Z)
        Normalised input.
    lesion : ndarray of bool
        The instance (target voxels).
    order : ndarray
        Elements in perturbation order (:func:`deletion_order`).
    baseline : ndarray, shape (C, X, Y, Z) or None
        Replacement values (``None`` with ``road``).
    insertion : bool
        Start from the baseline over all ``order`` elements and restore them in order.
    road : (noise, rng), optional
        ROAD noisy linear imputation of the removed voxels instead of a baseline.
    cache : dict, optional
        Logits of inputs that several curves of one lesion share, filled and reused: the
        unperturbed input (``k = 0`` of a deletion, the last step of an insertion) and, with a
        fixed baseline named ``cache_key``, the input with the whole neighbourhood replaced
        (every order ends there; insertion starts there). Each is then run once per lesion
        instead of once per curve; the values are the same.

    Returns
    -------
    targets : ndarray, shape (steps + 1,)
        ``T_k`` (k = 0: unperturbed for deletion, all-baseline for insertion).
    detected : ndarray, shape (steps + 1,)
        Fraction of lesion voxels above threshold.
    """
    n = len(order)
    cuts = [int(round(n * k / steps)) for k in range(steps + 1)]
    cache = {} if cache is None else cache
    keys, xs = [], []
    for k in cuts:
        part = order[:k] if not insertion else order[k:]
        key = ("unperturbed",) if not len(part) else \
            ("all replaced", cache_key) if (len(part) == n and road is None
                                            and cache_key is not None) else None
        keys.append(key)
        if key is not None and key in cache:
            continue
        if road is not None:
            xs.append(road_impute(x, _removed_voxels(part, x.shape[1:]), road[0], road[1])
                      if len(part) else x.copy())
        else:
            xs.append(_apply(x, part, baseline) if len(part) else x.copy())
    new = iter(pred.logits(xs, lesion, windows) if xs else [])
    rows = []
    for key in keys:
        if key is not None and key in cache:
            rows.append(cache[key])
            continue
        v = next(new)
        if key is not None:
            cache[key] = v
        rows.append(v)
    lg = np.stack(rows)
    tl = lg[:, pred.lesion_class]
    t = tl.sum(1) if reduction == "sum" else tl.mean(1)
    return t, pred.detected(lg)


def aopc(targets: np.ndarray, n_voxels: int = 1, reduction: str = "sum") -> float:
    """Area over the perturbation curve (Samek et al. 2017, eq. 12) of the lesion's mean logit,
    ``mean_k (m_0 - m_k)``, ``m = T / n_voxels`` for a summed target (``T`` for a mean one)."""
    m = np.asarray(targets, np.float64) / (n_voxels if reduction == "sum" else 1)
    return float(np.mean(m[0] - m[1:]))


def insertion_score(targets: np.ndarray, t_full: float) -> float:
    """Normalised area of an insertion curve, ``mean_k (T_k - T_base) / |T_full - T_base|``."""
    d = t_full - targets[0]
    return float(np.mean(targets[1:] - targets[0]) / abs(d)) if d != 0 else float("nan")


def context_curve(pred: LocalPredictor, x: np.ndarray, lesion: np.ndarray,
                  spacing: Sequence[float], distances: Sequence[float], background: np.ndarray,
                  reduction: str = "sum") -> dict:
    """The seed paper's context experiment for one lesion.

    Keep the lesion and a shell of ``d`` mm around it, set every other voxel to
    ``background`` (per channel), re-predict (exactly, from the windows touching the kept
    region), and measure the Dice of the re-predicted mask with the lesion inside the kept
    region (its connected components, 26-connectivity, that overlap the lesion: other lesions in
    the shell do not count) with the lesion, the lesion's target and its detected fraction.

    Returns
    -------
    dict of arrays over ``distances``: ``dice``, ``target``, ``detected``; and ``recovery_mm``
    (float; NaN when the lesion is not detected at the largest distance).
    """
    import cc3d
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    dice, tgt, det = [], [], []
    for d in distances:
        keep = dist <= d
        xd = np.where(keep[None], x, background[:, None, None, None]).astype(np.float32)
        lg = pred.logits([xd], keep)[0]
        if pred.threshold is None:
            pos = lg.argmax(0) == pred.lesion_class
        else:
            e = np.exp(lg - lg.max(0, keepdims=True))
            pos = e[pred.lesion_class] / e.sum(0) >= pred.threshold
        les_in_keep = lesion[keep]
        # the re-predicted lesion: components of the new mask that overlap the instance
        full = np.zeros(lesion.shape, bool)
        full[keep] = pos
        lab = cc3d.connected_components(full.astype(np.uint8), connectivity=26)
        ids = np.unique(lab[lesion & full])
        own = np.isin(lab, ids[ids > 0])
        inter = float((own & lesion).sum())
        dice.append(2 * inter / max(float(own.sum() + lesion.sum()), 1.0))
        tl = lg[pred.lesion_class][les_in_keep]
        tgt.append(float(tl.sum() if reduction == "sum" else tl.mean()))
        det.append(float(pos[les_in_keep].mean()))
    det_a = np.asarray(det)
    return {"dice": np.asarray(dice), "target": np.asarray(tgt), "detected": det_a}


def recovery_distance(distances: Sequence[float], detected: np.ndarray, fraction: float) -> float:
    """Smallest distance from which the lesion stays detected at every larger distance
    (NaN when it is not detected at the largest)."""
    ok = np.asarray(detected) >= fraction
    if not ok[-1]:
        return float("nan")
    k = len(ok) - 1
    while k > 0 and ok[k - 1]:
        k -= 1
    return float(distances[k])


# --------------------------------------------------------------------------- maps


def compute_maps(model, x: torch.Tensor, targets, methods: Sequence[str], grid, cam_layer,
                 cfg: CheckConfig, mode: str = "sliding") -> dict:
    """Each method's dense maps ``(C, *shape)`` per target on the network grid."""
    from .saliency import gradcampp, hirescam, smoothgrad

    out = {}
    for method in methods:
        if method == "smoothgrad":
            res = smoothgrad(model, x, targets, mode=mode, grid=grid, roi_size=model.roi_size,
                             overlap=model.overlap, n_samples=cfg.n_samples,
                             noise_level=cfg.noise_level, seed=cfg.seed,
                             sw_batch_size=cfg.sw_batch_size)
            out[method] = [r.maps["mean"].to_dense() for r in res]
        else:
            fn = gradcampp if method == "gradcampp" else hirescam
            res = fn(model, x, targets, cam_layer, mode=mode, grid=grid,
                     roi_size=model.roi_size, overlap=model.overlap,
                     sw_batch_size=cfg.sw_batch_size)
            out[method] = [r.maps["raw"].to_dense() for r in res]
    return out


# --------------------------------------------------------------------------- driver


def check_lesions(model, x: np.ndarray, lesions: Sequence[np.ndarray], labels: Sequence[int],
                  statuses: Sequence[str], spacing: Sequence[float], cfg: CheckConfig, *,
                  cam_layer: str | None = None, threshold: float | None = None,
                  reduction: str = "sum", progress=None) -> tuple[list, list, dict]:
    """Run the checks on the lesions of one scan (network grid).

    Parameters
    ----------
    model : SegmentationModel
    x : ndarray, shape (C, X, Y, Z)
        Normalised network input.
    lesions : list of ndarray of bool, shape (X, Y, Z)
        Instance masks on the network grid.
    labels, statuses : per lesion
    spacing : 3 floats
        Network-grid voxel spacing (mm).
    threshold : float or None
        Lesion-probability threshold (``None`` with an argmax model).

    Returns
    -------
    rows : list of dict
        One per lesion × method × check (``checks.csv``).
    curves : list of dict
        Long-format curves (``check_curves.csv``).
    cost : dict
        Seconds and windows re-run per check.
    """
    from .models.base import distinct_networks
    from .targets import InstanceTarget

    cfg.validate()
    log = progress or (lambda s: None)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    grid = model.grid(x.shape[1:])
    methods = [m for m in cfg.methods if m == "smoothgrad" or cam_layer]
    targets = [InstanceTarget(m, model.lesion_class, reduction, name=f"lesion_{lab:03d}")
               for m, lab in zip(lesions, labels)]
    regions = [dilate_mm(m, cfg.margin_mm, spacing) for m in lesions]
    rows, curves, cost = [], [], {}
    base = {lab: {"label": int(lab), "status": st, "voxels": int(m.sum())}
            for lab, st, m in zip(labels, statuses, lesions)}
    t0 = time.time()
    need_maps = bool(targets) and bool({"randomisation", "deletion"} & set(cfg.checks))
    maps0 = compute_maps(model, xt, targets, methods, grid, cam_layer, cfg) if need_maps else {}
    cost["maps_s"] = round(time.time() - t0, 2)
    pred = LocalPredictor(model.network, grid, model.lesion_class, threshold, cfg.sw_batch_size)
    bg = background_values(x)  # each channel's value outside the brain (deletion, context)

    if "randomisation" in cfg.checks and targets:
        t0 = time.time()
        networks = distinct_networks(model.members)
        groups = layer_groups(randomisation_layers(networks[0]), cfg.stages)
        plans = [("cascading", s + 1, [n for g in groups[:s + 1] for n in g])
                 for s in range(len(groups))]
        if cfg.independent:
            plans += [("independent", s + 1, g) for s, g in enumerate(groups)]
        final = {}
        for kind, stage, names in plans:
            log(f"randomisation: {kind} stage {stage}/{len(groups)} ({len(names)} layers)")
            with randomised(networks, names, cfg.seed + stage):
                maps_r = compute_maps(model, xt, targets, methods, grid, cam_layer, cfg)
            for method in methods:
                for t, lab in enumerate(labels):
                    sim = similarity(maps0[method][t], maps_r[method][t], regions[t])
                    for k, v in sim.items():
                        curves.append({"label": int(lab), "method": method,
                                       "check": f"randomisation_{kind}", "variant": k,
                                       "x": stage, "x_name": "stage", "value": v})
                    if kind == "cascading" and stage == len(groups):
                        final[(method, lab)] = sim
        for method in methods:
            for lab in labels:
                sim = final[(method, lab)]
                rows.append({**base[lab], "method": method, "check": "randomisation",
                             "spearman_abs_full": sim["spearman_abs"],
                             "spearman_signed_full": sim["spearman_signed"],
                             "ssim_full": sim["ssim"], "stages": len(groups)})
        cost["randomisation_s"] = round(time.time() - t0, 2)

    if "deletion" in cfg.checks and targets:
        t0 = time.time()
        f0 = pred.forwards
        bases = {}
        for b in cfg.baselines:
            if b == "background":
                bases[b] = np.broadcast_to(bg[:, None, None, None], x.shape).astype(np.float32)
            elif b == "blur":
                from scipy import ndimage

                sig = [cfg.blur_sigma_mm / s for s in spacing]
                bases[b] = np.stack([ndimage.gaussian_filter(x[c], sig)
                                     for c in range(x.shape[0])]).astype(np.float32)
            else:
                bases[b] = None
        for t, (lab, les) in enumerate(zip(labels, lesions)):
            log(f"deletion: lesion {lab} ({t + 1}/{len(labels)})")
            ws = grid.windows_touching(les)
            orders = {m: deletion_order(maps0[m][t], regions[t], m == "smoothgrad")
                      for m in methods}
            rand = []
            for r in range(cfg.random_orders):
                rng = np.random.default_rng([cfg.seed, int(lab), r])
                vox = np.argwhere(regions[t])
                rand.append(vox[rng.permutation(len(vox))])
            res: dict = {}
            shared: dict = {}  # logits of inputs that several of this lesion's curves share
            for b in cfg.baselines:
                road = (cfg.road_noise, np.random.default_rng([cfg.seed, int(lab), 99])) \
                    if b == "road" else None
                for name, order in list(orders.items()) + [(f"random{r}", o)
                                                             for r, o in enumerate(rand)]:
                    tk, dk = perturbation_curve(pred, x, les, order, cfg.steps, bases[b],
                                                reduction, road=road, windows=ws,
                                                cache=shared, cache_key=b)
                    res[(b, name)] = (tk, dk)
                    for k in range(len(tk)):
                        curves.append({"label": int(lab), "method": name,
                                       "check": f"deletion_{b}", "variant": "target",
                                       "x": k / cfg.steps, "x_name": "fraction removed",
                                       "value": float(tk[k])})
                        curves.append({"label": int(lab), "method": name,
                                       "check": f"deletion_{b}", "variant": "detected",
                                       "x": k / cfg.steps, "x_name": "fraction removed",
                                       "value": float(dk[k])})
            b0 = cfg.baselines[0]
            # insertion needs a fixed image to start from: the first baseline that is not ROAD
            b_ins = next((b for b in cfg.baselines if b != "road"), None)
            ins = {}
            if b_ins is not None:
                for name, order in orders.items():
                    tk, _ = perturbation_curve(pred, x, les, order, cfg.steps, bases[b_ins],
                                               reduction, insertion=True, windows=ws,
                                               cache=shared, cache_key=b_ins)
                    ins[name] = insertion_score(tk, float(res[(b_ins, name)][0][0]))
                    for k in range(len(tk)):
                        curves.append({"label": int(lab), "method": name,
                                       "check": f"insertion_{b_ins}", "variant": "target",
                                       "x": k / cfg.steps, "x_name": "fraction restored",
                                       "value": float(tk[k])})
            for name in orders:
                row = {**base[lab], "method": name, "check": "deletion",
                       "target_0": float(res[(b0, name)][0][0])}
                for b in cfg.baselines:
                    nv = int(les.sum())
                    a = aopc(res[(b, name)][0], nv, reduction)
                    ar = [aopc(res[(b, f"random{r}")][0], nv, reduction)
                          for r in range(cfg.random_orders)]
                    row[f"aopc_{b}"] = a
                    row[f"aopc_{b}_random"] = float(np.mean(ar)) if ar else float("nan")
                    row[f"aopc_{b}_minus_random"] = a - row[f"aopc_{b}_random"]
                    dk = res[(b, name)][1]
                    lost = np.flatnonzero(dk < cfg.detect_fraction)
                    row[f"lost_at_fraction_{b}"] = (float(lost[0] / cfg.steps) if len(lost)
                                                    else float("nan"))
                row["insertion"] = ins.get(name, float("nan"))
                row["insertion_baseline"] = b_ins or ""
                rows.append(row)
        cost["deletion_s"] = round(time.time() - t0, 2)
        cost["deletion_windows"] = pred.forwards - f0

    if "context" in cfg.checks:
        t0 = time.time()
        f0 = pred.forwards
        dists = [float(d) for d in cfg.context_mm]
        for t, (lab, st, les) in enumerate(zip(labels, statuses, lesions)):
            if st != "TP":
                continue
            log(f"context: lesion {lab}")
            cc = context_curve(pred, x, les, spacing, dists, bg, reduction)
            rec = recovery_distance(dists, cc["detected"], cfg.detect_fraction)
            for k, d in enumerate(dists):
                for var in ("dice", "target", "detected"):
                    curves.append({"label": int(lab), "method": "model", "check": "context",
                                   "variant": var, "x": d, "x_name": "shell mm",
                                   "value": float(cc[var][k])})
            rows.append({**base[lab], "method": "model", "check": "context",
                         "recovery_mm": rec, "dice_at_0": float(cc["dice"][0]),
                         "dice_at_max": float(cc["dice"][-1])})
        cost["context_s"] = round(time.time() - t0, 2)
        cost["context_windows"] = pred.forwards - f0
    n = max(len(labels), 1)
    cost["seconds_per_lesion"] = round(sum(v for k, v in cost.items() if k.endswith("_s")) / n, 2)
    return rows, curves, cost


def run_checks(run_dir: str | Path, cfg: CheckConfig | None = None, *, model=None,
               overwrite: bool = False, log=print, figures: bool = True) -> dict:
    """Run the checks on the lesions of a finished ``explain`` run and write ``checks.csv``,
    ``check_curves.csv``, ``checks.json`` and ``checks.html`` (with figures) into it.

    Parameters
    ----------
    run_dir : path
        Output folder of ``instance-saliency explain`` (holds ``run.json``).
    cfg : CheckConfig
    model : SegmentationModel, optional
        The model (default: loaded as ``run.json`` records it).
    overwrite : bool
        Replace earlier check results in ``run_dir``.

    Returns
    -------
    dict
        The summary written to ``checks.json``: ``config``, ``model`` (its folder, kind and
        members, see :func:`_model_record`), ``lesions``, ``cost``, ``summary``.

    Raises
    ------
    InputError, ModelError, OutputError
    """
    import nibabel as nib
    import pandas as pd

    from .errors import OutputError
    from .explain import RUN_FILE
    from .io import atomic_write_text, load_images
    from .models import load_model
    from .models.checkpoint import load_checkpoint_model

    cfg = cfg or CheckConfig()
    cfg.validate()
    run_dir = Path(run_dir)
    rj = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise InputError(f"run folder {run_dir} does not exist")
    if not rj.is_file():
        raise InputError(f"{run_dir} is not a finished explain run (no {RUN_FILE})")
    if (run_dir / "checks.csv").exists() and not overwrite:
        raise OutputError(f"{run_dir} already holds checks.csv; use --overwrite to replace it")
    try:
        run = json.loads(rj.read_text())
        params = run["parameters"]
        inputs = run["inputs"]
        channels = run["model"]["channels"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{rj} is not a valid run file ({type(e).__name__}: {e})") from None
    if run.get("command", "explain") != "explain" or not (run_dir / "instances.nii.gz").is_file():
        raise InputError(f"{run_dir} is a {run.get('command', 'partial')} run, not an explain "
                         "run: `check` needs the output folder of `instance-saliency explain`")
    if model is None:
        folder = run["model"].get("folder")
        excluded = run["model"].get("excluded_subjects") or []
        spec = None if folder in (None, "shipped default") else folder
        opts = {k: params.get(k) for k in ("folds", "checkpoint", "mirroring", "step_size",
                                           "lesion_label")}
        if excluded and run["model"].get("kind") == "checkpoint":
            model = load_checkpoint_model(spec, "cpu", opts["mirroring"], excluded)
        else:
            model = load_model(spec, "cpu", **opts)
    recorded = {c: inputs.get(c.lower(), inputs.get({"MPRAGE": "mprage"}.get(c, c), {}))
                for c in channels}  # run.json's entry (path, sha256) of each channel
    roles = {c: e.get("path") for c, e in recorded.items()}
    missing = [c for c, p in roles.items() if not p or not Path(p).is_file()]
    if missing:
        raise InputError(f"{rj}: input image(s) {missing} not found at the recorded paths")
    from . import datasets

    sha = {c: e.get("sha256") for c, e in recorded.items()}
    changed = [c for c, h in sha.items() if h and datasets.sha256sum(roles[c]) != h]
    if changed:
        raise InputError(f"input image(s) {changed} of {run_dir} changed since explain ran "
                         "(SHA256 differs from run.json): the checks would not test these "
                         "maps; re-run explain first")
    subj = load_images([roles[c] for c in channels], channels, None)
    labels_img = np.asarray(nib.load(str(run_dir / "instances.nii.gz")).dataobj)
    table = pd.read_csv(run_dir / "instances.csv")
    table = table[table["source"] == "pred"] if "source" in table.columns else table
    if cfg.lesions:
        unknown = sorted(set(cfg.lesions) - set(table["label"]))
        if unknown:
            raise InputError(f"lesion label(s) {unknown} are not predicted lesions of this run")
        table = table[table["label"].isin(cfg.lesions)]
    if cfg.max_lesions is not None and len(table) > cfg.max_lesions:
        table = table.sort_values(["voxels", "label"], ascending=[False, True],
                                  kind="stable").head(int(cfg.max_lesions)).sort_values("label")
    prep = model.prepare(subj.image, subj.spacing, affine=subj.affine)
    spacing = prep.mapping.get("network_spacing") or list(subj.spacing)
    masks, labels, statuses = [], [], []
    for _, r in table.iterrows():
        m = prep.to_net(labels_img == int(r["label"]))
        if m.any():
            masks.append(m)
            labels.append(int(r["label"]))
            statuses.append(str(r["status"]))
    threshold = params.get("threshold") if params.get("decision", "threshold") == "threshold" \
        else None
    if isinstance(threshold, str):
        threshold = None
    t0 = time.time()
    rows, curves, cost = check_lesions(
        model, prep.x, masks, labels, statuses, spacing, cfg,
        cam_layer=params.get("cam_layer"), threshold=threshold,
        reduction=params.get("reduction", "sum"), progress=log)
    cost["total_s"] = round(time.time() - t0, 2)
    df = pd.DataFrame(rows)
    if "stages" in df.columns:  # an integer, empty on the rows of other checks
        df["stages"] = df["stages"].astype("Int64")
    cv = pd.DataFrame(curves)
    atomic_write_text(run_dir / "checks.csv", df.to_csv(index=False))
    atomic_write_text(run_dir / "check_curves.csv", cv.to_csv(index=False))
    summary = {"config": asdict(cfg), "model": _model_record(model, run), "lesions": labels,
               "inputs": {c: {"path": roles[c], "sha256": sha[c]} for c in channels},
               "cost": cost,
               "explain_total_s": run.get("timings_s", {}).get("total_s"),
               "summary": summarise(df)}
    if figures and len(cv):
        from .report.checks import write_checks_report

        write_checks_report(run_dir, df, cv, summary)
    atomic_write_text(run_dir / "checks.json", json.dumps(summary, indent=2, default=float) + "\n")
    log(f"checks on {len(labels)} lesion(s) written to {run_dir / 'checks.csv'} "
        f"({cost['total_s']:.0f} s)")
    return summary


def _model_record(model, run: dict) -> dict:
    """What ``checks.json`` records about the model the checks ran: the folder ``run.json``
    names, the members (ensemble member folders, each once, without the mirrorings) and, for
    checkpoint models, their training scans and the subjects whose members were left out."""
    members: list = []
    for m in getattr(model, "members", ()):
        base = str(m.name).split(" ")[0]
        if base not in members:
            members.append(base)
    info = getattr(model, "info", {}) or {}
    rec = {"folder": run.get("model", {}).get("folder"), "kind": getattr(model, "kind", None),
           "source": getattr(model, "source", None), "members": members}
    for key in ("members_trained_on", "excluded_subjects"):
        if key in info:
            rec[key] = info[key]
    return rec


def summarise(df) -> dict:
    """Per method: medians of the headline numbers of :func:`check_lesions` rows."""
    out: dict = {}
    if df is None or not len(df):
        return out
    for (check, method), g in df.groupby(["check", "method"]):
        d = out.setdefault(check, {}).setdefault(method, {"lesions": int(len(g))})
        for col in g.columns:
            if col in ("label", "status", "voxels", "method", "check", "stages",
                       "insertion_baseline"):
                continue
            v = g[col].astype(float)
            if v.notna().any():
                d[f"median_{col}"] = float(v.median())
    return out


# --------------------------------------------------------------------------- cohorts


#: settings of memory and speed only (as the cohort's): subjects checked with other values
#: are not "other settings" (e.g. sw_batch_size 4, the default before it became 2)
_NEUTRAL = {"sw_batch_size"}


def check_cohort(cohort_dir: str | Path, cfg: CheckConfig | None = None, *,
                 overwrite: bool = False, log=print, figures: bool = True) -> list[str]:
    """Run :func:`run_checks` on every finished subject of a cohort folder
    (``subjects/<subject>/run.json``); subjects that already hold ``checks.csv`` are skipped
    (re-running resumes), unless ``overwrite``.

    Returns
    -------
    list of str
        The subjects checked by this call.

    Raises
    ------
    InputError
        No finished subject in the folder.
    """
    root = Path(cohort_dir) / "subjects"
    subjects = sorted(p.parent.name for p in root.glob("*/run.json")) if root.is_dir() else []
    if not subjects:
        raise InputError(f"{cohort_dir} holds no finished subject (subjects/<name>/run.json)")
    cfg = cfg or CheckConfig()
    wanted = json.loads(json.dumps(asdict(cfg), default=list))
    done, skipped = [], []
    for s in subjects:  # refuse mixing settings before any work, as cohort does
        d = root / s
        if (d / "checks.csv").is_file() and not overwrite:
            try:
                had = json.loads((d / "checks.json").read_text()).get("config")
            except (OSError, json.JSONDecodeError, AttributeError):
                had = None
            diff = sorted(k for k in wanted if k not in _NEUTRAL
                          and (had is None or had.get(k) != wanted[k]))
            if diff:
                raise InputError(f"subject {s} in {cohort_dir} was checked with other settings "
                                 f"({', '.join(diff)}); use the same options or --overwrite")
    for s in subjects:
        d = root / s
        if (d / "checks.csv").is_file() and not overwrite:
            skipped.append(s)
            continue
        log(f"checks: subject {s}")
        run_checks(d, cfg, overwrite=overwrite, log=log, figures=figures)
        done.append(s)
    if skipped:
        log(f"checks: {len(skipped)} subject(s) already checked with these settings, kept: "
            f"{', '.join(skipped)}")
    return done


def pool_checks(cohort_dir: str | Path, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Pool the subjects' ``checks.csv`` of a cohort: per method and check, medians with
    subject-bootstrap 95 % CIs, and the methods compared pairwise on the same lesions.

    Returns ``None`` when no subject has checks. Pass rules (stated in the report): the
    randomisation check passes when the upper CI bound of the median Spearman ``|map|``
    similarity at full randomisation is below 0.5; the deletion check passes when the lower CI
    bound of the median AOPC minus random order (background baseline) is above 0.

    Pairwise: per lesion, the difference of the two methods' deletion AOPC (background
    baseline), its median with a subject-bootstrap CI, and a Wilcoxon signed-rank p-value.
    """
    import pandas as pd
    from scipy.stats import wilcoxon

    from .stats import subject_bootstrap

    files = sorted(Path(cohort_dir).glob("subjects/*/checks.csv"))
    if not files:
        return None
    parts = []
    for f in files:
        d = pd.read_csv(f)
        d.insert(0, "subject", f.parent.name)
        parts.append(d)
    df = pd.concat(parts, ignore_index=True)
    out: dict = {"n_subjects": len(files), "methods": {}, "pairwise": []}

    def med(sub: pd.DataFrame, col: str) -> dict:
        v = sub[col].to_numpy(float)
        ok = np.isfinite(v)
        r = subject_bootstrap(sub["subject"].to_numpy()[ok],
                              lambda idx, w=v[ok]: float(np.median(w[idx])) if len(idx)
                              else float("nan"), n_boot=n_boot, seed=seed)
        return {"median": r["estimate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                "n_lesions": int(ok.sum())}

    for method, g in df.groupby("method"):
        m: dict = {}
        ra = g[g["check"] == "randomisation"]
        if len(ra) and ra["spearman_abs_full"].notna().any():
            m["randomisation_spearman_abs"] = med(ra, "spearman_abs_full")
            m["randomisation_ssim"] = med(ra, "ssim_full")
            hi = m["randomisation_spearman_abs"]["ci_high"]
            m["randomisation_passes"] = bool(hi < 0.5) if np.isfinite(hi) else None
        de = g[g["check"] == "deletion"]
        if len(de) and "aopc_background_minus_random" in de and \
                de["aopc_background_minus_random"].notna().any():
            m["deletion_aopc_minus_random"] = med(de, "aopc_background_minus_random")
            if "aopc_road_minus_random" in de and de["aopc_road_minus_random"].notna().any():
                m["deletion_road_aopc_minus_random"] = med(de, "aopc_road_minus_random")
            if de["insertion"].notna().any():
                m["insertion"] = med(de, "insertion")
            lo = m["deletion_aopc_minus_random"]["ci_low"]
            m["deletion_passes"] = bool(lo > 0) if np.isfinite(lo) else None
        co = g[g["check"] == "context"]
        if len(co):
            if co["recovery_mm"].notna().any():
                m["context_recovery_mm"] = med(co, "recovery_mm")
            m["context_not_recovered"] = int(co["recovery_mm"].isna().sum())
            m["context_lesions"] = int(len(co))
            if "dice_at_max" in co and co["dice_at_max"].notna().any():
                m["context_dice_at_max"] = med(co, "dice_at_max")
        out["methods"][method] = m
    de = df[df["check"] == "deletion"]
    if "aopc_background" in de:
        wide = de.pivot_table(index=["subject", "label"], columns="method",
                              values="aopc_background")
        cols = list(wide.columns)
        for i, a in enumerate(cols):
            for b in cols[i + 1:]:
                pair = wide[[a, b]].dropna()
                if len(pair) < 2:
                    continue
                diff = (pair[a] - pair[b]).to_numpy(float)
                subj = pair.index.get_level_values(0).to_numpy()
                r = subject_bootstrap(subj, lambda idx, w=diff: float(np.median(w[idx])),
                                      n_boot=n_boot, seed=seed)
                try:
                    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
                except ValueError:
                    p = float("nan")
                out["pairwise"].append({"a": a, "b": b, "n_lesions": int(len(diff)),
                                        "median_aopc_difference": r["estimate"],
                                        "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                        "wilcoxon_p": p})
    return out


def checks_markdown(pooled: dict | None) -> str:
    """The ``stats.md`` section of :func:`pool_checks` (plain sentences and a table)."""
    if not pooled:
        return ""
    from .report.checks import _LABELS

    def f(x):
        return "NaN" if x is None or not np.isfinite(x) else f"{x:.3g}"

    def ci(d):
        lo, hi = d.get("ci_low"), d.get("ci_high")
        if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
            return f"{f(d['median'])} [CI not estimable] (n = {d['n_lesions']})"
        return f"{f(d['median'])} [{f(lo)}, {f(hi)}] (n = {d['n_lesions']})"

    lines = ["## Can the maps be trusted? Per-lesion checks", "",
             f"{pooled['n_subjects']} subject(s) with `instance-saliency check` results; "
             "medians with subject-bootstrap 95 % CIs.", "",
             "| method | Spearman abs(map), full randomisation | SSIM, full randomisation | "
             "deletion AOPC − random (background) | deletion AOPC − random (ROAD) | insertion |",
             "|---|---|---|---|---|---|"]
    for method, m in pooled["methods"].items():
        if method == "model":
            continue
        cells = [ci(m[k]) if k in m else "–" for k in
                 ("randomisation_spearman_abs", "randomisation_ssim",
                  "deletion_aopc_minus_random", "deletion_road_aopc_minus_random", "insertion")]
        lines.append(f"| {_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    lines.append("")
    for method, m in pooled["methods"].items():
        if method == "model":
            continue
        lab = _LABELS.get(method, method)
        verdict = {True: "passes", False: "does not pass",
                   None: "cannot be judged (CI not estimable: too few subjects) on"}
        if "randomisation_passes" in m:
            lines.append(f"- {lab} {verdict[m['randomisation_passes']]} the randomisation "
                         "check (rule: upper CI bound of the median Spearman abs(map) "
                         "similarity below 0.5).")
        if "deletion_passes" in m:
            lines.append(f"- {lab} {verdict[m['deletion_passes']]} the deletion check (rule: "
                         "lower CI bound of the median AOPC minus random order above 0).")
    cm = pooled["methods"].get("model", {})
    ctx = cm.get("context_recovery_mm")
    if ctx:
        lines.append(f"- Context: median distance at which detection recovers {ci(ctx)} mm "
                     "(seed paper: about 7 mm).")
    if cm.get("context_lesions"):
        lines.append(f"- Context: {cm['context_not_recovered']} of {cm['context_lesions']} TP "
                     "lesion(s) not detected even with the largest context shell tested.")
    for p in pooled["pairwise"]:
        lines.append(f"- Deletion AOPC, {_LABELS.get(p['a'], p['a'])} − "
                     f"{_LABELS.get(p['b'], p['b'])}: median {f(p['median_aopc_difference'])} "
                     f"[{f(p['ci_low'])}, {f(p['ci_high'])}], Wilcoxon p = {f(p['wilcoxon_p'])}"
                     f" (n = {p['n_lesions']} lesions).")
    return "\n".join(lines) + "\n"
