#!/usr/bin/env python
"""Leave-one-scan-out cross-validation report of training runs, with post-processing chosen
without the reported scan.

Each run folder is one fold: ``instance-saliency train --val-subjects <held-out scan>
--save-val-prob`` wrote its held-out probability map (``val_prob_0.nii.gz``, final EMA weights,
no checkpoint selection). For every fold the post-processing (lesion probability threshold and
minimum lesion size in mm³, 26-connected components) is chosen by the mean nDSC over the
*other* folds' held-out maps (nested leave-one-out), then applied to this fold's map: no
reported figure comes from a scan used to pick a setting. Also printed: the plain setting
(threshold 0.5, no size filter), and with ``--at T`` every fold at threshold T, no size filter.

``--save-grid DIR`` writes each fold's scores over every setting to ``DIR/<run>.json`` (about
20 kB); such a file can be given in place of a run folder, so that folds trained in different
sittings (whose run folders are not kept) are reported together.

    python tools/cv_report.py ../runs/cv_v2_* [--markdown] [--at 0.3 --at 0.5]
    python tools/cv_report.py ../runs/dyn_P18 grids/dyn_P39.json ... --save-grid grids
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_SIZES_MM3 = (0, 5, 10, 20, 40, 60, 100)


def postprocess(prob: np.ndarray, thr: float, min_mm3: float, voxel_mm3: float) -> np.ndarray:
    import cc3d

    m = prob >= thr
    if min_mm3 <= 0 or not m.any():
        return m
    lab = cc3d.connected_components(m.astype(np.uint8), connectivity=26)
    sizes = np.bincount(lab.ravel()) * voxel_mm3
    keep = sizes >= min_mm3
    keep[0] = False
    return keep[lab]


def save_grid(fold: dict, out_dir: Path) -> None:
    """Write one fold's scores over every setting to ``out_dir/<run>.json`` (temporary name,
    then rename); ``load_grid`` reads it back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = [{"threshold": t, "min_size_mm3": s,
             "scores": {k: v.item() if isinstance(v, np.generic) else v for k, v in sc.items()}}
            for (t, s), sc in fold["grid"].items()]
    tmp = out_dir / f".{fold['run']}.json.tmp"
    tmp.write_text(json.dumps(dict(fold, grid=grid), indent=1))
    tmp.replace(out_dir / f"{fold['run']}.json")


def load_grid(path: Path) -> dict:
    """One fold as written by ``save_grid``, its grid keyed by (threshold, min size)."""
    fold = json.loads(path.read_text())
    fold["grid"] = {(g["threshold"], g["min_size_mm3"]): g["scores"] for g in fold["grid"]}
    return fold


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--criterion", choices=("ndsc", "ndsc+f1"), default="ndsc",
                   help="what the post-processing maximises on the other folds: mean nDSC, or "
                   "the mean of nDSC and lesion F1")
    p.add_argument("--at", type=float, action="append", default=[], metavar="THRESHOLD",
                   choices=THRESHOLDS, help="also print every fold at this fixed threshold, no "
                   "size filter (a setting chosen on no scan, e.g. the shipped model's 0.3); "
                   "repeatable")
    p.add_argument("--save-grid", type=Path, default=None, metavar="DIR",
                   help="write each fold's scores over every setting to DIR/<run>.json")
    a = p.parse_args(argv)
    import nibabel as nib

    from instance_saliency import datasets
    from instance_saliency.io import load_mask
    from instance_saliency.metrics import evaluate_pair

    folds = []
    for r in sorted(a.runs):
        r = Path(r)
        if r.suffix == ".json":
            folds.append(load_grid(r))
            continue
        cfg = json.loads((r / "config.json").read_text())
        data = cfg["training"]["data"]
        held = re.search(r"val=\['([^']+)'\]", data).group(1)
        train = re.search(r"train=\[([^\]]*)\]", data).group(1).replace("'", "")
        files = datasets.fetch_subject(held, a.data_dir)
        gt = load_mask(files["mask"])
        img = nib.load(str(r / "val_prob_0.nii.gz"))
        prob = np.asarray(img.dataobj, dtype=np.float32)
        vox = float(abs(np.linalg.det(img.affine[:3, :3])))
        grid = {(t, s): evaluate_pair(gt, postprocess(prob, t, s, vox))
                for t in THRESHOLDS for s in MIN_SIZES_MM3}
        folds.append({"run": r.name, "held_out": held, "train": train, "grid": grid,
                      "steps": cfg["training"]["steps"], "recipe": cfg["training"].get("recipe")})
        if a.save_grid is not None:
            save_grid(folds[-1], a.save_grid)
    def score(r):
        return r["ndsc"] if a.criterion == "ndsc" else (r["ndsc"] + r["lesion_f1"]) / 2

    rows = []
    for i, f in enumerate(folds):
        others = [g for j, g in enumerate(folds) if j != i]
        if others:
            best = max(f["grid"], key=lambda k: (np.mean([score(o["grid"][k]) for o in others]),
                                                 -abs(k[0] - 0.5), -k[1]))
        else:
            best = (0.5, 0)
        plain, chosen = f["grid"][(0.5, 0)], f["grid"][best]
        rows.append((f, best, plain, chosen))
    hdr = ("| held-out scan | trained on | nDSC (0.5, no filter) | nDSC | Dice | lesion F1 | "
           "TPR | FDR | predicted / true lesions | threshold, min size (chosen on the other "
           "folds) |")
    print(hdr)
    print("|" + "---|" * 10)
    for f, best, plain, c in rows:
        print(f"| {f['held_out']} | {f['train']} | {plain['ndsc']:.3f} | {c['ndsc']:.3f} | "
              f"{c['dice']:.3f} | {c['lesion_f1']:.3f} | {c['lesion_tpr']:.2f} | "
              f"{c['lesion_fdr']:.2f} | {c['n_pred_lesions']} / {c['n_gt_lesions']} | "
              f"{best[0]}, {best[1]} mm³ |")
    mean = {k: float(np.nanmean([c[k] for _, _, _, c in rows]))
            for k in ("ndsc", "dice", "lesion_f1", "lesion_tpr", "lesion_fdr")}
    plain_mean = float(np.mean([p_["ndsc"] for _, _, p_, _ in rows]))
    print(f"| **mean** | | {plain_mean:.3f} | {mean['ndsc']:.3f} | {mean['dice']:.3f} | "
          f"{mean['lesion_f1']:.3f} | {mean['lesion_tpr']:.2f} | {mean['lesion_fdr']:.2f} | | |")
    for t in a.at:
        fixed = [f["grid"][(t, 0)] for f in folds]
        print(f"\nfixed setting: threshold {t}, no size filter")
        for f, c in zip(folds, fixed):
            print(f"  {f['held_out']}: nDSC {c['ndsc']:.3f}, lesion F1 {c['lesion_f1']:.3f}, "
                  f"predicted / true lesions {c['n_pred_lesions']} / {c['n_gt_lesions']}")
        print(f"  mean: nDSC {np.mean([c['ndsc'] for c in fixed]):.3f}, lesion F1 "
              f"{np.mean([c['lesion_f1'] for c in fixed]):.3f}")
    allbest = max(folds[0]["grid"], key=lambda k: (np.mean([score(f["grid"][k]) for f in folds]),
                                                   -abs(k[0] - 0.5), -k[1]))
    print(f"\nsetting chosen on all {len(folds)} held-out maps (for a model trained on all "
          f"scans; not a reportable figure; criterion {a.criterion}): threshold {allbest[0]}, "
          f"min size {allbest[1]} mm³")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
