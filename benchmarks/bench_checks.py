#!/usr/bin/env python
"""Benchmark: the cost of the per-lesion trust checks against the cost of ``explain``, side by
side in one run, on a real public scan (open_ms_data patient07, the demo scan) or a crop of it.

Runs ``instance-saliency explain`` with its default settings (SmoothGrad N = 50 + Grad-CAM++,
exact sliding-window mode) and then ``instance-saliency check`` with its default settings on the
same run, and prints the wall time of each, their ratio (goal: check ≤ 3 × explain), the seconds
per lesion of each check and the number of windows re-run.

Run (from the checkout)::

    INSTANCE_SALIENCY_DATA=../shared/data python benchmarks/bench_checks.py --crop 96
    INSTANCE_SALIENCY_DATA=../shared/data python benchmarks/bench_checks.py --crop 0   # full scan

The last line is machine-readable::

    RESULT check_over_explain=<x> explain_s=<s> check_s=<s> lesions=<n>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _crop(out: Path, side: int) -> dict:
    import nibabel as nib
    import numpy as np

    from instance_saliency import datasets

    p = datasets.fetch_subject("patient07", os.environ.get("INSTANCE_SALIENCY_DATA"))
    if side <= 0:
        return {k: Path(v) for k, v in p.items()}
    gt = np.asarray(nib.load(str(p["mask"])).dataobj) > 0
    c = np.argwhere(gt).mean(0).astype(int)
    sl = tuple(slice(int(a) - side // 2, int(a) - side // 2 + side) for a in c)
    files = {}
    for k in ("flair", "mprage", "mask"):
        img = nib.load(str(p[k]))
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ np.array([s.start for s in sl]) + img.affine[:3, 3]
        files[k] = out / f"{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[sl], aff, img.header), str(files[k]))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop", type=int, default=96, help="cube side around the lesions (0: full)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--keep", help="keep the run in this folder")
    ap.add_argument("--model", default=None,
                    help="model folder for both commands (default: the shipped member that "
                    "never saw patient07, weights/default/fold_patient07: one network, so "
                    "that the explained lesions are held-out ones)")
    a = ap.parse_args()
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="bench-checks-"))
    tmp.mkdir(parents=True, exist_ok=True)
    f = _crop(tmp, a.crop)
    exe = [sys.executable, "-m", "instance_saliency.cli"]
    if a.model is None:
        import instance_saliency

        a.model = str(Path(instance_saliency.__file__).parent / "weights" / "default"
                      / "fold_patient07")
    run = tmp / "run"
    t0 = time.time()
    subprocess.run(exe + ["explain", "--flair", str(f["flair"]), "--mprage", str(f["mprage"]),
                          "--mask", str(f["mask"]), "--out", str(run), "--overwrite", "--quiet",
                          "--no-figures", "--model", a.model], check=True)
    t_explain = time.time() - t0
    t0 = time.time()
    subprocess.run(exe + ["check", str(run), "--overwrite", "--quiet", "--no-figures"]
                   + (["--threads", str(a.threads)] if a.threads else []), check=True)
    t_check = time.time() - t0
    info = json.loads((run / "checks.json").read_text())
    n = len(info["lesions"])
    print(f"model: {a.model}")
    print(f"explain (defaults): {t_explain:.0f} s; check (defaults): {t_check:.0f} s on {n} "
          f"predicted lesions; ratio {t_check / t_explain:.2f} (goal <= 3)")
    print("cost by check:", json.dumps(info["cost"]))
    print(f"RESULT check_over_explain={t_check / t_explain:.3f} explain_s={t_explain:.1f} "
          f"check_s={t_check:.1f} lesions={n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
