#!/usr/bin/env python
"""Benchmark: exact instance SmoothGrad of an nnU-Net v2 model vs the per-lesion loop a user
would write around nnU-Net's predictor.

nnU-Net's ``nnUNetPredictor`` runs under ``torch.inference_mode``, so a user who wants the
gradient of one lesion's summed logit re-implements its prediction with autograd: the whole
(cropped) scan through every sliding window (nnU-Net's ``compute_steps_for_sliding_window`` and
``compute_gaussian``), every mirroring and every fold, then one backward pass — once per lesion
and noise sample. ``instance_saliency.saliency.smoothgrad`` gives the same maps while running
only the windows that touch the lesions, one forward per window and member shared by all K
lesions. Both use the same noise tensors (in nnU-Net's normalised space).

Run (from the checkout; the default model is the tiny real nnU-Net fixture of the tests)::

    INSTANCE_SALIENCY_DATA=../shared/data python benchmarks/bench_nnunet.py --k 8 --n 1

The last line is machine-readable::

    RESULT nnunet_exact_speedup=<x> max_rel_diff=<x> k=<K> n=<N>
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = next(iter(sorted((HERE.parent / "tests" / "data" / "nnunet").glob(
    "Dataset501*/*__*__3d_fullres"))), None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL else None,
                   help="nnU-Net v2 trained-model folder (default: the test fixture)")
    p.add_argument("--subject", default="patient07")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--k", type=int, default=8, help="lesions (the K largest predicted)")
    p.add_argument("--n", type=int, default=1, help="noise samples")
    p.add_argument("--folds", nargs="+", default=None)
    p.add_argument("--no-mirroring", action="store_true")
    p.add_argument("--crop", default="112,128,112",
                   help="central crop of the scan around its lesions (x,y,z voxels; 'full' = "
                        "whole scan). The loop keeps every window's graph in memory.")
    p.add_argument("--noise-level", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def loop_logits(model, x: torch.Tensor, grid) -> torch.Tensor:
    """Differentiable nnU-Net prediction of (1, C, *shape): all windows, members averaged."""
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian, compute_steps_for_sliding_window)

    patch = tuple(model.roi_size)
    shape = tuple(x.shape[2:])
    padded = tuple(max(p, s) for p, s in zip(patch, shape))
    lo = [(p - s) // 2 for p, s in zip(padded, shape)]
    pads = []
    for p, s, b in reversed(list(zip(padded, shape, lo))):
        pads += [b, p - s - b]
    xp = torch.nn.functional.pad(x, pads)
    g = compute_gaussian(patch, 1 / 8, 10, dtype=torch.float32, device="cpu")
    acc = torch.zeros((1, len(model.class_names)) + padded)
    n = torch.zeros(padded)
    for st in itertools.product(*compute_steps_for_sliding_window(padded, patch,
                                                                  model.step_size)):
        sl = tuple(slice(a, a + p) for a, p in zip(st, patch))
        xw = xp[(slice(None), slice(None)) + sl]
        out = sum(m.weight * m.module(xw) for m in model.members)
        acc[(slice(None), slice(None)) + sl] = acc[(slice(None), slice(None)) + sl] + out * g
        n[sl] += g
    return (acc / n)[(slice(None), slice(None))
                     + tuple(slice(b, b + s) for b, s in zip(lo, shape))]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from instance_saliency import datasets
    from instance_saliency.inference import sliding_window_logits
    from instance_saliency.instances import find_instances
    from instance_saliency.io import load_images
    from instance_saliency.models import load_model
    from instance_saliency.models.channels import canonical
    from instance_saliency.saliency import smoothgrad
    from instance_saliency.saliency.base import noise_sigma
    from instance_saliency.targets import InstanceTarget

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(a.model, folds=a.folds, mirroring=False if a.no_mirroring else None)
    data_dir = a.data_dir or os.environ.get("INSTANCE_SALIENCY_DATA")
    files = datasets.fetch_subject(a.subject, data_dir)
    by_key = {"flair": files["flair"], "t1": files["mprage"]}
    subj = load_images([by_key[canonical(c)] for c in model.channels], model.channels,
                       files["mask"])
    image, mask = subj.image, subj.mask
    if a.crop != "full":
        size = [int(v) for v in a.crop.split(",")]
        c = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else \
            np.array(image.shape[1:]) // 2
        box = tuple(slice(max(0, min(int(ci) - s // 2, n - s)), max(0, min(int(ci) - s // 2,
                          n - s)) + s) for ci, s, n in zip(c, size, image.shape[1:]))
        image, mask = image[(slice(None),) + box], mask[box]
    prep = model.prepare(image, subj.spacing)
    x = torch.from_numpy(prep.x)
    grid = model.grid(x.shape[1:])
    t0 = time.perf_counter()
    with torch.no_grad():
        probs = prep.probabilities(sliding_window_logits(model.network, x[None], grid)[0].numpy())
    t_pred = time.perf_counter() - t0
    iset = find_instances(model.segment(probs), mask, np.eye(4), subj.spacing, min_size=3)
    pred = sorted((i for i in iset if i.source == "pred"), key=lambda i: -i.voxels)[:a.k]
    if not pred:
        raise SystemExit("no predicted lesion in the crop")
    targets = [InstanceTarget(prep.to_net(iset.mask(i)), model.lesion_class) for i in pred]
    sigma = noise_sigma(x, a.noise_level)
    gen = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((a.n,) + tuple(x.shape), generator=gen) * sigma.reshape(-1, 1, 1, 1)
    for net in model.networks:
        for p in net.parameters():
            p.requires_grad_(False)
    # warm-up outside the timed regions
    wx = torch.zeros((1, x.shape[0]) + tuple(model.roi_size), requires_grad=True)
    torch.autograd.grad(model.network(wx).sum(), wx)

    t0 = time.perf_counter()
    ours = smoothgrad(model, x, targets, grid=grid, noise=noise)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    loop = []
    for tg in targets:
        acc = torch.zeros_like(x)
        m = torch.from_numpy(tg.mask)
        for s in range(a.n):
            xr = (x + noise[s])[None].requires_grad_(True)
            score = loop_logits(model, xr, grid)[0, model.lesion_class][m].sum()
            (g,) = torch.autograd.grad(score, xr)
            acc += g[0]
        loop.append((acc / a.n).numpy())
    t_loop = time.perf_counter() - t0

    rel = max(float(np.abs(o.maps["mean"].to_dense() - l).max() / np.abs(l).max())
              for o, l in zip(ours, loop))
    print(f"model {Path(a.model).name} ({model.info['network_class'].split('.')[-1]}, folds "
          f"{model.info['folds']}, mirror axes {model.info['mirror_axes']}, "
          f"{len(model.members)} members); scan {a.subject} crop {a.crop} -> network grid "
          f"{tuple(x.shape[1:])}, {grid.n_windows} windows; prediction {t_pred:.1f} s")
    print(f"K = {len(targets)} lesions ({[i.voxels for i in pred]} voxels), N = {a.n}: "
          f"exact window-sparse {t_ours:.1f} s ({sum(r.n_windows for r in ours)} lesion-window "
          f"pairs), per-lesion loop {t_loop:.1f} s")
    print(f"RESULT nnunet_exact_speedup={t_loop / t_ours:.2f} max_rel_diff={rel:.2e} "
          f"k={len(targets)} n={a.n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
