#!/usr/bin/env python
"""GPU check: exact instance SmoothGrad + Grad-CAM++ of every lesion of the demo scan on one GPU.

On the demo scan (``patient07`` of open_ms_data, 182×218×182) with the shipped model, in exact
(sliding-window) mode, for each precision of ``--precisions`` (default fp32 and bf16):

1. prediction (sliding window, fp32), instances (prediction and ground truth: TP, FP, FN, as
   ``explain`` does), the sums of the Grad-CAM++ layer recorded on the way;
2. SmoothGrad with N = ``--n`` (default 50, the seed paper's) for **all** lesions, then
   Grad-CAM++ for all lesions, on ``--device`` (default cuda);

and prints the wall time of each step (``torch.cuda.synchronize`` around it), the total
(prediction + SmoothGrad + Grad-CAM++) next to the goal (under 60 s in fp32 on one
data-centre GPU), the peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each
precision) and, for ``--ref-lesions`` lesions (default 3: the largest), the maximum relative
difference ``max |gpu − cpu| / max |cpu|`` of the maps against the same maps computed on the
CPU (fp32, the same noise: it is drawn on the CPU from one seeded generator whatever the
device). The CPU reference is computed for those lesions only, to keep the time.

``--dry-run`` runs the same code on the CPU in seconds: a 48³ crop around the largest
ground-truth lesion, a 48³ window, N = 2, at most 3 lesions, 2 reference lesions. It checks
that the script works; its figures say nothing about a GPU.

The last line is machine-readable::

    RESULT device=<d> lesions=<L> n=<N> fp32_total_s=<s> fp32_peak_gb=<GB>
           fp32_max_rel_diff=<x> bf16_total_s=<s> bf16_peak_gb=<GB> bf16_max_rel_diff=<x>

Run it with ``benchmarks/gpu_check.sh`` (sets the paths, limits the run to 10 minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOAL_S = 60.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device of the timed runs (default cuda)")
    p.add_argument("--dry-run", action="store_true",
                   help="small sizes on the CPU (crop 48^3, window 48^3, N = 2, 3 lesions)")
    p.add_argument("--subject", default="patient07", help="public subject (default patient07)")
    p.add_argument("--data-dir", default=None,
                   help="local mirror (default: $INSTANCE_SALIENCY_DATA, else ../shared/data "
                        "or ./shared/data beside the checkout)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=None, help="noise samples N (default 50; dry run 2)")
    p.add_argument("--precisions", default="fp32,bf16", help="default fp32,bf16")
    p.add_argument("--methods", default="smoothgrad,gradcampp",
                   help="default smoothgrad,gradcampp")
    p.add_argument("--ref-lesions", type=int, default=None,
                   help="lesions (the largest) compared with a CPU reference (default 3; dry "
                        "run 2; 0 = none)")
    p.add_argument("--max-lesions", type=int, default=None,
                   help="explain at most this many lesions, the largest (default all; dry run 3)")
    p.add_argument("--crop", default=None, help="X,Y,Z crop around the largest ground-truth "
                   "lesion (default: the whole scan; dry run 48,48,48)")
    p.add_argument("--roi", type=int, default=None,
                   help="cubic window side (default: the model's; dry run 48)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per forward pass (default 8 on a GPU, 2 on the CPU)")
    p.add_argument("--grad-batch", type=int, default=None,
                   help="backward passes per autograd call (default: the engine's)")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch threads of the CPU reference (0 = torch default)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off")
    a = p.parse_args(argv)
    if a.dry_run:
        a.device = "cpu"
        a.n = 2 if a.n is None else a.n
        a.ref_lesions = 2 if a.ref_lesions is None else a.ref_lesions
        a.max_lesions = 3 if a.max_lesions is None else a.max_lesions
        a.crop = a.crop or "48,48,48"
        a.roi = a.roi or 48
    a.n = 50 if a.n is None else a.n
    a.ref_lesions = 3 if a.ref_lesions is None else a.ref_lesions
    if a.n < 1:
        p.error("--n must be >= 1")
    return a


def data_dir(a) -> str | None:
    if a.data_dir:
        return a.data_dir
    if os.environ.get("INSTANCE_SALIENCY_DATA"):
        return os.environ["INSTANCE_SALIENCY_DATA"]
    for d in (HERE.parent.parent / "shared" / "data", HERE.parent / "shared" / "data"):
        if (d / "SHA256SUMS").is_file():
            return str(d)
    return None


def rel_diff(a, b) -> float:
    """max |a − b| / max |b| of two SparseMaps (densified on their common box)."""
    if a.region == b.region:
        da, db = a.data.astype(np.float64), b.data.astype(np.float64)
    else:
        da, db = a.to_dense().astype(np.float64), b.to_dense().astype(np.float64)
    den = float(np.abs(db).max())
    num = float(np.abs(da - db).max())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from instance_saliency import datasets
    from instance_saliency.inference import WindowGrid, sliding_window_logits
    from instance_saliency.instances import find_instances
    from instance_saliency.io import load_images
    from instance_saliency.models import load_model
    from instance_saliency.saliency import gradcampp, record_layer_sums, smoothgrad
    from instance_saliency.saliency._speed import check_precision
    from instance_saliency.targets import InstanceTarget

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU available to this torch build (use --dry-run on a CPU)")
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    skipped = {}
    for prec in list(precisions):
        try:
            check_precision(prec, dev)
        except ValueError as e:
            skipped[prec] = str(e)
            precisions.remove(prec)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    sw = a.sw_batch_size or (8 if dev.type == "cuda" else 2)
    if dev.type == "cuda" and not a.no_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if a.cpu_threads:
        torch.set_num_threads(a.cpu_threads)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t_setup = time.perf_counter()
    files = datasets.fetch_subject(a.subject, data_dir(a))
    model = load_model(a.model, str(dev))
    subj = load_images([files["flair"], files["mprage"]], model.channels, files["mask"])
    image, gt = subj.image, subj.mask
    if a.crop:
        size = [int(v) for v in a.crop.split(",")]
        import cc3d

        lab = cc3d.connected_components(gt.astype(np.uint8), connectivity=26)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        c = np.argwhere(lab == sizes.argmax()).mean(0).round().astype(int)
        box = tuple(slice(max(0, min(int(ci) - s // 2, n - s)),
                          max(0, min(int(ci) - s // 2, n - s)) + min(s, n))
                    for ci, s, n in zip(c, size, gt.shape))
        image, gt = image[(slice(None),) + box], gt[box]
    prep = model.prepare(image, subj.spacing)
    shape = tuple(prep.x.shape[1:])
    grid = (WindowGrid.create(shape, (a.roi,) * 3, model.overlap) if a.roi
            else model.grid(shape))
    layer = model.cam_layer
    x = torch.from_numpy(prep.x).to(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    # warm-up outside the timings (cuDNN autotuning, allocator, lazy imports)
    with torch.enable_grad():
        w = torch.zeros((1, x.shape[0]) + tuple(grid.roi_size), device=dev, requires_grad=True)
        torch.autograd.grad(model.network(w).sum(), w)
    sync()
    setup_s = time.perf_counter() - t_setup

    t0 = time.perf_counter()
    with torch.inference_mode(), record_layer_sums(model, layer) as rec:
        logits = sliding_window_logits(model.network, x[None], grid, sw)
    sync()
    predict_s = time.perf_counter() - t0
    layer_sums = rec.per_member(grid.n_windows, sw)
    probs = prep.probabilities(logits[0].cpu().numpy())
    del logits
    iset = find_instances(model.segment(probs), gt, np.eye(4), subj.spacing, min_size=3)
    insts = sorted(iset.instances, key=lambda i: -i.voxels)
    if a.max_lesions:
        insts = insts[:a.max_lesions]
    targets = [InstanceTarget(prep.to_net(iset.mask(i)), model.lesion_class,
                              name=f"lesion_{i.label:03d}") for i in insts]
    if not targets:
        raise SystemExit("no lesion instances in this scan/crop")
    n_ref = min(a.ref_lesions, len(targets))
    print(f"{a.subject}{' crop ' + a.crop if a.crop else ''} {shape}, {grid.n_windows} windows "
          f"of {tuple(grid.roi_size)}; {len(targets)} lesions "
          f"({', '.join(f'{k} {v}' for k, v in _counts(insts).items())}); N = {a.n}; "
          f"{'+'.join(methods)}; exact (sliding-window) mode; device {dev} ({name}); torch "
          f"{torch.__version__}; sw_batch_size {sw}; setup {setup_s:.1f} s; prediction "
          f"{predict_s:.2f} s", flush=True)
    for prec, why in skipped.items():
        print(f"skipped {prec}: {why}")

    def run(dev_, tg, prec, sums):
        out, times = {}, {}
        if "smoothgrad" in methods:
            sync()
            t = time.perf_counter()
            out["smoothgrad"] = smoothgrad(model, x.to(dev_), tg, grid=grid, n_samples=a.n,
                                           seed=0, sw_batch_size=sw, device=dev_,
                                           precision=prec, grad_batch=a.grad_batch)
            sync()
            times["smoothgrad"] = time.perf_counter() - t
        if "gradcampp" in methods:
            t = time.perf_counter()
            out["gradcampp"] = gradcampp(model, x.to(dev_), tg, layer, grid=grid,
                                         sw_batch_size=sw, device=dev_, precision=prec,
                                         grad_batch=a.grad_batch, layer_sums=sums)
            sync()
            times["gradcampp"] = time.perf_counter() - t
        return out, times

    results = {}
    for prec in precisions:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        maps, times = run(dev, targets, prec, layer_sums)
        peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
        total = predict_s + sum(times.values())
        results[prec] = {"times": times, "total": total, "peak": peak,
                         "ref": {m: [r.maps for r in res[:n_ref]] for m, res in maps.items()}}
        goal = ("" if prec != "fp32" else
                f"goal < {GOAL_S:.0f} s on one GPU: not judged in a dry run" if a.dry_run else
                f"goal < {GOAL_S:.0f} s: {'met' if total < GOAL_S else 'NOT met'}")
        print(f"{prec}: prediction {predict_s:.2f} s + "
              + " + ".join(f"{m} {t:.2f} s" for m, t in times.items())
              + f" = {total:.2f} s  [{goal or 'no goal'}]; peak GPU memory "
              + (f"{peak:.2f} GB" if peak is not None else "n/a (cpu)"), flush=True)
        del maps
    if n_ref and precisions:
        model.to("cpu")  # the reference runs on the CPU
        if a.cpu_threads:
            torch.set_num_threads(a.cpu_threads)
        t = time.perf_counter()
        ref_maps, _ = run(torch.device("cpu"), targets[:n_ref], "fp32",
                          [{w: v.cpu() for w, v in d.items()} for d in layer_sums]
                          if layer_sums else None)
        ref_s = time.perf_counter() - t
        print(f"CPU reference (fp32, {n_ref} lesions: {[t_.name for t_ in targets[:n_ref]]}): "
              f"{ref_s:.1f} s", flush=True)
        for prec, r in results.items():
            diffs = {}
            for m, per in r["ref"].items():
                key = "mean" if m == "smoothgrad" else "raw"
                diffs[m] = max(rel_diff(per[k][key], ref_maps[m][k].maps[key])
                               for k in range(n_ref))
            r["diff"] = max(diffs.values()) if diffs else float("nan")
            print(f"{prec}: max relative difference to the CPU maps (max|a-b|/max|b| per "
                  f"lesion, max over {n_ref} lesions): "
                  + ", ".join(f"{m} {v:.3e}" for m, v in diffs.items()), flush=True)
    print(f"\n=== {len(targets)} lesions, N = {a.n}, {dev} ({name}) ===")
    print(f"{'precision':<10}{'total_s':>9}{'goal':>10}{'peak_GPU_GB':>13}{'max_rel_diff':>14}")
    for prec, r in results.items():
        goal = (f"< {GOAL_S:.0f} s" if prec == "fp32" else "-")
        pk = f"{r['peak']:.2f}" if r["peak"] is not None else "n/a"
        print(f"{prec:<10}{r['total']:>9.2f}{goal:>10}{pk:>13}{r.get('diff', float('nan')):>14.3e}")
    fields = [f"device={dev.type}", f"lesions={len(targets)}", f"n={a.n}"]
    for prec, r in results.items():
        fields += [f"{prec}_total_s={r['total']:.4g}",
                   f"{prec}_peak_gb={r['peak']:.4g}" if r["peak"] is not None
                   else f"{prec}_peak_gb=nan",
                   f"{prec}_max_rel_diff={r.get('diff', float('nan')):.4g}"]
    print("RESULT " + " ".join(fields), flush=True)
    return 0


def _counts(insts) -> dict:
    out: dict = {}
    for i in insts:
        out[i.status] = out.get(i.status, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
