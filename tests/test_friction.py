"""Fixes of the friction a new user met (issue 14, item 4, and the earlier trial): exit codes,
one-line errors, headers, leftovers, rounding. Small synthetic inputs only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from instance_saliency import cli

ROOT = Path(__file__).resolve().parents[1]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def _save(path, data, affine=None, header=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine, header),
             str(path))
    return path


# ------------------------------------------------------------------------------------------
# command line


def test_bare_command_exits_2_like_argparse(capsys):
    assert cli.main([]) == 2
    assert _err(capsys).startswith("instance-saliency: error: a command is required")


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "--flair", "f", "--mprage", "m", "--out", "o", "--n-sample", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --n-sample" in _err(capsys)


def test_evaluate_subject_name_integer_counts_and_option_names(tmp_path, capsys):
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    gt[10:13, 10:13, 10:13] = 1
    pr = np.zeros_like(gt)
    pr[2:5, 2:5, 2:5] = 1
    pr[15:17, 15:17, 15:17] = 1
    (tmp_path / "sub01").mkdir()
    _save(tmp_path / "gt.nii.gz", gt)
    pred = _save(tmp_path / "sub01" / "prediction_mask.nii.gz", pr)
    assert cli.main(["evaluate", "--pred", str(pred), "--mask", str(tmp_path / "gt.nii.gz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = lines[0].split(",")
    row = dict(zip(head, lines[1].split(",")))
    assert row["subject"] == "sub01"  # the folder, not "prediction_mask"
    assert (row["n_tp"], row["n_fp"], row["n_fn"], row["n_gt_lesions"]) == ("1", "1", "1", "2")
    assert row["dice"] == "0.6067"  # 2*27/(54+35), 4 decimals
    assert lines[2].startswith("mean,") and lines[3].startswith("std,")
    assert cli.main(["evaluate", "--pred", str(pred), "--mask", str(tmp_path / "gt.nii.gz"),
                     "--iou-threshold", "0"]) == 2
    assert _err(capsys) == "instance-saliency: error: --iou-threshold must lie in (0, 1], got 0.0"


def test_module_entry_point_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "instance_saliency", "--version"],
                       capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0 and r.stdout.startswith("instance-saliency ")


# ------------------------------------------------------------------------------------------
# packaging


def test_licence_metadata_is_spdx_without_deprecation_warning(tmp_path):
    import shutil

    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "md").mkdir()
    r = subprocess.run([sys.executable, "-W", "always", "-c",
                        "import setuptools.build_meta as b; "
                        "print(b.prepare_metadata_for_build_wheel('md'))"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "License classifiers are deprecated" not in r.stderr + r.stdout
    assert "project.license" not in r.stderr + r.stdout  # the TOML-table form's deprecation
    meta = next((tmp_path / "md").glob("*.dist-info")) / "METADATA"
    text = meta.read_text()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text
