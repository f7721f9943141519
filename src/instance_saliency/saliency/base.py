"""Shared machinery of the saliency methods: model-state guard, hooks, noise.

Conventions (CONVENTIONS.md §4–5): maps are signed and unnormalised (units: logit per unit of
normalised intensity); hooks live inside a context manager and are removed in ``finally``; the
caller's model (train/eval flags, ``requires_grad``, ``.grad``) and input are left exactly as
they were, after success and after an exception.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def model_state_guard(model: torch.nn.Module, eval_mode: bool = True) -> Iterator[torch.nn.Module]:
    """Run saliency on ``model`` and restore its state afterwards, even after an error.

    Inside the block the model is in eval mode (when ``eval_mode``; saliency is meant for the
    model as used for prediction) and its parameters do not require gradients (only input
    gradients are taken). On exit each module's ``training`` flag, each parameter's
    ``requires_grad`` and ``.grad`` are restored.
    """
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        if eval_mode:
            model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for m, t in training.items():
            m.training = t
        for p, r, g in zip(params, req, grads):
            p.requires_grad_(r)
            p.grad = g


@contextlib.contextmanager
def models_state_guard(model, eval_mode: bool = True):
    """:func:`model_state_guard` over every distinct network of a model (a torch module, or a
    :class:`~instance_saliency.models.SegmentationModel` with several folds)."""
    from ..models.base import distinct_networks, members_of

    with contextlib.ExitStack() as stack:
        for n in distinct_networks(members_of(model)):
            stack.enter_context(model_state_guard(n, eval_mode))
        yield model


@contextlib.contextmanager
def capture_activations(module: torch.nn.Module) -> Iterator[list]:
    """Record the output of ``module`` on every forward pass inside the block.

    The recorded activation ``a`` is a copy of the output, and the hook returns a further
    copy of ``a`` for the rest of the network to consume. In-place operations later in the
    network (e.g. ``LeakyReLU(inplace=True)`` in nnU-Net-style nets, directly after a norm
    layer) therefore modify only that second copy: ``a`` keeps the layer's values, gradients
    with respect to ``a`` are exact, and an in-place op never hits a leaf that requires
    gradients. The hook is removed in ``finally``.
    """
    store: list = []

    def hook(_mod, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"layer output is {type(out).__name__}, not a tensor")
        if out.requires_grad:
            act = out.clone()  # stays connected to the graph upstream
        else:  # a leaf when nothing upstream needs gradients
            act = out.detach().clone().requires_grad_(torch.is_grad_enabled())
        store.append(act)
        return act.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def resolve_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The sub-module called ``name`` (as in ``model.named_modules()``).

    Raises
    ------
    ValueError
        No such module; the message lists a few valid names.
    """
    mods = dict(model.named_modules())
    if name not in mods:
        some = [n for n in mods if n][:8]
        raise ValueError(f"model has no layer {name!r}; e.g. {some}")
    return mods[name]


def noise_sigma(x: torch.Tensor, noise_level: float, per_channel: bool = False) -> torch.Tensor:
    """SmoothGrad noise standard deviation, shape ``(C,)``.

    ``σ = noise_level × (max − min)`` of the FLAIR channel (channel 0) of the normalised input,
    applied to every channel (seed code); with ``per_channel`` each channel uses its own range.
    Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise", Sec. 3.
    """
    C = x.shape[0]
    flat = x.reshape(C, -1)
    rng = flat.max(1).values - flat.min(1).values
    if per_channel:
        return noise_level * rng
    return (noise_level * rng[0]).repeat(C)


def prefetch(tensors: Iterator[torch.Tensor], device, depth: int = 2) -> Iterator[torch.Tensor]:
    """Yield the tensors of ``tensors`` moved to ``device``, in order, the next ``depth`` ones
    made in a background thread meanwhile (pinned and copied without blocking on CUDA).

    For a GPU run: the noise is drawn on the CPU (one seeded generator, so the samples do not
    depend on the device) while the GPU works on the previous sample. The values are those of
    ``tensors``; an exception in the thread is raised here.
    """
    import queue
    import threading

    device = torch.device(device)
    q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for t in tensors:
                if device.type == "cuda":
                    t = t.pin_memory()
                if not put(t):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=work, name="instance-saliency-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item.to(device, non_blocking=device.type == "cuda")
    finally:
        stop.set()


def draw_noise(shape: tuple, sigma: torch.Tensor, n: int, seed: int,
               device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Yield ``n`` noise tensors of ``shape`` = ``(C, *spatial)``, one per sample, in order.

    Samples are drawn one after another from one seeded CPU generator, so sample ``s`` is the
    same whatever chunk size processes it.
    """
    g = torch.Generator().manual_seed(int(seed))
    sig = sigma.reshape((-1,) + (1,) * (len(shape) - 1)).cpu()
    for _ in range(n):
        yield (torch.randn(shape, generator=g) * sig).to(device)
