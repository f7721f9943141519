#!/usr/bin/env python
"""Benchmark: where ``explain``'s time goes, and the previous code path against the current one.

Two modes, both on the real demo scan (``patient07`` of open_ms_data, 182×218×182) or a crop of
it, with the shipped model and ``explain``'s defaults except N (``--n``, default 4 as in
``instance-saliency demo``):

``--where``
    One ``explain`` run with timers around the network's forward passes (forward hooks on each
    network), ``torch.autograd.grad`` (the backward passes), the saliency calls, the
    quantification functions, NIfTI writing and figures; prints a table of shares.

default (side by side)
    ``explain`` with the code path before issue 15 (``old``: selected with the private switch
    ``instance_saliency.saliency._speed.LEGACY``) and the current one (``new``), each run in its
    own process on the same input, alternating (``old, new, new, old, ...`` over ``--repeats``),
    so that the machine's load at the time affects both alike. Prints each run's wall time and
    CPU time, the ratios old / new (end to end and per step, from ``run.json``), and the
    maximum absolute and relative differences of every written lesion map (per lesion
    max |a − b| / max |b|, then the max over lesions) and of the numbers of ``instances_full.csv``.

Last line (machine-readable)::

    RESULT speedup=<old/new wall, median over repeats> cpu_speedup=<x> max_abs_diff=<x>
           max_rel_diff=<x>

Quick run (a crop, a few minutes under load)::

    INSTANCE_SALIENCY_DATA=../shared/data python benchmarks/bench_cpu_speed.py \
        --crop 96,112,96 --n 1

The goal run (the demo scan, N = 4): no ``--crop``. The exact-mode ratio against the Captum
per-lesion loop at K = 8 is measured by ``benchmarks/bench_instance_saliency.py``
(``--exact-vs-captum`` here runs it with ``--k 8 --n 1 --skip patch,curve`` and prints its
``RESULT`` line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--subject", default="patient07", help="public subject (datasets.SUBJECTS)")
    p.add_argument("--data-dir", default=None, help="local mirror (default: "
                   "$INSTANCE_SALIENCY_DATA, else ../shared/data beside the checkout)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--crop", default="full",
                   help="'full', or X,Y,Z: a box of that size centred on the ground-truth "
                        "lesions (the inputs are cropped and written as NIfTI first)")
    p.add_argument("--n", type=int, default=4, help="SmoothGrad noise samples N")
    p.add_argument("--methods", default="smoothgrad,gradcampp")
    p.add_argument("--no-figures", action="store_true", help="explain --no-figures")
    p.add_argument("--repeats", type=int, default=1,
                   help="side-by-side pairs (old/new, the order alternating)")
    p.add_argument("--paths", default="old,new",
                   help="code paths to run side by side (old, new)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--where", action="store_true", help="one timed run: table of shares")
    p.add_argument("--path", default="new", choices=("old", "new"),
                   help="code path of the --where run")
    p.add_argument("--exact-vs-captum", action="store_true",
                   help="also run bench_instance_saliency.py --k 8 --n 1 (Captum loop vs "
                        "exact mode) and print its RESULT line")
    p.add_argument("--float64-check", action="store_true",
                   help="for every SmoothGrad map where old and new differ by more than 1e-5, "
                   "recompute that lesion with old float32, new float32 and a float64 reference "
                   "(same noise) and print each one's difference to the reference")
    p.add_argument("--workdir", default=None, help="keep inputs and outputs here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.n < 1 or a.repeats < 1:
        p.error("--n and --repeats must be >= 1")
    return a


# ------------------------------------------------------------------------------------------
# inputs


def data_dir(a) -> str | None:
    if a.data_dir:
        return a.data_dir
    if os.environ.get("INSTANCE_SALIENCY_DATA"):
        return os.environ["INSTANCE_SALIENCY_DATA"]
    d = HERE.parent.parent / "shared" / "data"
    return str(d) if (d / "SHA256SUMS").is_file() else None


def prepare_inputs(a, wd: Path) -> dict:
    """Paths ``{"flair", "mprage", "mask"}`` of the scan or of its crop (written into ``wd``)."""
    import nibabel as nib

    from instance_saliency import datasets

    files = datasets.fetch_subject(a.subject, data_dir(a))
    if a.crop == "full":
        return {k: str(v) for k, v in files.items()}
    size = [int(v) for v in a.crop.split(",")]
    gt_img = nib.load(str(files["mask"]))
    gt = np.asarray(gt_img.dataobj) > 0
    shape = gt.shape
    c = np.argwhere(gt).mean(0).round().astype(int) if gt.any() else np.array(shape) // 2
    box = tuple(slice(max(0, min(int(ci) - s // 2, n - s)),
                      max(0, min(int(ci) - s // 2, n - s)) + min(s, n))
                for ci, s, n in zip(c, size, shape))
    out = {}
    for k in ("flair", "mprage", "mask"):
        img = nib.load(str(files[k]))
        sub = img.slicer[box]
        f = wd / f"{k}.nii.gz"
        nib.save(sub, str(f))
        out[k] = str(f)
    return out


# ------------------------------------------------------------------------------------------
# timers (the --where run)


class Timers:
    """Seconds per name, with a stack so that a phase's own time excludes what ran inside it
    under another name."""

    def __init__(self):
        self.t: dict = {}

    def add(self, name: str, dt: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + dt

    def wrap(self, owner, attr: str, name: str) -> None:
        orig = getattr(owner, attr)
        timers = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                timers.add(name, time.perf_counter() - t0)

        setattr(owner, attr, timed)


def install_timers(model) -> Timers:
    """Timers on the pieces of ``explain`` (monkeypatched module attributes and hooks)."""
    import torch

    import instance_saliency.features as features
    import instance_saliency.io as io_mod
    import instance_saliency.maps as maps
    import instance_saliency.quantify as quantify
    import instance_saliency.report as report
    import instance_saliency.saliency as saliency
    from instance_saliency import explain as explain_mod
    from instance_saliency.report.viewer import ViewerData

    T = Timers()
    phase = {"name": "predict"}
    state = {"fwd_t0": None}

    def pre(_m, _inp):
        if state["fwd_t0"] is None:
            state["fwd_t0"] = time.perf_counter()

    def post(_m, _inp, _out):
        if state["fwd_t0"] is not None:
            T.add(f"{phase['name']}.forward", time.perf_counter() - state["fwd_t0"])
            state["fwd_t0"] = None

    for net in model.networks:
        net.register_forward_pre_hook(pre)
        net.register_forward_hook(post)
    grad = torch.autograd.grad

    def timed_grad(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return grad(*args, **kwargs)
        finally:
            T.add(f"{phase['name']}.backward", time.perf_counter() - t0)

    torch.autograd.grad = timed_grad
    for meth in ("smoothgrad", "gradcampp", "hirescam"):
        orig = getattr(saliency, meth)

        def call(*args, _orig=orig, _name=meth, **kwargs):
            phase["name"] = _name
            t0 = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                T.add(f"{_name}.total", time.perf_counter() - t0)
                phase["name"] = "after"

        setattr(saliency, meth, call)
    T.wrap(quantify, "quantify_instance", "quantify.quantify_instance")
    T.wrap(quantify, "distance_profile", "quantify.distance_profile")
    T.wrap(features, "map_features", "quantify.map_features")
    T.wrap(features, "brain_border_distance", "quantify.brain_border_distance")
    T.wrap(maps, "save_lesion_map", "nifti.lesion_maps")
    T.wrap(io_mod, "save_map", "nifti.save_map")
    T.wrap(report, "instance_figure", "figures.instance_figure")
    T.wrap(ViewerData, "add_map", "figures.viewer_add_map")
    T.wrap(explain_mod, "_figures", "figures.summary_and_report")
    return T


def use_old_figure_drawing() -> None:
    """The lesion figures as drawn before issue 15: three renders per figure (the label
    check, the right-edge fit, ``savefig``) instead of one. The PNG bytes are the same."""
    from instance_saliency.report import figures

    fit, save = figures._fit_right_edge, figures._save
    figures._fit_right_edge = lambda fig, gs, artists, pad_px=4.0, drawn=False: fit(
        fig, gs, artists, pad_px, drawn=False)
    figures._save = lambda fig, out_png, dpi=figures._DPI, rendered=False: save(
        fig, out_png, dpi, rendered=False)


# ------------------------------------------------------------------------------------------
# worker: one explain run in this process


def _worker(a) -> int:
    import torch

    from instance_saliency.explain import ExplainConfig, explain
    from instance_saliency.models import load_model
    from instance_saliency.saliency import _speed

    if a.threads:
        torch.set_num_threads(a.threads)
    _speed.LEGACY = a.worker == "old"
    if _speed.LEGACY:
        use_old_figure_drawing()
    inputs = json.loads(a.inputs)
    model = load_model(a.model)
    timers = install_timers(model) if a.where else None
    cfg = ExplainConfig(methods=tuple(m for m in a.methods.split(",") if m), n_samples=a.n,
                        figures=not a.no_figures)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run = explain(inputs["flair"], inputs["mprage"], a.out, mask=inputs["mask"],
                  model_dir=a.model, config=cfg, overwrite=True, progress=False,
                  log=lambda m: None, model=model)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res = {"path": a.worker, "wall_s": wall,
           "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
           "timings": run["timings_s"], "instances": run["summary"]["instances"],
           "peak_rss_gb": ru1.ru_maxrss * 1024 / 1e9,
           "torch_threads": torch.get_num_threads()}
    if timers is not None:
        res["timers"] = timers.t
    print("WORKER " + json.dumps(res), flush=True)
    return 0


def run_worker(a, path: str, out: Path, inputs: dict, where: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--out", str(out),
           "--inputs", json.dumps(inputs), "--n", str(a.n), "--methods", a.methods,
           "--threads", str(a.threads)]
    if a.model:
        cmd += ["--model", a.model]
    if a.no_figures:
        cmd.append("--no-figures")
    if where:
        cmd.append("--where")
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("WORKER ")]
    if p.returncode != 0 or not line:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"worker {path} failed (exit {p.returncode})")
    return json.loads(line[-1][len("WORKER "):])


# ------------------------------------------------------------------------------------------
# comparisons


#: the issue's tolerance for "the same maps" (max |a − b| / max |b| per map)
TOLERANCE = 1e-5


def compare_runs(d_old: Path, d_new: Path) -> dict:
    """Max abs / rel differences of the lesion maps and table numbers of two explain runs."""
    import nibabel as nib
    import pandas as pd

    out = {"maps": 0, "max_abs": 0.0, "max_rel": 0.0, "table_max_rel": 0.0, "same_files": True}
    files_old = sorted(p.relative_to(d_old) for p in (d_old / "saliency").rglob("*.nii.gz"))
    files_new = sorted(p.relative_to(d_new) for p in (d_new / "saliency").rglob("*.nii.gz"))
    if files_old != files_new:
        out["same_files"] = False
    for f in sorted(set(files_old) & set(files_new)):
        a = np.asarray(nib.load(str(d_new / f)).dataobj, dtype=np.float64)
        b = np.asarray(nib.load(str(d_old / f)).dataobj, dtype=np.float64)
        if a.shape != b.shape:
            out["same_files"] = False
            continue
        num = float(np.abs(a - b).max()) if a.size else 0.0
        den = float(np.abs(b).max()) if b.size else 0.0
        out["maps"] += 1
        if den > 0 and num / den > TOLERANCE:
            out.setdefault("over", []).append((str(f), num / den))
        out["max_abs"] = max(out["max_abs"], num)
        out["max_rel"] = max(out["max_rel"], num / den if den > 0 else (0.0 if num == 0
                                                                         else float("inf")))
    ta = pd.read_csv(d_new / "instances_full.csv")
    tb = pd.read_csv(d_old / "instances_full.csv")
    if list(ta.columns) != list(tb.columns) or len(ta) != len(tb):
        out["same_files"] = False
    else:
        for c in ta.columns:
            if ta[c].dtype.kind in "fi" and tb[c].dtype.kind in "fi":
                va, vb = ta[c].to_numpy(float), tb[c].to_numpy(float)
                ok = np.isfinite(va) & np.isfinite(vb)
                if (np.isfinite(va) != np.isfinite(vb)).any():
                    out["same_files"] = False
                if ok.any():
                    scale = max(float(np.abs(vb[ok]).max()), 1e-12)
                    out["table_max_rel"] = max(out["table_max_rel"],
                                               float(np.abs(va[ok] - vb[ok]).max()) / scale)
    return out


SHARE_ROWS = [
    ("prediction (sliding window, no gradients)", ["predict"]),
    ("SmoothGrad: forward passes", ["smoothgrad.forward"]),
    ("SmoothGrad: backward passes", ["smoothgrad.backward"]),
    ("SmoothGrad: noise, cotangents, scatter/blend", ["smoothgrad.rest"]),
    ("Grad-CAM++: forward passes", ["gradcampp.forward"]),
    ("Grad-CAM++: backward passes", ["gradcampp.backward"]),
    ("Grad-CAM++: weights, upsampling, blending", ["gradcampp.rest"]),
    ("quantification (shells, features, profiles, to_dense)", ["quantify"]),
    ("NIfTI writing", ["nifti"]),
    ("figures, viewer, report.html", ["figures"]),
    ("other (loading, instances, tables, run.json)", ["other"]),
]


def shares(res: dict) -> dict:
    """Seconds per row of :data:`SHARE_ROWS` from one --where worker result."""
    t, tm = res["timers"], res["timings"]
    s = {"predict": tm.get("predict_s", 0.0)}
    for meth in ("smoothgrad", "gradcampp"):
        tot = t.get(f"{meth}.total", 0.0)
        f, b = t.get(f"{meth}.forward", 0.0), t.get(f"{meth}.backward", 0.0)
        s[f"{meth}.forward"], s[f"{meth}.backward"] = f, b
        s[f"{meth}.rest"] = max(tot - f - b, 0.0)
    q = [v for k, v in t.items() if k.startswith("quantify.")]
    nifti = t.get("nifti.lesion_maps", 0.0) + t.get("nifti.save_map", 0.0)
    s["nifti"] = nifti
    # quantify_s of run.json holds quantification, map writing and the to_dense/to_user calls
    s["quantify"] = max(tm.get("quantify_s", 0.0) - t.get("nifti.lesion_maps", 0.0), sum(q))
    s["figures"] = tm.get("figures_s", 0.0)
    s["other"] = max(res["wall_s"] - sum(s.values()), 0.0)
    return s


def print_shares(res: dict) -> None:
    s = shares(res)
    total = res["wall_s"]
    print(f"\n=== where the time goes ({res['path']} path; wall {total:.1f} s, CPU "
          f"{res['cpu_s']:.1f} s, {res['instances']} instances, torch threads "
          f"{res['torch_threads']}) ===")
    print(f"{'step':<56} {'s':>8} {'share':>7}")
    for label, keys in SHARE_ROWS:
        v = sum(s.get(k, 0.0) for k in keys)
        print(f"{label:<56} {v:>8.1f} {100 * v / total:>6.1f}%")


# ------------------------------------------------------------------------------------------


def float64_check(a, inputs: dict, run_dir: Path, over: list) -> None:
    """Recompute the SmoothGrad maps listed in ``over`` (old vs new beyond the tolerance) for
    their lesions alone: the previous path and the current one in float32, and a float64
    reference (the network in float64, the same float32 noise tensors promoted exactly, the
    gradient rounded to float32 at the input), and print each one's difference to the
    reference. Where a PReLU pre-activation lies within float32 rounding of 0 in one noisy
    copy, float32 cannot decide the kink and both paths may differ from the reference there."""
    import copy

    import nibabel as nib
    import torch

    from instance_saliency.io import load_images
    from instance_saliency.models import load_model
    from instance_saliency.models.base import as_module
    from instance_saliency.saliency import _speed, smoothgrad
    from instance_saliency.saliency.base import draw_noise, noise_sigma
    from instance_saliency.targets import InstanceTarget

    labels = sorted({int(re.search(r"lesion_(\d+)", f).group(1)) for f, _ in over
                     if "smoothgrad" in f})
    if not labels:
        print("float64 check: no SmoothGrad map beyond the tolerance")
        return
    cfg = json.loads((run_dir / "run.json").read_text())["parameters"]
    m = load_model(a.model, "cpu")
    subj = load_images([inputs["flair"], inputs["mprage"]], list(m.channels), None)
    prep = m.prepare(subj.image, subj.spacing, affine=subj.affine)
    lab = np.asarray(nib.load(str(run_dir / "instances.nii.gz")).dataobj)
    grid = m.grid(prep.x.shape[1:])
    x = torch.from_numpy(np.ascontiguousarray(prep.x, np.float32))
    noise = torch.stack(list(draw_noise(tuple(x.shape), noise_sigma(x, cfg["noise_level"]),
                                        cfg["n_samples"], cfg["seed"])))

    class Float64(torch.nn.Module):
        """float32 in and out, the network in float64 (kinks decided in float64)."""

        def __init__(self, net):
            super().__init__()
            self.net = copy.deepcopy(net).double()

        def forward(self, v):
            return self.net(v.double()).float()

    def maps(model, legacy):
        _speed.LEGACY = legacy
        try:
            targets = [InstanceTarget(prep.to_net(lab == k), m.lesion_class, cfg["reduction"])
                       for k in labels]
            res = smoothgrad(model, x, targets, mode="sliding", grid=grid, noise=noise,
                             sw_batch_size=cfg["sw_batch_size"])
        finally:
            _speed.LEGACY = False
        return [np.asarray(r.maps["mean"].to_dense(), np.float64) for r in res]

    old, new, ref = maps(m, True), maps(m, False), maps(Float64(as_module(m)), True)
    print(f"float64 check (SmoothGrad, N = {cfg['n_samples']}, each lesion alone, the same "
          f"noise; per map max |a - b| / max |reference|, voxels beyond {TOLERANCE:g}):")
    for k, o, n, r in zip(labels, old, new, ref):
        scale = float(np.abs(r).max())

        def d(u, v):
            diff = np.abs(u - v) / scale
            return f"{diff.max():.2e} ({int((diff > TOLERANCE).sum())} voxels)"

        print(f"  lesion {k:03d}: previous float32 vs float64 {d(o, r)}; current float32 vs "
              f"float64 {d(n, r)}; current vs previous {d(n, o)}", flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return _worker(a)
    wd = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_cpu_speed_"))
    wd.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(a, wd)
    import torch

    print(f"scan {a.subject} ({'full' if a.crop == 'full' else 'crop ' + a.crop}), N = {a.n}, "
          f"methods {a.methods}, figures {'off' if a.no_figures else 'on'}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; work folder {wd}", flush=True)
    if a.where:
        res = run_worker(a, a.path, wd / f"out_where_{a.path}", inputs, where=True)
        print_shares(res)
        print("timers (s): " + json.dumps({k: round(v, 2) for k, v in sorted(
            res["timers"].items())}))
        print("run.json timings (s): " + json.dumps(res["timings"]))
        return 0
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    runs: dict = {p: [] for p in paths}
    for r in range(a.repeats):
        order = paths if r % 2 == 0 else list(reversed(paths))
        for p in order:
            res = run_worker(a, p, wd / f"out_{p}_{r}", inputs)
            runs[p].append(res)
            print(f"repeat {r}: {p:<4} wall {res['wall_s']:8.1f} s  CPU {res['cpu_s']:8.1f} s  "
                  f"peak RSS {res['peak_rss_gb']:.2f} GB  load "
                  f"{os.getloadavg()[0]:.2f}  steps {json.dumps(res['timings'])}", flush=True)
    result = {}
    if "old" in runs and "new" in runs:
        walls = [o["wall_s"] / n["wall_s"] for o, n in zip(runs["old"], runs["new"])]
        cpus = [o["cpu_s"] / n["cpu_s"] for o, n in zip(runs["old"], runs["new"])]
        print("\n=== old / new (same input, alternating runs; the machine's load varies) ===")
        print(f"end to end, wall: {', '.join(f'{v:.2f}x' for v in walls)} (median "
              f"{np.median(walls):.2f}x); CPU time: {', '.join(f'{v:.2f}x' for v in cpus)} "
              f"(median {np.median(cpus):.2f}x)")
        keys = [k for k in runs["old"][0]["timings"] if k.endswith("_s")]
        for k in keys:
            o = [r["timings"].get(k) for r in runs["old"]]
            n = [r["timings"].get(k) for r in runs["new"]]
            if all(v for v in o + n):
                print(f"  {k:<14} old {np.median(o):8.1f} s  new {np.median(n):8.1f} s  "
                      f"ratio {np.median(o) / np.median(n):.2f}x")
        diff = compare_runs(wd / "out_old_0", wd / "out_new_0")
        print(f"maps compared: {diff['maps']} lesion map files; max |new - old| = "
              f"{diff['max_abs']:.3e}; max relative (per map max|a-b|/max|b|) = "
              f"{diff['max_rel']:.3e}; instances_full.csv numbers max relative "
              f"{diff['table_max_rel']:.3e}; same files and rows: {diff['same_files']}")
        for f, rel in diff.get("over", []):
            print(f"  beyond {TOLERANCE:g}: {f} ({rel:.2e})")
        if a.float64_check and diff.get("over"):
            float64_check(a, inputs, wd / "out_new_0", diff["over"])
        result = {"speedup": np.median(walls), "cpu_speedup": np.median(cpus),
                  "max_abs_diff": diff["max_abs"], "max_rel_diff": diff["max_rel"]}
    if a.exact_vs_captum:
        cmd = [sys.executable, str(HERE / "bench_instance_saliency.py"), "--k", "8", "--n", "1",
               "--skip", "patch,curve", "--k-curve", ""] + (["--model", a.model] if a.model else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
        print("exact mode vs the Captum per-lesion loop (K = 8, N = 1): "
              + (lines[-1] if lines else f"failed: {p.stderr[-500:]}"))
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
