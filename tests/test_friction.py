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
from instance_saliency.errors import InputError

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
    std = dict(zip(head, lines[3].split(",")))
    assert std["dice"] == ""  # one subject: the sample SD is not estimable (ddof 1)
    # two subjects: the sample SD (ddof 1) of their values
    (tmp_path / "sub02").mkdir()
    pred2 = _save(tmp_path / "sub02" / "prediction_mask.nii.gz", gt)
    (tmp_path / "two.csv").write_text("subject,prediction,mask\nsub01,sub01/prediction_mask.nii.gz,"
                                      "gt.nii.gz\nsub02,sub02/prediction_mask.nii.gz,gt.nii.gz\n")
    assert pred2.is_file()
    assert cli.main(["evaluate", "--manifest", str(tmp_path / "two.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    std = dict(zip(head, lines[4].split(",")))
    assert float(std["dice"]) == round(float(np.std([54 / 89, 1.0], ddof=1)), 4)
    assert cli.main(["evaluate", "--pred", str(pred), "--mask", str(tmp_path / "gt.nii.gz"),
                     "--iou-threshold", "0"]) == 2
    assert _err(capsys) == "instance-saliency: error: --iou-threshold must lie in (0, 1], got 0.0"


def test_analyze_names_the_option_in_errors(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path), "--p0", "1.5"]) == 2
    assert _err(capsys) == "instance-saliency: error: --p0 must lie strictly between 0 and 1, got 1.5"


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
    # a soft or missing prediction is named as the prediction, not as "mask"
    assert cli.main(["evaluate", "--pred", str(bad), "--mask", str(good)]) == 2
    assert _err(capsys).startswith(f"instance-saliency: error: prediction file {bad} is not "
                                   "binary: values [0.7]")
    assert cli.main(["evaluate", "--pred", str(tmp_path / "none.nii.gz"),
                     "--mask", str(good)]) == 2
    assert _err(capsys) == ("instance-saliency: error: prediction file not found: "
                            f"{tmp_path / 'none.nii.gz'}")


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


# ------------------------------------------------------------------------------------------
# explain and predict on a small synthetic brain (tissue classes in T1 / FLAIR order)


def _ball(n, c, r):
    g = np.indices((n,) * 3).astype(float)
    return ((g - np.asarray(c, float)[:, None, None, None]) ** 2).sum(0) <= r * r


def brain_scan(n=28, seed=0):
    """FLAIR, T1 and lesion mask of a synthetic brain: CSF 15 %, GM 40 %, WM 45 % of voxels,
    T1 order CSF < GM < WM, FLAIR order CSF (suppressed) < WM < GM < lesions; two lesions
    of 33 voxels, one 2-voxel ground-truth speck."""
    rng = np.random.default_rng(seed)
    brain = _ball(n, (n // 2,) * 3, n // 2 - 1)
    u = rng.random((n,) * 3)
    tissue = np.where(u < 0.15, 0, np.where(u < 0.55, 1, 2))
    t1 = np.choose(tissue, [0.35, 0.6, 0.9]) + rng.normal(0, 0.03, (n,) * 3)
    fl = np.choose(tissue, [0.1, 0.75, 0.62]) + rng.normal(0, 0.03, (n,) * 3)
    mask = np.zeros((n,) * 3, np.uint8)
    for c in ((9, 9, 14), (19, 17, 12)):
        b = _ball(n, c, 2)
        fl[b], t1[b], mask[b] = 1.6, 0.5, 1
    mask[14, 20, 20:22] = 1  # below --min-size 3: not a lesion on either side
    fl, t1 = (np.where(brain, a, 0).astype(np.float32) for a in (fl, t1))
    return fl, t1, mask


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from _helpers import Detector

    from instance_saliency import models
    from instance_saliency.models import ModelConfig, save_checkpoint

    arch = "test_friction_detector"
    models.ARCHITECTURES[arch] = Detector
    root = tmp_path_factory.mktemp("synth")
    fl, t1, mask = brain_scan()
    files = {"flair": _save(root / "flair.nii.gz", fl), "t1": _save(root / "t1.nii.gz", t1),
             "mask": _save(root / "mask.nii.gz", mask)}
    save_checkpoint(root / "model", Detector(), ModelConfig(arch, roi_size=[16, 16, 16]))
    yield {"root": root, **files, "model": root / "model"}
    models.ARCHITECTURES.pop(arch, None)


FAST = ["--methods", "smoothgrad", "--n-samples", "1", "--no-figures", "--quiet"]


def _explain(synth, out, *extra, flair=None, t1=None):
    return cli.main(["explain", "--flair", str(flair or synth["flair"]), "--mprage",
                     str(t1 or synth["t1"]), "--mask", str(synth["mask"]), "--model",
                     str(synth["model"]), "--out", str(out), *FAST, *extra])


def test_channel_order_check_on_tissue_order():
    from instance_saliency.input_checks import channel_order_check

    fl, t1, _ = brain_scan()
    ok = channel_order_check(np.stack([fl, t1]), ["FLAIR", "MPRAGE"])
    assert ok["swapped_suspected"] is False
    assert ok["t1"]["mode_position"] > ok["flair"]["mode_position"] + 0.05
    bad = channel_order_check(np.stack([t1, fl]), ["FLAIR", "T1"])
    assert bad["swapped_suspected"] is True
    assert channel_order_check(np.stack([fl]), ["FLAIR"]) is None  # no pair to compare


def test_explain_warns_before_the_work_when_channels_look_swapped(synth, tmp_path, capsys):
    assert _explain(synth, tmp_path / "ok") == 0
    cap = capsys.readouterr()
    assert "look swapped" not in cap.err
    run = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert run["checks"]["channel_order"]["swapped_suspected"] is False
    assert _explain(synth, tmp_path / "swapped", flair=synth["t1"], t1=synth["flair"]) == 0
    cap = capsys.readouterr()
    warn = [ln for ln in cap.err.splitlines() if "look swapped" in ln]
    assert len(warn) == 1 and warn[0].startswith("instance-saliency: warning: the FLAIR and "
                                                 "MPRAGE images look swapped")
    out = cap.out.splitlines()
    assert out.index("predicting (sliding window)") > 0  # the warning came before the work
    run = json.loads((tmp_path / "swapped" / "run.json").read_text())
    assert run["checks"]["channel_order"]["swapped_suspected"] is True


def test_explain_prints_plan_expected_time_and_every_step(synth, tmp_path, capsys):
    assert _explain(synth, tmp_path / "run", "--methods", "smoothgrad,gradcampp",
                    "--cam-layer", "act") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("explain: SmoothGrad with N = 1 noise samples (--n-samples; "
                               "explain default 50 as in the seed paper, demo 4)")
    assert "1 network(s) (model) = 1 pass(es) per window" in lines[0]
    # each method's maps are quantified and written right after the method has run
    steps = ["predicting (sliding window)", "lesion instance(s)", "SmoothGrad: ",
             "SmoothGrad: quantifying and writing the maps", "Grad-CAM++: ",
             "Grad-CAM++: quantifying and writing the maps"]
    pos = [next(i for i, ln in enumerate(lines) if s in ln) for s in steps]
    assert pos == sorted(pos)
    inst = lines[pos[1]]
    assert "expected about" in inst and "rough: the windows the lesions touch" in inst
    assert lines[-1].split(";")[0].endswith("explained (2 TP)")  # speck below --min-size


def test_expected_time_follows_the_windows_the_lesions_touch():
    """Exact saliency costs one forward per distinct window touched and one backward per
    lesion-window pair (per noise sample): the estimate scales with those, not with the
    number of lesions (many small lesions in few windows cost little more than one)."""
    from instance_saliency.explain import (_COST_GRADCAMPP, _COST_SMOOTHGRAD, ExplainConfig,
                                           expected_seconds)

    cfg = ExplainConfig(n_samples=4)
    # 27 windows predicted in 27 s: 1 s per window pass; D = 2 distinct windows, P = 3 pairs
    t = expected_seconds(2, 27.0, cfg, [[0, 1], [1]], 27)
    assert t["smoothgrad"] == pytest.approx(_COST_SMOOTHGRAD * 4 * (2 + 3))
    assert t["gradcampp"] == pytest.approx(_COST_GRADCAMPP * (2 + 3))
    # ten lesions inside one window cost (1 + 10) window passes, not ten lesions' worth of two
    t10 = expected_seconds(10, 27.0, cfg, [[5]] * 10, 27)
    assert t10["smoothgrad"] == pytest.approx(_COST_SMOOTHGRAD * 4 * 11)
    assert expected_seconds(2, 27.0, ExplainConfig(), [[0, 1], [1]], 27)["smoothgrad"] \
        == pytest.approx(t["smoothgrad"] * 50 / 4)
    # without figures, writing costs far less per lesion
    from instance_saliency.explain import _COST_WRITE_NO_FIGURES_S, _COST_WRITE_S

    assert t["write"] == pytest.approx(2 * _COST_WRITE_S)
    nofig = expected_seconds(2, 27.0, ExplainConfig(n_samples=4, figures=False), [[0, 1], [1]],
                             27)
    assert nofig["write"] == pytest.approx(2 * _COST_WRITE_NO_FIGURES_S)
    assert nofig["write"] < t["write"]
    # patch mode / no window list: one window per lesion
    assert expected_seconds(3, 6.0, cfg)["gradcampp"] == pytest.approx(_COST_GRADCAMPP * 2 * 6)


def test_one_size_rule_no_fn_below_min_size(synth, tmp_path):
    assert _explain(synth, tmp_path / "r") == 0
    t = pd.read_csv(tmp_path / "r" / "instances.csv")
    assert sorted(t.status) == ["TP", "TP"] and (t.voxels >= 3).all()
    assert _explain(synth, tmp_path / "r0", "--min-size", "0") == 0
    t0 = pd.read_csv(tmp_path / "r0" / "instances.csv")
    assert sorted(t0.status) == ["FN", "TP", "TP"] and t0[t0.status == "FN"].voxels.item() == 2


def test_predict_and_explain_write_the_same_mask(synth, tmp_path, capsys):
    assert _explain(synth, tmp_path / "e") == 0
    rc = cli.main(["predict", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]),
                   "--model", str(synth["model"]), "--out", str(tmp_path / "p"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"predict: model {synth['model']}: 1 network(s) (model) = 1 pass(es) per window" in out
    a = np.asarray(nib.load(str(tmp_path / "e" / "prediction_mask.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "p" / "prediction_mask.nii.gz")).dataobj)
    assert a.sum() > 0 and np.array_equal(a, b)
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["command"] == "predict" and run["parameters"]["min_size"] == 3
    assert run["summary"]["lesion_voxels"] == int(b.sum()) == int(a.sum())
    assert set(run["inputs"]) == {"flair", "mprage"} and run["inputs"]["flair"]["sha256"]
    assert [m["name"] for m in run["model"]["members"]] == ["model"]
    # a larger --min-size removes components in predict as in explain
    rc = cli.main(["predict", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]),
                   "--model", str(synth["model"]), "--out", str(tmp_path / "big.nii.gz"),
                   "--quiet", "--min-size", "1000"])
    assert rc == 0 and not np.asarray(nib.load(str(tmp_path / "big.nii.gz")).dataobj).any()
    assert json.loads((tmp_path / "big_run.json").read_text())["summary"]["lesions"] == 0


def test_predict_refuses_a_finished_explain_run(synth, tmp_path, capsys):
    run = tmp_path / "e"
    assert _explain(synth, run) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    argv = ["predict", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]), "--model",
            str(synth["model"]), "--out", str(run), "--quiet"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert _err(capsys) == (f"instance-saliency: error: output folder {run} holds a finished "
                            "explain run (run.json); use --overwrite to replace it, or choose "
                            "another --out")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert cli.main([*argv, "--overwrite"]) == 0  # replaced as a whole, not mixed
    assert sorted(p.name for p in run.iterdir()) == ["prediction_mask.nii.gz",
                                                     "prediction_prob.nii.gz", "run.json"]
    assert json.loads((run / "run.json").read_text())["command"] == "predict"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_csv_rounded_with_full_precision_beside(synth, tmp_path):
    from instance_saliency._format import round_table

    assert _explain(synth, tmp_path / "r") == 0
    full = pd.read_csv(tmp_path / "r" / "instances_full.csv")
    shown = pd.read_csv(tmp_path / "r" / "instances.csv")
    pd.testing.assert_frame_equal(shown, round_table(full), check_dtype=False)
    rows = (tmp_path / "r" / "instances.csv").read_text().splitlines()[1:]
    assert max(len(x) for r in rows for x in r.split(",")) <= 12  # no 17-digit floats
    v = full["smoothgrad_flair_mean_in"].iloc[0]
    assert shown["smoothgrad_flair_mean_in"].iloc[0] == float(f"{v:.4g}")
    assert (tmp_path / "r" / "profiles_full.csv").is_file()


# ------------------------------------------------------------------------------------------
# report


@pytest.mark.parametrize("n_ch", [1, 2])
def test_colour_bar_label_is_not_clipped(tmp_path, monkeypatch, n_ch):
    from instance_saliency.report import figures

    kept = {}
    real_save = figures._save

    def capture(fig, out_png, dpi=figures._DPI, **kwargs):
        kept["fig"] = fig
        return real_save(fig, out_png, dpi, **kwargs)

    monkeypatch.setattr(figures, "_save", capture)
    rng = np.random.default_rng(0)
    flair = rng.random((30, 30, 30)).astype(np.float32)
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[13:17, 13:17, 13:17] = 1
    sal = rng.normal(0, 1e-5, (n_ch, 30, 30, 30)).astype(np.float32)
    figures.instance_figure(flair, mask, sal, (15, 15, 15), (1.0, 1.0, 1.0), title="lesion 1",
                            out_png=tmp_path / "f.png",
                            channel_names=("FLAIR", "MPRAGE")[:n_ch])  # FLAIR-only: one row
    fig = kept["fig"]
    fig.canvas.draw()
    cbar_ax = fig.axes[-1]
    label = cbar_ax.yaxis.label
    assert label.get_text().replace("\n", " ") == "saliency (logit / normalised intensity)"
    for a in [label, *cbar_ax.get_yticklabels()]:
        box = a.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, a.get_text()
    box = label.get_window_extent()  # (tick labels outside the bar's range are not drawn)
    assert box.y0 >= 0 and box.y1 <= fig.bbox.y1


def test_report_summary_inputs_notes_and_lesion_grouping(synth, tmp_path):
    import re

    out = tmp_path / "r"
    assert cli.main(["explain", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]),
                     "--mask", str(synth["mask"]), "--model", str(synth["model"]), "--out",
                     str(out), "--methods", "smoothgrad,gradcampp", "--cam-layer", "act",
                     "--n-samples", "1", "--quiet"]) == 0
    page = (out / "report.html").read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", page)
    assert heads.count("Summary") == 1 and "Saliency over all lesions" in heads
    assert f"<th>input flair</th><td>{synth['flair']}</td>" in page
    assert "<th>subject</th><td>synth0</td>" in page  # folder of the generic flair.nii.gz
    notes = page[page.index("<h2>Notes</h2>"):]
    assert "{" not in notes and "threshold = 0.5" in notes and "cam_layer = act" in notes
    assert "methods = smoothgrad, gradcampp" in notes and "None" not in notes
    # each lesion's section holds its SmoothGrad and Grad-CAM++ figures together
    for lab in (1, 2):
        i = next(k for k, h in enumerate(heads) if h.startswith(f"Lesion {lab} (TP, "))
        sec = page.split("<h2>")[i + 1]
        assert f"SmoothGrad: lesion {lab} (TP)" in sec and f"Grad-CAM++: lesion {lab} (TP)" in sec


def test_train_prints_no_user_warning(tmp_path, capsys):
    import warnings

    fl, t1, mask = brain_scan()
    for k, a in (("f", fl), ("t", t1), ("m", mask)):
        _save(tmp_path / f"{k}.nii.gz", a)
    (tmp_path / "man.csv").write_text("subject,flair,mprage,mask\ns1,f.nii.gz,t.nii.gz,m.nii.gz\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc = cli.main(["train", "--manifest", str(tmp_path / "man.csv"), "--out",
                       str(tmp_path / "model"), "--roi", "16", "--channels", "4,8", "--steps",
                       "3", "--stop-after", "2", "--val-every", "2"])
        assert rc == 0
        assert cli.main(["train", "--manifest", str(tmp_path / "man.csv"), "--out",
                         str(tmp_path / "model"), "--roi", "16", "--channels", "4,8", "--steps",
                         "3", "--resume", "--val-every", "2"]) == 0
    user = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in seen
            if issubclass(w.category, UserWarning)]
    assert user == []
    assert "Warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# nnU-Net: lesions that vanish in the resampling onto the network grid


