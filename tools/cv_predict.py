#!/usr/bin/env python
"""Held-out probability map of a fold ensemble and/or test-time mirroring, for
``tools/cv_report.py``.

Every run given must hold out the same scan (``train --val-subjects``): their weights are
assembled into one ensemble folder (the checkpoint format the package ships, with each fold's
own histogram standard kept exactly through :class:`instance_saliency.models.HistogramRemap`),
loaded with the package's loader, and run on the held-out scan. The output folder looks like a
training run to ``cv_report.py`` (``config.json`` + ``val_prob_0.nii.gz``), so the
post-processing is again chosen on the other folds only.

    python tools/cv_predict.py ../runs/cv_h_P18 ../runs/cv_h1_P18 --out ../runs/ens_P18 \\
        [--mirror-axes 0] [--average-weights]

``--average-weights`` averages the runs' weights (and batch-norm statistics) into one network
instead of averaging their logits: for runs of one training trajectory, e.g. a fold and its
fine-tuned continuation (``train --init-from``), which share the architecture and the input
standard (refused otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np


def held_out(cfg: dict) -> str:
    return re.search(r"val=\['([^']+)'\]", cfg["training"]["data"]).group(1)


def _configs(runs: list) -> list:
    """The runs' configs, after checking that they hold out one scan."""
    cfgs = [json.loads((r / "config.json").read_text()) for r in runs]
    if len({held_out(c) for c in cfgs}) != 1:
        sys.exit("cv_predict: the runs hold out different scans")
    return cfgs


def _empty(folder: Path) -> None:
    """``folder``, made anew and empty."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _trained_on(cfgs: list) -> list:
    """Every scan some run trained on (sorted)."""
    return sorted({s for c in cfgs for s in c.get("trained_on", [])})


def assemble(runs: list, folder: Path, mirror_axes: list) -> dict:
    """Write an ensemble checkpoint folder of ``runs`` into ``folder``; return its config."""
    cfgs = _configs(runs)
    _empty(folder)
    names = []
    for i, r in enumerate(runs):
        name = f"member_{i}_{r.name}"
        (folder / name).mkdir()
        for f in ("config.json", "model.safetensors"):
            os.link(r / f, folder / name / f)
        names.append(name)
    top = dict(cfgs[0])
    if top.get("normalisation") == "histogram":
        top["landmarks"] = np.mean([c["landmarks"] for c in cfgs], 0).round(6).tolist()
    top.update(members=names, mirror_axes=list(mirror_axes), trained_on=_trained_on(cfgs))
    (folder / "config.json").write_text(json.dumps(top, indent=1))
    return top


def average(runs: list, folder: Path) -> dict:
    """Write one checkpoint folder whose weights are the mean of ``runs``' weights (integer
    buffers, e.g. batch norm's step counters, from the first run); return its config."""
    import torch
    from safetensors.torch import load_file, save_file

    cfgs = _configs(runs)
    shape = {(c["architecture"], json.dumps(c["arguments"]), c.get("normalisation"),
              json.dumps(c.get("landmarks"))) for c in cfgs}
    if len(shape) != 1:
        sys.exit("cv_predict --average-weights: the runs differ in architecture, arguments or "
                 "input standard")
    states = [load_file(str(r / "model.safetensors")) for r in runs]
    mean = {k: (torch.stack([st[k] for st in states]).mean(0) if v.is_floating_point() else v)
            for k, v in states[0].items()}
    _empty(folder)
    save_file(mean, str(folder / "model.safetensors"))
    top = dict(cfgs[0])
    top["trained_on"] = _trained_on(cfgs)
    top["training"] = dict(top.get("training", {}), averaged_weights=[str(r) for r in runs])
    (folder / "config.json").write_text(json.dumps(top, indent=1))
    return top


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--mirror-axes", default="", help="e.g. 0 or 0,1,2 (empty: none)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--average-weights", action="store_true",
                   help="one network with the runs' mean weights instead of a logit ensemble")
    a = p.parse_args(argv)
    import torch

    from instance_saliency import datasets
    from instance_saliency.inference import sliding_window_logits
    from instance_saliency.io import load_images, save_map
    from instance_saliency.models import load_model

    axes = [int(v) for v in a.mirror_axes.split(",") if v.strip()]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.average_weights and axes:
        sys.exit("cv_predict: --average-weights takes no --mirror-axes")
    top = (average(a.runs, a.out / "model") if a.average_weights
           else assemble(a.runs, a.out / "model", axes))
    held = held_out(top)
    files = datasets.fetch_subject(held, a.data_dir)
    s = load_images([files["flair"], files["mprage"]], ["FLAIR", "MPRAGE"])
    model = load_model(a.out / "model")
    prep = model.prepare(s.image, s.spacing)
    x = torch.from_numpy(prep.x)
    with torch.no_grad():
        logits = sliding_window_logits(model.network, x[None], model.grid(prep.x.shape[1:]),
                                       a.sw_batch_size)
    prob = prep.probabilities(logits[0].numpy())[model.lesion_class]
    save_map(a.out / "val_prob_0.nii.gz", prob, s.affine)
    cfg = json.loads((a.runs[0] / "config.json").read_text())
    cfg["training"]["ensemble"] = {"runs": [str(r) for r in a.runs], "mirror_axes": axes,
                                   "averaged_weights": a.average_weights}
    (a.out / "config.json").write_text(json.dumps(cfg, indent=1))
    print(f"{a.out}: held-out {held}, {len(model.members)} member term(s), "
          f"mean probability {float(prob.mean()):.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
