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
    """

    net: torch.nn.Module
    flip: tuple = ()
    weight: float = 1.0
    name: str = ""
    _module: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def module(self) -> torch.nn.Module:
        """The member as a module: the network, or the network between two flips."""
        if self._module is None:
            self._module = Mirrored(self.net, self.flip) if self.flip else self.net
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


def ensemble_members(nets: Sequence[tuple[str, torch.nn.Module]], mirror_axes: Sequence[int] = ()
                     ) -> list[Member]:
    """Members of a fold ensemble with test-time mirroring: equal weights
    ``1 / (n_folds × n_mirror_combinations)``, as nnU-Net averages (mirrorings within a fold,
    then folds)."""
    combos = mirror_combinations(mirror_axes)
    w = 1.0 / (len(nets) * len(combos))
    return [Member(net, c, w, f"{name}" + (f" mirror {c}" if c else ""))
            for name, net in nets for c in combos]


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
