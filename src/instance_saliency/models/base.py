"""The one interface every kind of model presents to the rest of the package.

A model is more than a network: a lesion's logits, and so its exact gradient, depend on the
whole prediction procedure — preprocessing, window positions and blending, test-time mirroring
and the ensemble of folds. :class:`SegmentationModel` describes that procedure once:

* ``channels`` — the input channels by name, in order;
* ``prepare(image, spacing)`` — the network's input (:class:`Prepared`) and the maps between
  the user's grid and the network's grid;
* ``grid(shape)`` — the sliding-window positions and blending weights
  (:class:`~instance_saliency.inference.WindowGrid`);
* ``members`` — networks whose logits are averaged with fixed weights (folds × mirrorings);
  each :class:`Member` is a plain ``torch.nn.Module`` (a mirrored member flips its input and
  output), so the saliency engine differentiates each exactly and averages;
* ``network`` — one module computing the weighted average of the members (for prediction).

Mirroring and fold averaging are linear in the members' logits, so an instance target (a sum of
logits) of the ensemble is the weighted sum of the members' targets and its input gradient the
weighted sum of their gradients.

Ensemble members whose input standard differs (histogram standardisation learnt on different
training scans, :func:`instance_saliency.io.standardise_histogram`) see the ensemble's common
standard through :class:`HistogramRemap`, a fixed piecewise-linear map that reproduces each
member's own standardisation exactly, so the ensemble stays one differentiable function of one
input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError


class Mirrored(torch.nn.Module):
    """``flip(net(flip(x, axes)), axes)``: a network applied to a mirrored input, its output
    mirrored back (nnU-Net's test-time mirroring, one axis combination).

    Parameters
    ----------
    net : torch.nn.Module
        ``(B, C, X, Y, Z) -> (B, K, X, Y, Z)``.
    axes : tuple of int
        Spatial axes (0, 1, 2) to flip.
    """

    def __init__(self, net: torch.nn.Module, axes: Sequence[int]):
        super().__init__()
        self.net = net
        self.axes = tuple(int(a) for a in axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [a + 2 for a in self.axes]
        return torch.flip(self.net(torch.flip(x, dims)), dims)


class HistogramRemap(torch.nn.Module):
    """Voxel-wise, piecewise-linear map of a histogram-standardised input from one standard
    scale onto another, keeping exact zeros (background) at zero.

    Nyúl standardisation (:func:`instance_saliency.io.standardise_histogram`) maps an image's
    landmarks ``l`` piecewise linearly onto a standard ``s`` (end segments extended). Two
    standards ``s`` and ``t`` applied to the same image differ by the fixed map
    ``s_i -> t_i`` (same segments, end slopes extended), whatever the image: so an ensemble
    member trained on standard ``t`` receives exactly its own input when the ensemble's input
    is standardised on ``s`` and passed through this map. (For noisy inputs, e.g. SmoothGrad
    copies, background voxels are no longer exactly zero and are mapped like any other value:
    the ensemble is then the function ``mean_k net_k(remap_k(x))``, differentiated exactly.)

    Parameters
    ----------
    source, target : array-like, shape (C, L)
        Increasing landmarks per channel of the input's standard and the member's standard.

    Raises
    ------
    ValueError
        Shapes differ or a row is not strictly increasing.
    """

    def __init__(self, source, target):
        super().__init__()
        src = torch.as_tensor(np.asarray(source, dtype=np.float64))
        dst = torch.as_tensor(np.asarray(target, dtype=np.float64))
        if src.shape != dst.shape or src.ndim != 2 or src.shape[1] < 2:
            raise ValueError(f"landmarks must be two (C, L) arrays, got {tuple(src.shape)} "
                             f"and {tuple(dst.shape)}")
        if bool((src.diff(dim=1) <= 0).any()) or bool((dst.diff(dim=1) <= 0).any()):
            raise ValueError("landmarks must increase along each row")
        slope = dst.diff(dim=1) / src.diff(dim=1)  # (C, L-1)
        self.register_buffer("src", src.float().contiguous())
        self.register_buffer("dst", dst.float().contiguous())
        self.register_buffer("slope", slope.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``."""
        if x.shape[1] != self.src.shape[0]:
            raise ValueError(f"input has {x.shape[1]} channels, the remap {self.src.shape[0]}")
        out = []
        n_seg = self.slope.shape[1]
        for c in range(x.shape[1]):
            v = x[:, c]
            # segment index: 0 below the 2nd landmark, n_seg - 1 above the last but one
            seg = torch.bucketize(v.detach().contiguous(), self.src[c, 1:-1].contiguous(), right=True)
            seg = seg.clamp(0, n_seg - 1)
            y = self.dst[c][seg] + (v - self.src[c][seg]) * self.slope[c][seg]
            out.append(torch.where(v == 0, torch.zeros_like(y), y))
        return torch.stack(out, 1)


class _Chain(torch.nn.Module):
    """``second(first(x))``."""

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@dataclass
class Member:
    """One term of an ensemble: a network, the axes it mirrors, and its weight.

    Attributes
    ----------
    net : torch.nn.Module
        The underlying network (the Grad-CAM++ layer is looked up in it).
    flip : tuple of int
        Spatial axes mirrored (empty: the plain network).
    weight : float
        Weight of this member's logits in the average (weights sum to 1).
    name : str
        E.g. ``"fold_0"`` or ``"fold_0 mirror (0, 2)"``.
    input_map : torch.nn.Module, optional
        Voxel-wise map applied to the ensemble's input before this member
        (:class:`HistogramRemap` when the member's input standard differs).
    """

    net: torch.nn.Module
    flip: tuple = ()
    weight: float = 1.0
    name: str = ""
    input_map: torch.nn.Module | None = None
    _module: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def module(self) -> torch.nn.Module:
        """The member as a module: the network, or the network between two flips, after the
        input map if any (voxel-wise, so it commutes with the flips)."""
        if self._module is None:
            m = Mirrored(self.net, self.flip) if self.flip else self.net
            self._module = _Chain(self.input_map, m) if self.input_map is not None else m
        return self._module


def distinct_networks(members: Sequence[Member]) -> list[torch.nn.Module]:
    """The underlying networks of ``members``, each once, in order (one per fold)."""
    out, seen = [], set()
    for m in members:
        if id(m.net) not in seen:
            seen.add(id(m.net))
            out.append(m.net)
    return out


class EnsembleNetwork(torch.nn.Module):
    """Weighted average of the members' logits, window by window.

    Equal to averaging the members' sliding-window logits, because every member uses the same
    windows and blending weights and the blend is linear.
    """

    def __init__(self, members: Sequence[Member]):
        super().__init__()
        self.members = list(members)
        # register each distinct network once (parameters, .to(), .eval())
        self.nets = torch.nn.ModuleList(distinct_networks(self.members))
        maps = {id(m.input_map): m.input_map for m in self.members if m.input_map is not None}
        self.input_maps = torch.nn.ModuleList(maps.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for m in self.members:
            y = m.module(x) * m.weight
            out = y if out is None else out + y
        return out


def mirror_combinations(axes: Sequence[int]) -> list[tuple]:
    """The plain prediction and every non-empty combination of ``axes``, in nnU-Net's order.

    ``[(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]`` for ``axes = (0, 1, 2)``.
    """
    import itertools

    axes = [int(a) for a in axes]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def ensemble_members(nets: Sequence[tuple], mirror_axes: Sequence[int] = ()
                     ) -> list[Member]:
    """Members of a fold ensemble with test-time mirroring: equal weights
    ``1 / (n_folds × n_mirror_combinations)``, as nnU-Net averages (mirrorings within a fold,
    then folds).

    Parameters
    ----------
    nets : sequence of (name, module) or (name, module, input_map)
        One entry per fold; ``input_map`` (or None) is the fold's :attr:`Member.input_map`.
    mirror_axes : sequence of int
        Spatial axes whose flip combinations are averaged (:func:`mirror_combinations`).
    """
    combos = mirror_combinations(mirror_axes)
    w = 1.0 / (len(nets) * len(combos))
    out = []
    for entry in nets:
        name, net = entry[0], entry[1]
        imap = entry[2] if len(entry) > 2 else None
        out += [Member(net, c, w, f"{name}" + (f" mirror {c}" if c else ""), imap)
                for c in combos]
    return out


@dataclass
class Prepared:
    """A scan in the network's space, and the maps back and forth.

    Attributes
    ----------
    x : ndarray, shape (C, *net_shape), float32
        The network's input (normalised; for nnU-Net also transposed, cropped, resampled).
    user_shape : tuple of int
        Spatial shape of the user's grid ``(X, Y, Z)``.
    to_net : callable
        ``(X, Y, Z) bool mask -> (*net_shape) bool``: an instance's voxels on the network grid.
    to_user : callable
        ``(K, *net_shape) array -> (K, X, Y, Z) float32``: a map (saliency, per channel) back on
        the user's grid; zero outside the region the network saw.
    probabilities : callable
        ``(K, *net_shape) logits -> (K, X, Y, Z) float32`` class probabilities on the user's
        grid, exactly as the model's own pipeline computes them.
    exact : bool
        True when network and user voxels correspond one to one (no resampling): instance
        targets and maps are then exact; otherwise the mapping is described in ``mapping``.
    mapping : dict
        How the grids relate (recorded in ``run.json``).
    """

    x: np.ndarray
    user_shape: tuple
    to_net: Callable
    to_user: Callable
    probabilities: Callable
    exact: bool = True
    mapping: dict = field(default_factory=dict)


def identity_prepared(x: np.ndarray) -> Prepared:
    """A :class:`Prepared` whose network grid is the user's grid (our checkpoints)."""
    shape = tuple(x.shape[1:])

    def probs(logits):
        t = torch.as_tensor(logits)
        return torch.softmax(t.float(), 0).cpu().numpy().astype(np.float32)

    return Prepared(np.ascontiguousarray(x, dtype=np.float32), shape,
                    lambda m: np.asarray(m, bool), lambda a: np.asarray(a, np.float32), probs,
                    True, {"grid": "the input grid (no resampling, no cropping)"})


class SegmentationModel:
    """A lesion segmentation model as the rest of the package sees it.

    Attributes
    ----------
    kind : str
        ``"checkpoint"`` (our format), ``"module"`` (any torch module) or ``"nnunet"``.
    source : str
        Where it came from (folder, or a description).
    channels : list of str
        Input channel names, in order.
    class_names : list of str
        Output channel names.
    lesion_class : int
        Output channel of the lesion logit.
    threshold : float
        Lesion probability threshold (2 classes); with more classes the mask is the argmax.
    decision : {"threshold", "argmax"}
        How the binary lesion mask is made from the probabilities.
    members : list of Member
        Networks averaged in logit space (weights sum to 1).
    cam_layer : str or None
        Default Grad-CAM++ layer (a module name inside each member's network).
    roi_size : tuple of int
        Sliding-window size on the network's grid.
    """

    kind = "module"

    def __init__(self, members: Sequence[Member], channels: Sequence[str], *, source: str = "",
                 class_names: Sequence[str] = ("background", "lesion"), lesion_class: int = 1,
                 threshold: float = 0.5, decision: str = "threshold",
                 cam_layer: str | None = None, roi_size: Sequence[int] = (96, 96, 96),
                 overlap: float = 0.25, info: dict | None = None,
                 normalisation: str = "zscore_nonzero", landmarks=None):
        if not members:
            raise ValueError("a model needs at least one member network")
        self.members = list(members)
        self.channels = list(channels)
        self.source = source
        self.class_names = list(class_names)
        self.lesion_class = int(lesion_class)
        self.threshold = float(threshold)
        self.decision = decision
        self.cam_layer = cam_layer
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.normalisation = normalisation
        self.landmarks = landmarks
        self.info = dict(info or {})
        self._network = EnsembleNetwork(self.members) if len(self.members) > 1 else None
        self.warnings: list[str] = []

    # --- what every kind provides --------------------------------------------------------
    def prepare(self, image: np.ndarray, spacing: Sequence[float], affine=None) -> Prepared:
        """The network input for a raw ``(C, X, Y, Z)`` image (channel order :attr:`channels`):
        the model's normalisation (:func:`instance_saliency.io.normalise`; by default the
        per-channel z-score over non-zero voxels), on the image's own grid.

        Raises
        ------
        InputError
            The image's channel count differs from the model's.
        """
        from ..io import normalise

        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != len(self.channels):
            raise InputError(f"model {self.source} expects {len(self.channels)} channel(s) "
                             f"{self.channels}, got an image of shape {image.shape}")
        return identity_prepared(normalise(image, self.normalisation, self.landmarks))

    def grid(self, shape: Sequence[int]):
        """Sliding-window grid on the network's grid of spatial ``shape``."""
        from ..inference import WindowGrid

        return WindowGrid.create(shape, self.roi_size, self.overlap)

    # --- derived -------------------------------------------------------------------------
    @property
    def network(self) -> torch.nn.Module:
        """One module averaging the members (the member itself when there is one)."""
        return self._network if self._network is not None else self.members[0].module

    @property
    def networks(self) -> list[torch.nn.Module]:
        """The distinct underlying networks (one per fold)."""
        return distinct_networks(self.members)

    def to(self, device) -> "SegmentationModel":
        for n in self.networks:
            n.to(device)
        for m in self.members:
            if m.input_map is not None:
                m.input_map.to(device)
        return self

    def eval(self) -> "SegmentationModel":
        for n in self.networks:
            n.eval()
        return self

    def segment(self, probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Binary lesion mask ``(X, Y, Z)`` from class probabilities ``(K, X, Y, Z)``."""
        k = self.lesion_class
        if self.decision == "argmax" and threshold is None:
            return np.argmax(probabilities, 0) == k
        thr = self.threshold if threshold is None else threshold
        return probabilities[k] >= thr

    def describe(self) -> dict:
        """What ``run.json`` records about the model."""
        return {"kind": self.kind, "source": self.source, "channels": self.channels,
                "class_names": self.class_names, "lesion_class": self.lesion_class,
                "threshold": self.threshold, "decision": self.decision,
                "members": [{"name": m.name, "flip": list(m.flip), "weight": m.weight}
                            for m in self.members],
                "roi_size": list(self.roi_size), "cam_layer": self.cam_layer,
                "warnings": self.warnings, **self.info}


def members_of(model) -> list[Member]:
    """Members of a :class:`SegmentationModel`, or one plain member for a torch module."""
    if isinstance(model, SegmentationModel):
        return model.members
    if isinstance(model, torch.nn.Module):
        return [Member(model, (), 1.0, "model")]
    raise TypeError(f"expected a torch.nn.Module or SegmentationModel, got {type(model).__name__}")


def as_module(model) -> torch.nn.Module:
    """The averaging module of a :class:`SegmentationModel`, or the module itself."""
    return model.network if isinstance(model, SegmentationModel) else model


def check_lesion_class(model: SegmentationModel, n_outputs: int) -> None:
    if n_outputs <= model.lesion_class:
        raise InputError(f"model returns {n_outputs} output channels; lesion class "
                         f"{model.lesion_class} does not exist")
