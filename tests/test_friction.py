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


# ------------------------------------------------------------------------------------------
# NIfTI headers and masks


def test_saved_maps_keep_qform_and_sform_as_they_were(tmp_path):
    from instance_saliency.io import load_images, save_map

    sheared = np.eye(4)
    sheared[0, 1] = 0.02  # a slightly sheared sform, no qform (code 0): ITK reads the qform
    sheared[:3, 3] = [-10, 5, 3]
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32) + 1
    img = nib.Nifti1Image(data, None)
    img.header.set_sform(sheared, 2)
    img.header.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    ref = nib.load(str(tmp_path / "in.nii.gz")).header
    s = load_images([tmp_path / "in.nii.gz"], ["FLAIR"])
    save_map(tmp_path / "out.nii.gz", data, s.affine, s.header)
    h = nib.load(str(tmp_path / "out.nii.gz")).header
    for k in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
              "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(h[k], ref[k]), k
    assert int(h["qform_code"]) == 0 and int(h["sform_code"]) == 2
    # both codes set (qform != sform): both kept; a crop's affine moves both by the same offset
    img = nib.Nifti1Image(data, None)
    q = np.diag([1.2, 1.0, 1.0, 1.0])
    q[:3, 3] = [1, 2, 3]
    img.header.set_qform(q, 1)
    img.header.set_sform(sheared, 4)
    nib.save(img, str(tmp_path / "in2.nii.gz"))
    s = load_images([tmp_path / "in2.nii.gz"], ["FLAIR"])
    crop = s.affine.copy()
    crop[:3, 3] = s.affine[:3, :3] @ [2, 3, 1] + s.affine[:3, 3]
    save_map(tmp_path / "crop.nii.gz", data[2:, 3:, 1:], crop, s.header)
    out = nib.load(str(tmp_path / "crop.nii.gz"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 4)
    np.testing.assert_allclose(out.header.get_sform(), crop, atol=1e-6)
    np.testing.assert_allclose(out.header.get_qform()[:3, 3], q[:3, :3] @ [2, 3, 1] + q[:3, 3],
                               atol=1e-5)


def test_mask_with_non_binary_values_is_refused(tmp_path, capsys):
    m = np.zeros((10, 10, 10), np.float32)
    m[2:5, 2:5, 2:5] = 0.7
    bad = _save(tmp_path / "soft.nii.gz", m)
    ok = np.zeros((10, 10, 10), np.float32)
    ok[2:5, 2:5, 2:5] = 1.0
    good = _save(tmp_path / "ok.nii.gz", ok)  # a float 0/1 mask is fine
    assert cli.main(["evaluate", "--pred", str(good), "--mask", str(bad)]) == 2
    assert _err(capsys) == (f"instance-saliency: error: mask file {bad} is not binary: values "
                            "[0.7] besides 0/1 (threshold it first, e.g. at 0.5)")
    assert cli.main(["evaluate", "--pred", str(good), "--mask", str(good)]) == 0


def test_cohort_failures_leave_no_lock_file(tmp_path):
    from instance_saliency.cohort import _update_failures

    (tmp_path / ".failures.lock").write_text("")  # left by an earlier version
    cur = _update_failures(tmp_path, {"s1": {"error": "InputError", "message": "m"}}, [])
    assert list(cur) == ["s1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failures.json"]
    assert _update_failures(tmp_path, {}, ["s1"]) == {}
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# cohort statistics


def _cohort(root, n_subjects, methods=("smoothgrad",), seed=0):
    """Subject folders with synthetic instances.csv / profiles.csv (TP high, FP low peaks)."""
    rng = np.random.default_rng(seed)
    for s in range(n_subjects):
        d = root / "subjects" / f"S{s}"
        d.mkdir(parents=True)
        rows, prof = [], []
        for label, status in enumerate(["TP"] * 4 + ["FP"] * 3 + ["FN"] * 2, start=1):
            r = {"label": label, "status": status, "volume_mm3": float(rng.uniform(5, 50))}
            base = {"TP": 3.0, "FP": 1.0, "FN": 0.5}[status]
            for m in methods:
                chans = ("flair", "mprage") if m == "smoothgrad" else ("cam",)
                for ch in chans:
                    p = f"{m}_{ch}"
                    r[f"{p}_peak_max"] = base + rng.normal(0, 0.3)
                    r[f"{p}_peak_min"] = -base / 2 + rng.normal(0, 0.3)
                    r[f"{p}_mean_in"] = base / 3 + rng.normal(0, 0.3)
                    for k in range(1, 6):
                        r[f"{p}_rim_out_{k}mm"] = -0.1 * base + rng.normal(0, 0.1)
                    for dist in (-0.5, 0.5, 1.5):
                        prof.append({"label": label, "status": status, "method": m,
                                     "channel": ch, "distance_mm": dist,
                                     "mean": base - dist + rng.normal(0, 0.1), "voxels": 5})
                if m == "smoothgrad":
                    r["smoothgrad_flair_share"] = float(rng.uniform(0.5, 0.9))
            rows.append(r)
        pd.DataFrame(rows).to_csv(d / "instances.csv", index=False)
        pd.DataFrame(prof).to_csv(d / "profiles.csv", index=False)
        (d / "run.json").write_text("{}")


def test_bootstrap_ci_not_estimable_with_two_subjects(tmp_path):
    from instance_saliency import stats

    r = stats.subject_bootstrap(["a", "a", "b", "b"], lambda i: float(np.mean(i)), 200, 0)
    assert r["estimate"] == pytest.approx(1.5)
    assert np.isnan(r["ci_low"]) and np.isnan(r["ci_high"]) and r["n_valid"] == 0
    assert r["ci_note"].startswith("not estimable: 2 subject(s)")
    r3 = stats.subject_bootstrap(["a", "b", "c"], lambda i: float(np.mean(i)), 200, 0)
    assert r3["ci_low"] < r3["ci_high"] and "ci_note" not in r3
    _cohort(tmp_path, 2)
    res = stats.analyze(tmp_path, n_boot=50, figures=False, log=lambda m: None)
    auc = res["peak_by_status"]["features"][0]["auc_fp_vs_tp"]
    assert np.isnan(auc["ci_low"]) and "not estimable" in auc["ci_note"]
    md = (tmp_path / "stats.md").read_text()
    assert "[CI not estimable: 2 subject(s)" in md and "[–, –]" not in md
    js = json.loads((tmp_path / "stats.json").read_text())
    assert js["flair_vs_mprage"]["share"]["ci_low"] is None  # NaN -> null, not a 0-width CI


def test_stats_md_links_no_figures_under_no_figures(tmp_path):
    _cohort(tmp_path, 3)
    assert cli.main(["analyze", str(tmp_path), "--n-boot", "20", "--no-figures"]) == 0
    md = (tmp_path / "stats.md").read_text()
    assert "figures/" not in md and ".png" not in md
    assert not (tmp_path / "figures").exists()
    assert cli.main(["analyze", str(tmp_path), "--n-boot", "20"]) == 0
    md = (tmp_path / "stats.md").read_text()
    assert "`figures/profile_by_status.png`" in md
    assert (tmp_path / "figures" / "profile_by_status.png").is_file()


def test_analyze_gradcampp_only_cohort_uses_the_method_present(tmp_path, capsys):
    from instance_saliency import stats

    _cohort(tmp_path, 3, methods=("gradcampp",))
    res = stats.analyze(tmp_path, n_boot=20, figures=False, log=lambda m: None)
    assert (res["method"], res["channel"]) == ("gradcampp", "cam")
    assert res["sign_pattern"]["available"] and res["sign_pattern"]["overall"]["n"] == 27
    assert not res["flair_vs_mprage"]["available"]  # one map, no FLAIR/MPRAGE comparison
    assert set(res["profile"]) == {"cam"}
    assert cli.main(["analyze", str(tmp_path), "--n-boot", "20", "--method", "smoothgrad",
                     "--no-figures"]) == 2
    assert _err(capsys) == ("instance-saliency: error: --method smoothgrad: no smoothgrad maps "
                            "in this cohort; present: gradcampp")


# ------------------------------------------------------------------------------------------
# model folder errors


NNUNET = ROOT / "tests" / "data" / "nnunet" / "Dataset501_MSLesionFlairT1" / \
    "nnUNetTrainer_ISFixture__nnUNetPlans_tiny__3d_fullres"


def test_model_given_as_a_file_names_its_folder(tmp_path, capsys):
    from instance_saliency.errors import ModelError
    from instance_saliency.models import model_kind

    with pytest.raises(ModelError) as e:
        model_kind(NNUNET / "fold_0" / "checkpoint_final.pth")
    assert str(e.value) == (f"--model {NNUNET / 'fold_0' / 'checkpoint_final.pth'} is a file; "
                            f"give the model folder that holds it: --model {NNUNET}")
    f = _save(tmp_path / "flair.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(ModelError, match=r"is a file; give the model folder \(an "
                       r"instance-saliency checkpoint folder with config.json"):
        model_kind(f)


def test_checkpoint_folder_without_config_names_the_file(tmp_path):
    from instance_saliency.errors import ModelError
    from instance_saliency.models import model_kind

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError) as e:
        model_kind(tmp_path)
    assert str(e.value) == f"model folder {tmp_path} has model.safetensors but no config.json"


def test_state_dict_mismatch_is_described_in_one_line():
    import torch

    from instance_saliency.models.nnunet import describe_state_dict_mismatch

    net = {"a.weight": torch.zeros(4, 2, 3), "a.bias": torch.zeros(4), "b": torch.zeros(1)}
    got = {"a.weight": torch.zeros(3, 2, 3), "a.bias": torch.zeros(3), "c": torch.zeros(1)}
    assert describe_state_dict_mismatch(net, got) == (
        "a.weight has shape (3, 2, 3) in the file, (4, 2, 3) in the network (2 tensors differ "
        "in shape); 1 weight(s) missing, e.g. b; 1 unexpected weight(s), e.g. c")
    assert describe_state_dict_mismatch(net, dict(net)) == ""