def test_tiny_lesion_lost_in_resampling_gets_its_own_reason():
    pytest.importorskip("nnunetv2")
    from instance_saliency.explain import _lost_in_resampling
    from instance_saliency.models import load_model

    model = load_model(NNUNET, folds=["0"], mirroring=False)
    rng = np.random.default_rng(0)
    image = np.zeros((2, 40, 40, 40), np.float32)
    image[:, 5:35, 5:35, 5:35] = rng.random((2, 30, 30, 30)) + 1  # zero outside: cropped away
    prep = model.prepare(image, (0.3, 0.3, 0.3))  # 0.3 mm input, 1 mm network: resampled
    assert prep.mapping["resampled"]
    tiny = np.zeros(image.shape[1:], bool)
    tiny[20, 20, 20:23] = True  # 3 voxels of 0.3 mm: nothing left on the 1 mm grid
    outside = np.zeros(image.shape[1:], bool)
    outside[1, 1, 1:4] = True  # in the zero border that nnU-Net crops away
    assert not prep.to_net(tiny).any() and not prep.to_net(outside).any()
    assert _lost_in_resampling(prep, [tiny, outside], [4, 9]) == [4]


def test_round_table_rule():
    from instance_saliency._format import round_table

    t = pd.DataFrame({"label": [1], "status": ["TP"], "voxels": [7],
                      "smoothgrad_flair_mean_in": [-2.3333333333333286],
                      "prob_max": [0.987654321], "flagger_prob_fp": [0.48457383142874894],
                      "smoothgrad_flair_share": [0.123456], "iou": [1 / 3],
                      "centroid_x_mm": [12.345678], "volume_mm3": [7.0000001],
                      "smoothgrad_flair_peak_max": [1.234567e-05]})
    r = round_table(t).iloc[0]
    assert (r.label, r.status, r.voxels) == (1, "TP", 7)
    assert r.smoothgrad_flair_mean_in == -2.333 and r.smoothgrad_flair_peak_max == 1.235e-05
    assert (r.prob_max, r.flagger_prob_fp, r.smoothgrad_flair_share, r.iou) == (
        0.9877, 0.4846, 0.1235, 0.3333)
    assert r.centroid_x_mm == 12.35 and r.volume_mm3 == 7.0


