"""Command-line interface: a thin layer of argument parsing over the Python API.

Every :class:`~instance_saliency.errors.InstanceSaliencyError` is printed as one line
``instance-saliency: error: …`` and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import __version__
from .errors import InputError, InstanceSaliencyError


def _subject_from_args(name: str | None, data_dir: str | None):
    from . import datasets
    from .io import load_subject

    paths = datasets.fetch_subject(name, data_dir)
    return load_subject(paths["flair"], paths["mprage"], paths["mask"])


def _load_manifest_subjects(manifest: str):
    import pandas as pd

    from .io import load_subject

    df = pd.read_csv(manifest)
    return [load_subject(r.flair, r.mprage, r.mask) for r in df.itertuples()]


def cmd_train(a) -> int:
    import torch

    from .training import train

    if a.threads:
        torch.set_num_threads(a.threads)
    tr = [_subject_from_args(n, a.data_dir) for n in a.train_subjects]
    va = [_subject_from_args(n, a.data_dir) for n in a.val_subjects]
    if a.manifest:
        tr += _load_manifest_subjects(a.manifest)
    if not tr:
        raise InputError("no training subjects (use --train-subjects or --manifest)")
    arch_args = {}
    if a.channels:
        arch_args["channels"] = [int(c) for c in a.channels.split(",")]
        arch_args["strides"] = [2] * (len(arch_args["channels"]) - 1)
    summary = train(tr, va, a.out, architecture=a.architecture, arguments=arch_args,
                    roi_size=[a.roi] * 3, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                    val_every=a.val_every, seed=a.seed,
                    command="instance-saliency " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
                    data_description=f"train={a.train_subjects} val={a.val_subjects}")
    print(f"best validation nDSC {summary['best_val_ndsc']} at step {summary['best_step']}; "
          f"checkpoint in {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import ARCHITECTURES

    p = argparse.ArgumentParser(prog="instance-saliency", description=(
        "Explain 3D lesion segmentation models one lesion at a time (instance SmoothGrad and "
        "Grad-CAM++; Spagnolo et al., arXiv:2406.09335)."))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a segmentation model on scans with lesion masks")
    t.add_argument("--train-subjects", nargs="*", default=[], metavar="NAME",
                   help="public registry subjects to train on (e.g. patient19 P18 P39)")
    t.add_argument("--val-subjects", nargs="*", default=[], metavar="NAME",
                   help="public registry subjects to validate on (best checkpoint by nDSC)")
    t.add_argument("--manifest", help="CSV with columns subject,flair,mprage,mask to train on")
    t.add_argument("--architecture", default="unet3d", choices=sorted(ARCHITECTURES))
    t.add_argument("--channels", help="unet3d widths, e.g. 16,32,64,128,256")
    t.add_argument("--roi", type=int, default=96, help="cubic patch side in voxels")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    t.add_argument("--data-dir", help="local mirror of the public scans "
                   "(default: $INSTANCE_SALIENCY_DATA)")
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except InstanceSaliencyError as e:
        print(f"instance-saliency: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instance-saliency: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
