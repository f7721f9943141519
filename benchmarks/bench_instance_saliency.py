#!/usr/bin/env python
"""Benchmark: instance SmoothGrad on a real full-size scan, ours vs the obvious Captum way.

On the real scan of ``--subject`` (182×218×182 for the open_ms_data subjects, z-scored with
:func:`instance_saliency.io.normalise`) and the model's sliding-window setting (ROI 96³,
overlap 0.25, Gaussian blending), the K largest predicted lesions are explained with N noise
samples by

* ``baseline``: per lesion, Captum ``NoiseTunnel(Saliency(wrapper))`` (``nt_type="smoothgrad"``,
  ``abs=False``), ``wrapper`` = input ``(B, C, X, Y, Z)`` → sliding-window logits over the whole
  scan → instance target score ``(B,)``;
* ``exact``: :func:`instance_saliency.saliency.smoothgrad` with ``mode="sliding"`` (all K lesions
  in one call; exact with respect to sliding-window inference);
* ``patch``: the same with ``mode="patch"`` (one window centred on each lesion; approximate).

All methods use the same noise tensors (drawn once from a seeded ``torch.Generator``,
σ = noise_level × (max − min) of the normalised FLAIR channel, applied to every channel).
Model parameters have ``requires_grad=False`` for every method (only input gradients).

Each method runs in its own process (this script re-invoked with ``--worker METHOD``), so its
peak resident memory (``ru_maxrss``) is its own; timings are of the saliency computation only
(no loading), taken one after the other in one run, and reported as ratios.

Quick run::

    INSTANCE_SALIENCY_DATA=../shared/data python benchmarks/bench_instance_saliency.py \
        --k 2 --n 1 --k-curve 1,2

The last line printed is machine-readable::

    RESULT exact_speedup=<x> patch_speedup=<x> max_rel_diff=<x> peak_rss_gb=<x>

See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("baseline", "exact", "patch", "amp", "curve", "all")


# ------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--subject", default="patient07", help="public subject (datasets.SUBJECTS)")
    p.add_argument("--data-dir", default=None,
                   help="local mirror of the public scans (default: $INSTANCE_SALIENCY_DATA, "
                        "else ../shared/data beside the checkout when it exists)")
    p.add_argument("--model", default=None,
                   help="checkpoint folder (default: the shipped model)")
    p.add_argument("--k", type=int, default=8, help="lesions explained (the K largest)")
    p.add_argument("--n", type=int, default=1, help="noise samples N")
    p.add_argument("--k-curve", default="1,2,4,8,16",
                   help="K values of the cost curve (exact mode only); empty = skip")
    p.add_argument("--n-all", type=int, default=0,
                   help="noise samples of a timed exact run over ALL predicted lesions (0 = skip)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="also time exact mode under torch.autocast and report its error vs fp32")
    p.add_argument("--sw-batch-size", type=int, default=4,
                   help="windows per forward pass (all methods)")
    p.add_argument("--nt-batch", type=int, default=1,
                   help="noise samples per chunk (Captum nt_samples_batch_size; our batch_size)")
    p.add_argument("--noise-level", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-inferer", default="ours", choices=("ours", "monai"),
                   help="sliding-window function inside the Captum wrapper: "
                        "instance_saliency.inference.sliding_window_logits (same WindowGrid) or "
                        "monai.inferers.sliding_window_inference(mode='gaussian')")
    p.add_argument("--skip", default="",
                   help="comma-separated methods not to run (baseline, patch, curve)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary folder with inputs, maps and per-method results")
    p.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.k_curve_list = [int(v) for v in a.k_curve.split(",") if v.strip()]
    a.skip_set = {s.strip() for s in a.skip.split(",") if s.strip()}
    if a.k < 1 or a.n < 1 or any(v < 1 for v in a.k_curve_list):
        p.error("--k, --n and the --k-curve values must be >= 1")
    return a


# ------------------------------------------------------------------------------------------
# helpers shared by parent and workers


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ``ru_maxrss`` is in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def region_to_list(region) -> list:
    return [[int(s.start), int(s.stop)] for s in region]


def list_to_region(lst) -> tuple:
    return tuple(slice(a, b) for a, b in lst)


def save_maps(path: Path, maps: list) -> None:
    """``maps``: list of (region, data (C, *region_shape)) per lesion → one .npz."""
    arrays = {}
    for i, (region, data) in enumerate(maps):
        arrays[f"data_{i}"] = np.asarray(data, dtype=np.float32)
        arrays[f"region_{i}"] = np.asarray(region_to_list(region), dtype=np.int64)
    np.savez(path, n=np.int64(len(maps)), **arrays)


def load_maps(path: Path) -> list:
    z = np.load(path)
    return [(list_to_region(z[f"region_{i}"].tolist()), z[f"data_{i}"]) for i in range(int(z["n"]))]


def dense(region, data, shape) -> np.ndarray:
    out = np.zeros((data.shape[0],) + tuple(shape), dtype=np.float32)
    out[(slice(None),) + tuple(region)] = data
    return out


def rel_diff(a, b, shape) -> float:
    """max |a − b| / max |b| of two sparse maps (region, data)."""
    da, db = dense(*a, shape), dense(*b, shape)
    den = float(np.abs(db).max())
    num = float(np.abs(da - db).max())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def similarity(a, b, shape) -> tuple[float, float]:
    """(Pearson correlation, relative L2 difference ||a − b|| / ||b||) of two sparse maps,
    over the voxels where either is non-zero."""
    da, db = dense(*a, shape), dense(*b, shape)
    m = (da != 0) | (db != 0)
    va, vb = da[m].astype(np.float64), db[m].astype(np.float64)
    corr = float(np.corrcoef(va, vb)[0, 1]) if len(va) > 1 else float("nan")
    nb = float(np.linalg.norm(vb))
    return corr, (float(np.linalg.norm(va - vb)) / nb if nb > 0 else float("nan"))


def nonzero_box(arr: np.ndarray) -> tuple:
    """Bounding box (slices over the spatial axes) of the non-zero voxels of ``(C, *shape)``."""
    nz = np.argwhere(np.abs(arr).max(0) > 0)
    if len(nz) == 0:
        return tuple(slice(0, 1) for _ in arr.shape[1:])
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0)))


# ------------------------------------------------------------------------------------------
# worker side: one method in its own process


def _worker(a: argparse.Namespace) -> int:
    import torch

    from instance_saliency.inference import WindowGrid
    from instance_saliency.models import load_checkpoint
    from instance_saliency.targets import InstanceTarget

    if a.threads:
        torch.set_num_threads(a.threads)
    wd = Path(a.workdir)
    setup = json.loads((wd / "setup.json").read_text())
    z = np.load(wd / "setup.npz")
    image = z["image"]
    noise = torch.from_numpy(z["noise"])
    pred_labels, gt_labels = z["pred_labels"], z["gt_labels"]
    shape = tuple(image.shape[1:])
    device = a.device
    model, cfg = load_checkpoint(wd / "model", device=device)
    for p in model.parameters():  # input gradients only, for every method
        p.requires_grad_(False)
    grid = WindowGrid.create(shape, cfg.roi_size, cfg.overlap)
    x = torch.from_numpy(image)

    def mask_of(les: dict) -> np.ndarray:
        labels = pred_labels if les["source"] == "pred" else gt_labels
        return labels == les["component"]

    lesions = setup["lesions"]
    k = a.k
    method = a.worker
    result: dict = {"method": method}

    # warm-up (thread pools, allocator, and the lazy imports of the first autograd.grad call,
    # about 2 s) outside the timed region, the same for every method
    wx = torch.zeros((1, image.shape[0]) + tuple(cfg.roi_size), device=device, requires_grad=True)
    torch.autograd.grad(model(wx).sum(), wx)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["rss_setup_bytes"] = peak_rss_bytes()

    def targets_for(ls):
        return [InstanceTarget(mask_of(les), class_index=cfg.lesion_class,
                               name=f"lesion{les['label']}") for les in ls]

    def ours(targets, mode, mdl=None, nz=noise):
        from instance_saliency.saliency import smoothgrad

        return smoothgrad(mdl or model, x, targets, mode=mode, grid=grid, noise=nz,
                          batch_size=a.nt_batch, sw_batch_size=a.sw_batch_size, device=device)

    if method == "baseline":
        from captum.attr import NoiseTunnel, Saliency

        class FixedNoiseTunnel(NoiseTunnel):
            """NoiseTunnel whose noise draw returns the given noise tensors, in order."""

            def __init__(self, attribution_method, fixed_noise):
                super().__init__(attribution_method)
                self.fixed_noise = fixed_noise
                self.used = 0

            def _add_noise_to_input(self, input, stdev, nt_samples_partition):  # noqa: A002
                if input.shape[0] != 1:
                    raise ValueError("fixed noise supports batch size 1")
                eps = self.fixed_noise[self.used:self.used + nt_samples_partition]
                self.used += nt_samples_partition
                return (input.repeat_interleave(nt_samples_partition, dim=0)
                        + eps.to(input.device, input.dtype))

        class WholeScanTarget(torch.nn.Module):
            """(B, C, X, Y, Z) → sliding-window logits over the whole scan → target (B,)."""

            def __init__(self, target):
                super().__init__()
                self.model, self.target = model, target

            def forward(self, inp):
                if a.baseline_inferer == "ours":
                    from instance_saliency.inference import sliding_window_logits

                    logits = sliding_window_logits(self.model, inp, grid, a.sw_batch_size)
                else:
                    from monai.inferers import sliding_window_inference

                    logits = sliding_window_inference(
                        inp, tuple(cfg.roi_size), a.sw_batch_size, self.model,
                        overlap=cfg.overlap, mode="gaussian")
                return self.target(logits)

        sigma = float(setup["sigma"])
        xb = x[None].to(device)
        maps, per_lesion = [], []
        sync(device)
        t0 = time.perf_counter()
        for tg in targets_for(lesions[:k]):
            t1 = time.perf_counter()
            nt = FixedNoiseTunnel(Saliency(WholeScanTarget(tg)), noise)
            attr = nt.attribute(xb, nt_type="smoothgrad", nt_samples=noise.shape[0],
                                nt_samples_batch_size=a.nt_batch, stdevs=sigma, abs=False)
            if nt.used != noise.shape[0]:
                raise RuntimeError(f"NoiseTunnel drew {nt.used} noise samples, expected "
                                   f"{noise.shape[0]}")
            arr = attr[0].detach().float().cpu().numpy()
            sync(device)
            per_lesion.append(time.perf_counter() - t1)
            box = nonzero_box(arr)
            maps.append((box, arr[(slice(None),) + box]))
            del attr, arr
        sync(device)
        result["time_s"] = time.perf_counter() - t0
        result["per_lesion_s"] = per_lesion
        save_maps(wd / "maps_baseline.npz", maps)
    elif method in ("exact", "patch", "amp"):
        targets = targets_for(lesions[:k])
        mdl = None
        if method == "amp":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]

            class Autocast(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, inp):
                    with torch.autocast(device_type=device, dtype=dtype):
                        out = self.m(inp)
                    return out.float()

            mdl = Autocast(model)
        sync(device)
        t0 = time.perf_counter()
        res = ours(targets, "sliding" if method in ("exact", "amp") else "patch", mdl)
        sync(device)
        result["time_s"] = time.perf_counter() - t0
        result["n_windows"] = [int(r.n_windows) for r in res]
        save_maps(wd / f"maps_{method}.npz", [(r.maps["mean"].region, r.maps["mean"].data)
                                              for r in res])
        if method == "exact":
            from instance_saliency.saliency import WindowPlan

            plan = WindowPlan.create([t.mask for t in targets], shape, "sliding", grid=grid)
            result["distinct_windows"] = len({w for ws in plan.target_windows for w in ws})
    elif method == "curve":
        from instance_saliency.saliency import WindowPlan

        rows = []
        for kk in a.k_curve_list:
            if kk > len(lesions):
                rows.append({"k": kk, "time_s": None, "note": "not enough lesions"})
                continue
            targets = targets_for(lesions[:kk])
            plan = WindowPlan.create([t.mask for t in targets], shape, "sliding", grid=grid)
            sync(device)
            t0 = time.perf_counter()
            ours(targets, "sliding")
            sync(device)
            rows.append({"k": kk, "time_s": time.perf_counter() - t0,
                         "distinct_windows": len({w for ws in plan.target_windows for w in ws}),
                         "sum_windows": sum(len(ws) for ws in plan.target_windows)})
            print(f"  [curve] K={kk}: {rows[-1]['time_s']:.1f} s", flush=True)
        result["curve"] = rows
    elif method == "all":
        from instance_saliency.saliency import smoothgrad

        n_pred = int(pred_labels.max())
        targets = [InstanceTarget(pred_labels == c, class_index=cfg.lesion_class,
                                  name=f"lesion{c}") for c in range(1, n_pred + 1)]
        sync(device)
        t0 = time.perf_counter()
        # noise drawn inside smoothgrad (seeded, one sample at a time: no N-sized tensor)
        res = smoothgrad(model, x, targets, mode="sliding", grid=grid, n_samples=a.n_all,
                         noise_level=a.noise_level, seed=a.seed, batch_size=a.nt_batch,
                         sw_batch_size=a.sw_batch_size, device=device)
        sync(device)
        result["time_s"] = time.perf_counter() - t0
        result["n_lesions"] = n_pred
        result["n_windows"] = [int(r.n_windows) for r in res]
    result["rss_peak_bytes"] = peak_rss_bytes()
    if device == "cuda":
        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    (wd / f"result_{method}.json").write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------
# parent side


def _prepare(a: argparse.Namespace, wd: Path) -> dict:
    """Load model + scan, predict, pick lesions, draw noise; write setup.{json,npz} in ``wd``."""
    import torch

    from instance_saliency.datasets import fetch_subject
    from instance_saliency.inference import predict_probability
    from instance_saliency.instances import find_instances
    from instance_saliency.io import load_subject, normalise
    from instance_saliency.models import default_model_dir, load_checkpoint, save_checkpoint
    from instance_saliency.saliency.base import noise_sigma

    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model if a.model is not None else str(default_model_dir())
    model, cfg = load_checkpoint(a.model, device=a.device)
    # workers load this frozen copy: a checkpoint that is being retrained cannot change mid-run
    save_checkpoint(wd / "model", model.cpu(), cfg)
    model.to(a.device)
    data_dir = a.data_dir or os.environ.get("INSTANCE_SALIENCY_DATA") or None
    if data_dir is None:  # as the Makefile: the shared mirror beside the checkout, if present
        beside = Path(__file__).resolve().parents[2] / "shared" / "data"
        data_dir = str(beside) if (beside / "SHA256SUMS").is_file() else None
    files = fetch_subject(a.subject, data_dir)
    subj = load_subject(files["flair"], files["mprage"], files["mask"])
    image = normalise(subj.image, cfg.normalisation, cfg.landmarks)
    t0 = time.perf_counter()
    prob = predict_probability(model, image, cfg.roi_size, cfg.overlap, cfg.lesion_class,
                               a.sw_batch_size, a.device)
    t_pred = time.perf_counter() - t0
    iset = find_instances(prob >= cfg.threshold, subj.mask, subj.affine, subj.spacing,
                          connectivity=26, min_size=3)
    kmax = max([a.k] + a.k_curve_list)
    pred = sorted((i for i in iset if i.source == "pred"), key=lambda i: (-i.voxels, i.label))
    chosen = pred[:kmax]
    notes = []
    if len(chosen) < kmax:
        fns = sorted((i for i in iset if i.source == "gt"), key=lambda i: (-i.voxels, i.label))
        add = fns[:kmax - len(chosen)]
        notes.append(f"only {len(pred)} predicted lesions (threshold {cfg.threshold}, "
                     f"26-connectivity, min_size 3) < {kmax} needed: added the {len(add)} "
                     f"largest missed ground-truth lesions (FN) as targets")
        chosen += add
    if len(chosen) < a.k:
        notes.append(f"only {len(chosen)} lesions available: K reduced from {a.k}")
        a.k = len(chosen)
    if not chosen:
        raise SystemExit("no lesion to explain (no predicted and no ground-truth lesion)")
    lesions = [{"label": int(i.label), "source": i.source, "component": int(i.component),
                "status": i.status, "voxels": int(i.voxels)} for i in chosen]
    x = torch.from_numpy(image)
    sigma = noise_sigma(x, a.noise_level)  # (C,), FLAIR range, same σ for every channel
    g = torch.Generator().manual_seed(a.seed)
    noise = torch.randn((a.n,) + tuple(image.shape), generator=g) * sigma.reshape(-1, 1, 1, 1)
    lab_dtype = np.int16 if max(int(iset.pred_labels.max()), 1) < 32767 else np.int32
    gt_labels = iset.gt_labels if iset.gt_labels is not None else np.zeros_like(iset.pred_labels)
    np.savez(wd / "setup.npz", image=image, noise=noise.numpy(),
             pred_labels=iset.pred_labels.astype(lab_dtype), gt_labels=gt_labels.astype(np.int32))
    setup = {"lesions": lesions, "sigma": float(sigma[0]), "notes": notes,
             "n_pred": iset.n_pred, "counts": iset.counts(), "shape": list(image.shape[1:]),
             "roi_size": list(cfg.roi_size), "overlap": cfg.overlap,
             "threshold": cfg.threshold, "architecture": cfg.architecture,
             "arguments": cfg.arguments, "model_dir": model_dir,
             "predict_s": t_pred, "n_windows_scan": None}
    from instance_saliency.inference import WindowGrid

    setup["n_windows_scan"] = WindowGrid.create(image.shape[1:], cfg.roi_size,
                                                cfg.overlap).n_windows
    (wd / "setup.json").write_text(json.dumps(setup, indent=1))
    return setup


def _run_worker(a: argparse.Namespace, wd: Path, method: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--workdir", str(wd),
           "--k", str(a.k), "--n", str(a.n), "--k-curve", a.k_curve, "--n-all", str(a.n_all),
           "--device", a.device, "--amp", a.amp, "--sw-batch-size", str(a.sw_batch_size),
           "--nt-batch", str(a.nt_batch), "--noise-level", str(a.noise_level),
           "--seed", str(a.seed), "--baseline-inferer", a.baseline_inferer,
           "--threads", str(a.threads)]
    print(f"[{time.strftime('%H:%M:%S')}] running {method} ...", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    out = wd / f"result_{method}.json"
    if rc != 0 or not out.is_file():
        print(f"  {method} FAILED (exit status {rc})", flush=True)
        return None
    r = json.loads(out.read_text())
    timed = r["time_s"] if "time_s" in r else sum(row["time_s"] or 0 for row in r["curve"])
    print(f"  {method}: {timed:.1f} s timed ({time.perf_counter() - t0:.0f} s with process "
          "start and loading)", flush=True)
    return r


def _gb(b) -> float:
    return float("nan") if b is None else b / 1e9


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return _worker(a)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    own_wd = a.workdir is None
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="bench_instance_saliency_"))
    wd.mkdir(parents=True, exist_ok=True)
    try:
        return _main(a, wd)
    finally:
        if own_wd and not a.keep_workdir:
            shutil.rmtree(wd, ignore_errors=True)


def _main(a: argparse.Namespace, wd: Path) -> int:
    import torch

    print(f"instance-saliency benchmark: subject {a.subject}, K={a.k}, N={a.n}, device "
          f"{a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.node()}", flush=True)
    try:
        load = os.getloadavg()
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    if a.keep_workdir:
        print(f"work folder (kept): {wd}")
    s = _prepare(a, wd)
    print(f"model: {s['model_dir']} ({s['architecture']} {s['arguments']}); ROI "
          f"{s['roi_size']}, overlap {s['overlap']}, Gaussian blending; {s['n_windows_scan']} "
          f"windows cover the {tuple(s['shape'])} scan")
    print(f"prediction: {s['predict_s']:.1f} s; {s['n_pred']} predicted lesions "
          f"(threshold {s['threshold']}, 26-connectivity, min_size 3 voxels); statuses "
          f"{s['counts']}")
    for note in s["notes"]:
        print("NOTE:", note)
    print(f"noise: {a.n} sample(s) drawn once with torch.Generator().manual_seed({a.seed}), "
          f"sigma = {a.noise_level} x (max-min) of normalised FLAIR = {s['sigma']:.4f}, all "
          "channels; the same tensors go to every method")
    print("baseline: Captum NoiseTunnel(Saliency(wrapper)), nt_type='smoothgrad', abs=False, "
          f"nt_samples_batch_size={a.nt_batch}; its noise draw is monkeypatched (subclass "
          "overriding NoiseTunnel._add_noise_to_input) to return the same noise tensors; "
          f"wrapper = {'instance_saliency.inference.sliding_window_logits (same WindowGrid)' if a.baseline_inferer == 'ours' else 'monai sliding_window_inference(mode=gaussian)'}"
          " -> instance target (sum of lesion logits over the lesion)")
    print("all methods: model parameters requires_grad=False (input gradients only); each "
          "method in its own process (peak RSS = ru_maxrss of that process)", flush=True)

    res = {}
    plan = ["baseline", "exact", "patch"] + (["amp"] if a.amp != "none" else []) \
        + (["curve"] if a.k_curve_list else []) + (["all"] if a.n_all > 0 else [])
    for m in plan:
        if m in a.skip_set:
            continue
        res[m] = _run_worker(a, wd, m)

    shape = tuple(s["shape"])
    lesions = s["lesions"][:a.k]
    base, exact, patch = res.get("baseline"), res.get("exact"), res.get("patch")
    maps = {m: load_maps(wd / f"maps_{m}.npz") for m in ("baseline", "exact", "patch", "amp")
            if res.get(m) and (wd / f"maps_{m}.npz").is_file()}

    def diffs(m, ref):
        if m not in maps or ref not in maps:
            return None
        return [rel_diff(p, q, shape) for p, q in zip(maps[m], maps[ref])]

    d_exact = diffs("exact", "baseline")
    d_patch = diffs("patch", "baseline")
    d_amp = diffs("amp", "exact")
    sim_patch = ([similarity(p, q, shape) for p, q in zip(maps["patch"], maps["baseline"])]
                 if "patch" in maps and "baseline" in maps else None)

    print("\n=== per lesion ===")
    hdr = f"{'#':>2} {'label':>5} {'src':>4} {'status':>6} {'voxels':>6} {'win_exact':>9} " \
          f"{'baseline_s':>10} {'rel_diff_exact':>14} {'rel_diff_patch':>14} " \
          f"{'corr_patch':>10} {'relL2_patch':>11}"
    print(hdr)
    for i, les in enumerate(lesions):
        nw = exact["n_windows"][i] if exact else None
        bt = base["per_lesion_s"][i] if base else None
        print(f"{i:>2} {les['label']:>5} {les['source']:>4} {les['status']:>6} "
              f"{les['voxels']:>6} {nw if nw is not None else '-':>9} "
              f"{'-' if bt is None else f'{bt:.1f}':>10} "
              f"{'-' if d_exact is None else f'{d_exact[i]:.2e}':>14} "
              f"{'-' if d_patch is None else f'{d_patch[i]:.2e}':>14} "
              f"{'-' if sim_patch is None else f'{sim_patch[i][0]:.3f}':>10} "
              f"{'-' if sim_patch is None else f'{sim_patch[i][1]:.3f}':>11}")
    print("(rel_diff = max|a-b|/max|b| vs the baseline map b; corr_patch, relL2_patch = Pearson "
          "correlation and ||a-b||/||b|| of the patch map vs the baseline, over non-zero voxels)")
    if exact:
        nws = exact["n_windows"]
        print(f"windows per lesion (exact mode, InstanceSaliency.n_windows): {nws}, mean "
              f"{np.mean(nws):.2f} of {s['n_windows_scan']}; distinct windows evaluated for all "
              f"K lesions together: {exact.get('distinct_windows')}")

    def t(r):
        return r["time_s"] if r else float("nan")

    tb = t(base)
    print(f"\n=== K={a.k} lesions, N={a.n} noise samples, {a.device}"
          f"{' (measured under whatever CPU load the machine had)' if a.device == 'cpu' else ''}"
          " ===")
    print(f"{'method':<30} {'time_s':>9} {'baseline/ours':>13} {'peak_rss_GB':>11} "
          f"{'setup_rss_GB':>12}" + (f" {'cuda_peak_GB':>12}" if a.device == "cuda" else ""))
    names = {"baseline": "baseline (Captum NoiseTunnel)", "exact": "ours exact (mode=sliding)",
             "patch": "ours patch (mode=patch)", "amp": f"ours exact + autocast {a.amp}"}
    for m in ("baseline", "exact", "patch", "amp"):
        r = res.get(m)
        if m not in res:
            continue
        ratio = "" if m == "baseline" else f"{tb / t(r):.2f}x" if (r and base) else "-"
        cuda = f" {_gb(r.get('cuda_peak_bytes')):>12.3f}" if (r and a.device == "cuda") else ""
        print(f"{names[m]:<30} {t(r):>9.1f} {ratio:>13} "
              f"{_gb(r['rss_peak_bytes']) if r else float('nan'):>11.3f} "
              f"{_gb(r['rss_setup_bytes']) if r else float('nan'):>12.3f}{cuda}")
    print("(peak_rss = ru_maxrss of the method's own process, includes Python/torch, the scan "
          "and the noise; setup_rss = the same just before the timed call; GB = 1e9 bytes)")
    if d_exact is not None:
        print(f"max relative difference, ours exact vs baseline (max|a-b|/max|b| per lesion, max "
              f"over lesions): {max(d_exact):.3e}")
    if d_patch is not None:
        print(f"max relative difference, ours patch vs baseline (patch mode's approximation): "
              f"{max(d_patch):.3e} (median over lesions {np.median(d_patch):.3e}; mean "
              f"correlation {np.mean([c for c, _ in sim_patch]):.3f})")
    if d_amp is not None:
        print(f"max relative error, autocast {a.amp} vs fp32 exact: {max(d_amp):.3e}")

    curve = res.get("curve")
    if curve:
        per_lesion = tb / a.k if base else float("nan")
        print(f"\n=== cost curve (ours exact, N={a.n}); baseline EXTRAPOLATED linearly from the "
              f"measured {per_lesion:.1f} s per lesion ===")
        print(f"{'K':>3} {'exact_s':>9} {'distinct_win':>12} {'sum_win':>8} "
              f"{'baseline_s(extrap.)':>19} {'ratio':>7}")
        for row in curve["curve"]:
            if row.get("time_s") is None:
                print(f"{row['k']:>3} {'-':>9}  ({row.get('note')})")
                continue
            eb = per_lesion * row["k"]
            print(f"{row['k']:>3} {row['time_s']:>9.1f} {row['distinct_windows']:>12} "
                  f"{row['sum_windows']:>8} {eb:>19.1f} {eb / row['time_s']:>6.2f}x")
    al = res.get("all")
    if al:
        print(f"\n=== ours exact, ALL {al['n_lesions']} predicted lesions, N={a.n_all} ===")
        print(f"time {al['time_s']:.1f} s, peak RSS {_gb(al['rss_peak_bytes']):.3f} GB"
              + (f", CUDA peak {_gb(al.get('cuda_peak_bytes')):.3f} GB" if a.device == "cuda"
                 else "") + f", mean windows per lesion {np.mean(al['n_windows']):.2f}")
        if base:
            est = tb / a.k / a.n * a.n_all * al["n_lesions"]
            print(f"baseline for the same work, EXTRAPOLATED (per lesion per sample): {est:.0f} s "
                  f"-> ratio {est / al['time_s']:.1f}x")

    def fmt(v):
        return "nan" if v is None or not np.isfinite(v) else f"{v:.4g}"

    exact_speedup = tb / t(exact) if (base and exact) else None
    patch_speedup = tb / t(patch) if (base and patch) else None
    print(f"RESULT exact_speedup={fmt(exact_speedup)} patch_speedup={fmt(patch_speedup)} "
          f"max_rel_diff={fmt(max(d_exact) if d_exact else None)} "
          f"peak_rss_gb={fmt(_gb(exact['rss_peak_bytes']) if exact else None)}", flush=True)
    return 0 if all(res.get(m) for m in plan if m not in a.skip_set) else 1


if __name__ == "__main__":
    sys.exit(main())