def test_sigterm_removes_the_staging_folder(synth, tmp_path):
    """A run stopped by SIGTERM (scheduler time limit, torchrun, kill) cleans up as after
    Ctrl-C: no staging folder beside --out, no --out, exit status 143."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _helpers import Detector
from instance_saliency import cli, models

class Killed(Detector):
    def forward(self, x):  # the scheduler stops the job while the model runs
        os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)

models.ARCHITECTURES["test_friction_detector"] = Killed
sys.exit(cli.main({["explain", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]),
                    "--model", str(synth["model"]), "--out", str(tmp_path / "run"), *FAST]!r}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("instance-saliency: terminated (SIGTERM)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_analyze_on_one_explain_run_says_it_needs_a_cohort(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    assert cli.main(["analyze", str(tmp_path), "--no-figures"]) == 2
    assert _err(capsys) == (f"instance-saliency: error: {tmp_path} is the output of one "
                            "explain run; analyze needs a cohort folder (instance-saliency "
                            "cohort --data DATA --out COHORT, then instance-saliency analyze "
                            "COHORT)")


def test_report_names_the_scans_the_model_trained_on(synth, tmp_path):
    from _helpers import Detector

    from instance_saliency.models import ModelConfig, save_checkpoint

    save_checkpoint(tmp_path / "model", Detector(),
                    ModelConfig("test_friction_detector", roi_size=[16, 16, 16],
                                trained_on=["scan-a", "scan-b"]))
    assert cli.main(["explain", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]),
                     "--model", str(tmp_path / "model"), "--out", str(tmp_path / "run"),
                     "--methods", "smoothgrad", "--n-samples", "1", "--quiet"]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "model trained on scan-a, scan-b" in html


def test_check_end_to_end_with_max_lesions(synth, tmp_path):
    """explain, then `check --max-lesions 1`: only the largest predicted lesion is checked,
    checks.csv / checks.json / checks.html written, and a second run without --overwrite is
    refused with one line."""
    run = tmp_path / "run"
    assert _explain(synth, run) == 0
    table = pd.read_csv(run / "instances.csv")
    pred = table[table["source"] == "pred"]
    assert len(pred) >= 2
    largest = int(pred.sort_values(["voxels", "label"], ascending=[False, True])["label"].iloc[0])
    argv = ["check", str(run), "--checks", "randomisation,deletion,context", "--methods",
            "smoothgrad", "--n-samples", "1", "--stages", "1", "--steps", "2",
            "--random-orders", "1", "--baselines", "background", "--context-mm", "0:4:2",
            "--max-lesions", "1", "--quiet"]
    assert cli.main(argv) == 0
    rows = pd.read_csv(run / "checks.csv")
    assert set(rows["label"]) == {largest}
    assert set(rows["check"]) <= {"randomisation", "deletion", "context"}
    assert {"randomisation", "deletion"} <= set(rows["check"])
    header = (run / "checks.csv").read_text().splitlines()[0].split(",")
    r_line = next(ln for ln in (run / "checks.csv").read_text().splitlines()
                  if ",randomisation," in ln).split(",")
    assert r_line[header.index("stages")] == "1"  # an integer, not 1.0
    if "recovery_mm" in header:  # context columns in the README's order
        assert header.index("recovery_mm") < header.index("dice_at_0") \
            < header.index("dice_at_max")
    assert json.loads((run / "checks.json").read_text())["lesions"] == [largest]
    assert (run / "checks.html").is_file()
    assert cli.main(argv) == 2
    assert cli.main([*argv[:-1], "--max-lesions", "0"]) == 2


def test_public_training_scan_is_recognised_by_its_checksum():
    """explain / predict on a public scan that some members trained on warn (SHA256 match),
    whatever the file is called; a member that never saw it, or another file, stays silent."""
    from _helpers import DATA

    from instance_saliency import datasets
    from instance_saliency.input_checks import training_scan_warning

    if DATA is None:
        pytest.skip("public scans not available")

    class Model:
        def __init__(self, seen):
            self.info = {"members_trained_on": [{"member": "fold_a", "trained_on": seen}]}

    flair = datasets.fetch_subject("patient07", DATA)["flair"]
    w = training_scan_warning(Model(["patient07", "P18"]), [flair])
    assert w.startswith(f"{flair} is the public scan patient07, a training scan of model "
                        "member(s) fold_a: its TP/FP/FN are not held-out figures")
    assert training_scan_warning(Model(["P18"]), [flair]) is None
    assert training_scan_warning(Model(["patient07"]), [Path(__file__)]) is None


# ------------------------------------------------------------------------------------------
# friction round 5: inputs given twice, subject-name case, checks.json, stale checks,
# evaluate on a probability map, analyze on a missing folder, sw_batch_size, --max-instances


def test_same_file_for_two_channels_warns_in_one_line(synth, tmp_path, capsys):
    """--flair a --mprage a: one warning naming both channels, before the work; run.json
    records it; two files with identical data are reported as such; distinct images pass."""
    from instance_saliency.input_checks import identical_channels, identical_warning

    capsys.readouterr()
    assert _explain(synth, tmp_path / "e", t1=synth["flair"]) == 0
    cap = capsys.readouterr()
    warn = [ln for ln in cap.err.splitlines() if "same file" in ln]
    assert warn == ["instance-saliency: warning: the FLAIR and MPRAGE images are the same file: "
                    "the model sees one contrast twice; give each channel its own image "
                    "(--flair/--mprage or --image NAME=FILE)"]
    assert "look swapped" not in cap.err  # the swap check compares the two: silent here
    run = json.loads((tmp_path / "e" / "run.json").read_text())
    assert run["checks"]["identical_channels"] == [{"channels": ["FLAIR", "MPRAGE"],
                                                    "same_file": True}]
    assert cli.main(["predict", "--flair", str(synth["flair"]), "--mprage", str(synth["flair"]),
                     "--model", str(synth["model"]), "--out", str(tmp_path / "p"),
                     "--quiet"]) == 0
    assert [ln for ln in capsys.readouterr().err.splitlines() if "same file" in ln] == warn
    fl, t1, _ = brain_scan()
    pairs = identical_channels(np.stack([fl, fl.copy()]), ["FLAIR", "T1"], ["a.nii", "b.nii"])
    assert pairs == [{"channels": ["FLAIR", "T1"], "same_file": False}]
    assert identical_warning(pairs).startswith("the FLAIR and T1 images hold identical image "
                                               "data: ")
    assert identical_channels(np.stack([fl, t1]), ["FLAIR", "T1"], ["a.nii", "b.nii"]) == []
    assert _explain(synth, tmp_path / "ok") == 0
    assert "identical" not in capsys.readouterr().err and "same file" not in cap.out


def test_training_scan_names_match_case_insensitively(synth, tmp_path):
    """p39 is P39: members that trained on a subject are left out, and the cohort's held-out
    rule and the SHA256 warning see it, whatever the case of either name."""
    from _helpers import DATA, Detector, save_fold_ensemble

    from instance_saliency import cohort, datasets
    from instance_saliency.explain import ExplainConfig
    from instance_saliency.input_checks import training_scan_warning
    from instance_saliency.models import load_checkpoint_model

    root = save_fold_ensemble(tmp_path / "ens", Detector, "test_friction_detector",
                              {"fold_a": ["P39", "patient07"], "fold_b": ["p18"]})
    m = load_checkpoint_model(root, exclude_subjects=["p39"])
    assert [u["member"] for u in m.info["members_trained_on"]] == ["fold_b"]
    assert m.info["excluded_subjects"] == ["p39"]
    m = load_checkpoint_model(root, exclude_subjects=["P18"])
    assert [u["member"] for u in m.info["members_trained_on"]] == ["fold_a"]
    whole = load_checkpoint_model(root)
    assert cohort._expected_exclusion(whole, "p39", False) == ["p39"]
    lines = []
    model_for = cohort._held_out_models(whole, root, ExplainConfig(), False, lines.append)
    assert [u["member"] for u in model_for("p39").info["members_trained_on"]] == ["fold_b"]
    assert model_for("p40") is whole
    if DATA is not None:  # the public scan patient07, recorded as PATIENT07
        whole.info["members_trained_on"][0]["trained_on"] = ["PATIENT07"]
        flair = datasets.fetch_subject("patient07", DATA)["flair"]
        assert training_scan_warning(whole, [flair]).startswith(
            f"{flair} is the public scan patient07, a training scan of model member(s) fold_a")


def test_checks_json_records_the_model_members(synth, tmp_path):
    from _helpers import Detector, save_fold_ensemble

    from instance_saliency.checks import CheckConfig, run_checks

    root = save_fold_ensemble(tmp_path / "ens", Detector, "test_friction_detector",
                              {"fold_a": ["scan-a"], "fold_b": ["scan-b"]})
    run = tmp_path / "run"
    assert cli.main(["explain", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]),
                     "--model", str(root), "--out", str(run), *FAST]) == 0
    cfg = CheckConfig(checks=("deletion",), methods=("smoothgrad",), n_samples=1, steps=2,
                      random_orders=0, baselines=("background",), max_lesions=1)
    summary = run_checks(run, cfg, log=lambda s: None, figures=False)
    rec = json.loads((run / "checks.json").read_text())["model"]
    assert rec == summary["model"]
    assert rec["members"] == ["fold_a", "fold_b"] and rec["kind"] == "checkpoint"
    assert rec["folder"] == json.loads((run / "run.json").read_text())["model"]["folder"]
    assert rec["members_trained_on"] == [{"member": "fold_a", "trained_on": ["scan-a"]},
                                         {"member": "fold_b", "trained_on": ["scan-b"]}]
    assert rec["excluded_subjects"] == []


def test_explain_overwrite_replaces_the_checks_of_the_run(synth, tmp_path, capsys):
    """check outputs belong to the run: explain --overwrite replaces them with it (no stale
    checks beside new maps); without --overwrite the folder is refused as before."""
    from instance_saliency.checks import CheckConfig, run_checks
    from instance_saliency.explain import CHECK_FILES

    run = tmp_path / "run"
    assert _explain(synth, run) == 0
    cfg = CheckConfig(checks=("deletion",), methods=("smoothgrad",), n_samples=1, steps=2,
                      random_orders=0, baselines=("background",), max_lesions=1)
    run_checks(run, cfg, log=lambda s: None)
    assert set(CHECK_FILES) <= {p.name for p in run.iterdir()}
    assert list((run / "figures").glob("checks_*.png"))
    capsys.readouterr()
    assert _explain(synth, run) == 2
    assert _err(capsys) == (f"instance-saliency: error: output folder {run} already holds a "
                            "finished run; use --overwrite to replace it")
    assert _explain(synth, run, "--overwrite") == 0
    names = {p.name for p in run.iterdir()}
    assert not names & set(CHECK_FILES) and "run.json" in names
    assert not (run / "figures").exists() or not list((run / "figures").glob("checks_*.png"))
    (run / "notes.txt").write_text("mine")  # a user's file is still never deleted
    assert _explain(synth, run, "--overwrite") == 2
    assert "holds files that are not part of a run (notes.txt)" in _err(capsys)


def test_evaluate_probability_map_points_to_prediction_mask(tmp_path, capsys):
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    prob = gt * np.float32(0.8) + np.float32(0.1)
    _save(tmp_path / "gt.nii.gz", gt)
    p = _save(tmp_path / "prediction_prob.nii.gz", prob)
    assert cli.main(["evaluate", "--pred", str(p), "--mask", str(tmp_path / "gt.nii.gz")]) == 2
    assert _err(capsys) == (f"instance-saliency: error: prediction file {p} is not binary: "
                            "values [0.1, 0.9] besides 0/1 (a probability map? give the binary "
                            "prediction_mask.nii.gz that explain and predict write, not "
                            "prediction_prob.nii.gz, or threshold it first)")
    # a non-binary ground truth keeps its own hint
    assert cli.main(["evaluate", "--pred", str(tmp_path / "gt.nii.gz"), "--mask", str(p)]) == 2
    assert _err(capsys).endswith("besides 0/1 (threshold it first, e.g. at 0.5)")


def test_analyze_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert cli.main(["analyze", str(missing), "--no-figures"]) == 2
    assert _err(capsys) == f"instance-saliency: error: cohort folder {missing} does not exist"
    (tmp_path / "file").write_text("")
    assert cli.main(["analyze", str(tmp_path / "file"), "--no-figures"]) == 2
    assert _err(capsys) == (f"instance-saliency: error: {tmp_path / 'file'} is not a folder; "
                            "analyze needs a cohort folder")
    assert not missing.exists()


def test_predict_and_check_record_the_sw_batch_size_they_use(synth, tmp_path, monkeypatch):
    """One default, 2 windows per pass, in explain, predict and check; the value recorded in
    run.json / checks.json is the one passed to the sliding window; a cohort checked with
    another value is not refused for it (memory only)."""
    from instance_saliency import checks, inference
    from instance_saliency.checks import CheckConfig, check_cohort, run_checks
    from instance_saliency.explain import ExplainConfig

    assert ExplainConfig().sw_batch_size == CheckConfig().sw_batch_size == 2
    assert cli.build_parser().parse_args(["predict", "--out", "x"]).sw_batch_size == 2
    used = []
    real = inference.sliding_window_logits

    def spy(net, x, grid, sw_batch_size=2, progress=False):
        used.append(sw_batch_size)
        return real(net, x, grid, sw_batch_size, progress)

    monkeypatch.setattr(inference, "sliding_window_logits", spy)
    argv = ["predict", "--flair", str(synth["flair"]), "--mprage", str(synth["t1"]), "--model",
            str(synth["model"]), "--quiet"]
    assert cli.main([*argv, "--out", str(tmp_path / "p")]) == 0
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert used == [2] and run["parameters"]["sw_batch_size"] == 2
    assert cli.main([*argv, "--out", str(tmp_path / "p3"), "--sw-batch-size", "3"]) == 0
    assert used[-1] == 3
    assert json.loads((tmp_path / "p3" / "run.json").read_text())["parameters"][
        "sw_batch_size"] == 3
    with pytest.raises(InputError, match="sw_batch_size must be at least 1"):
        CheckConfig(sw_batch_size=0).validate()
    seen = []
    real_init = checks.LocalPredictor.__init__

    def spy_init(self, network, grid, lesion_class, threshold, sw_batch_size=2):
        seen.append(sw_batch_size)
        real_init(self, network, grid, lesion_class, threshold, sw_batch_size)

    monkeypatch.setattr(checks.LocalPredictor, "__init__", spy_init)
    subj = tmp_path / "cohort" / "subjects" / "s1"
    assert _explain(synth, subj) == 0
    cfg = CheckConfig(checks=("deletion",), methods=("smoothgrad",), n_samples=1, steps=2,
                      random_orders=0, baselines=("background",), max_lesions=1)
    run_checks(subj, cfg, log=lambda s: None, figures=False)
    rec = json.loads((subj / "checks.json").read_text())
    assert seen == [2] and rec["config"]["sw_batch_size"] == 2
    rec["config"]["sw_batch_size"] = 4  # checked before the default became 2
    (subj / "checks.json").write_text(json.dumps(rec))
    assert check_cohort(tmp_path / "cohort", cfg, log=lambda s: None) == []  # kept, not refused


def test_max_instances_zero_refused_before_the_prediction(synth, tmp_path, capsys):
    from instance_saliency.explain import ExplainConfig

    capsys.readouterr()
    assert _explain(synth, tmp_path / "r", "--max-instances", "0") == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == "instance-saliency: error: --max-instances must be at least 1"
    assert "predicting" not in cap.out and not (tmp_path / "r").exists()
    with pytest.raises(InputError, match="--max-instances must be at least 1"):
        ExplainConfig(max_instances=0).validate()
    ExplainConfig(max_instances=1).validate()


def test_check_refuses_inputs_changed_since_explain_and_context_alone_needs_no_maps(
        synth, tmp_path, capsys):
    """check compares the inputs' SHA256 with run.json (fresh user: a FLAIR overwritten by
    another image was checked silently); `--checks context` alone computes no saliency maps;
    checks.json records the inputs."""
    import shutil

    d = tmp_path / "in"
    d.mkdir()
    fl, t1 = shutil.copy(synth["flair"], d / "flair.nii.gz"), shutil.copy(synth["t1"],
                                                                             d / "t1.nii.gz")
    run = tmp_path / "run"
    assert _explain(synth, run, flair=fl, t1=t1) == 0
    argv = ["check", str(run), "--checks", "context", "--context-mm", "0:2:2", "--quiet",
            "--no-figures"]
    assert cli.main(argv) == 0
    info = json.loads((run / "checks.json").read_text())
    assert info["cost"]["maps_s"] == 0.0
    from instance_saliency import datasets

    assert info["inputs"]["FLAIR"]["sha256"] == datasets.sha256sum(fl)
    shutil.copy(synth["t1"], fl)  # the FLAIR file now holds the T1 image
    capsys.readouterr()
    assert cli.main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "['FLAIR']" in err[0] and "changed since explain ran" in err[0]
    # the earlier results stay
    assert json.loads((run / "checks.json").read_text()) == info


def test_reversed_context_range_says_what_is_wrong(capsys, tmp_path):
    assert cli.main(["check", str(tmp_path), "--context-mm", "4:0:1"]) == 2
    err = capsys.readouterr().err
    assert "needs stop >= start and step > 0, got '4:0:1'" in err


def test_train_accepts_public_subject_names_in_any_case(tmp_path):
    """`train --train-subjects PATIENT19` is patient19 (cohort and the held-out members
    already compare names case-insensitively); an unknown name is still one line."""
    from instance_saliency import datasets
    from instance_saliency.errors import DataError

    assert datasets.canonical_subject("PATIENT19") == "patient19"
    assert datasets.canonical_subject("p39") == "P39"
    with pytest.raises(DataError, match="unknown subject 'p40'"):
        datasets.canonical_subject("p40")
    assert cli.main(["train", "--train-subjects", "p40", "--out", str(tmp_path / "m")]) == 2
