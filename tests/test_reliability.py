"""Reliability (issue 8): every command against bad input, faults, resumption, determinism.

The table ``case × command`` runs ``instance_saliency.cli.main`` in-process on tiny synthetic
scans (20^3 voxels) written here, with a registered hand-set model (``Detector``: the lesion
logit grows with the local FLAIR intensity; ROI 16), so that a run takes a fraction of a second.
For every bad input it asserts exit status 2, exactly one stderr line
``instance-saliency: error: …`` that names the offending file, and that nothing partial is
left: the output does not exist (or is unchanged), the inputs are unchanged and no staging
(``.partial-<pid>``, ``.old-<pid>``) or temporary (``*.tmp*``) file remains anywhere.
A few runs go through ``python -m instance_saliency.cli`` to check the real exit status and
stderr, and to SIGKILL runs midway. Every case is listed in docs/reliability.md.
"""

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from instance_saliency import cli, cohort, explain as explain_mod, models
from instance_saliency.explain import prepare_output, remove_stale_staging, table_columns
from instance_saliency.models import ModelConfig, save_checkpoint

from _helpers import Detector  # hand-set model (also loaded by the subprocesses)

N = 20
ARCH = "test_reliability_detector"
TESTS = Path(__file__).resolve().parent
FAST = ["--methods", "smoothgrad", "--n-samples", "1", "--no-figures", "--quiet"]
COHORT_FAST = [*FAST, "--n-boot", "20"]
ERR = "instance-saliency: error: "


def register():
    """Make ``Detector`` known to the checkpoint loader (also used by the subprocesses)."""
    models.ARCHITECTURES[ARCH] = Detector


# --------------------------------------------------------------------------------------------
# synthetic scans


def _ball(n, c, r):
    g = np.indices((n,) * 3).astype(float)
    return ((g - np.asarray(c, float)[:, None, None, None]) ** 2).sum(0) <= r * r


def scan(seed=0):
    """FLAIR, MPRAGE, mask: a bright TP blob, a bright FP blob and a missed (FN) lesion."""
    rng = np.random.default_rng(seed)
    brain = _ball(N, (10, 10, 10), 9)
    flair = np.where(brain, rng.normal(1, 0.05, (N,) * 3), 0).astype(np.float32)
    mprage = np.where(brain, rng.normal(1, 0.05, (N,) * 3), 0).astype(np.float32)
    tp, fp = _ball(N, (7, 7, 10), 2.5), _ball(N, (13, 13, 10), 2)
    flair[tp], flair[fp] = 3.0, 2.8
    mask = (tp | _ball(N, (10, 14, 5), 2)).astype(np.uint8)
    return flair, mprage, mask


def many_blobs(n=24, seed=1):
    """FLAIR with 18 bright blobs (slow enough to be killed midway with many samples)."""
    rng = np.random.default_rng(seed)
    flair = rng.normal(1, 0.05, (n,) * 3).astype(np.float32)
    mprage = rng.normal(1, 0.05, (n,) * 3).astype(np.float32)
    for x in range(4, n - 2, 6):
        for y in range(4, n - 2, 6):
            for z in (6, n - 7):
                flair[_ball(n, (x, y, z), 1.5)] = 3.0
    return flair, mprage


def write(path, arr, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def _affine(**kw):
    a = np.eye(4)
    if "shift" in kw:
        a[0, 3] = kw["shift"]
    if "flip" in kw:
        a[0, 0] = -1.0
        a[0, 3] = N - 1  # same voxel centres, axis reversed
    if "spacing" in kw:
        a[0, 0] = kw["spacing"]
    return a


#: bad files: name -> (role, writer(good arrays, path) -> path, message pattern)
#: role is the input it replaces: flair, mprage (FLAIR and MPRAGE disagree) or mask
def _bad_files():
    def trunc(p, good):
        raw = good.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return p

    def text(p, good):
        p.write_text("subject,flair\nthis is not an image\n")
        return p

    def empty(p, good):
        p.write_bytes(b"")
        return p

    def arr(fn, affine=None):
        return lambda p, good, a=None: write(p, fn(), affine)

    f, m, gt = scan()
    nan, inf = m.copy(), m.copy()
    nan[3, 4, 5], inf[3, 4, 5] = np.nan, np.inf
    labels = gt.copy()
    labels[1, 1, 1] = 2
    return {
        "missing": ("flair", lambda p, good: p, r"file (not found: |\S+ not found)"),
        "truncated_gzip": ("flair", trunc, r"is not a readable NIfTI image"),
        "not_nifti": ("flair", text, r"is not a readable NIfTI image"),
        "empty_file": ("mprage", empty, r"is not a readable NIfTI image"),
        "shape_differs": ("mprage", arr(lambda: m[:18].copy()),
                          r"has shape .*co-register them onto one grid"),
        "shifted_origin": ("mprage", arr(lambda: m, _affine(shift=2.0)),
                           r"affine differing .* by 2 mm"),
        "flipped_axis": ("mprage", arr(lambda: m, _affine(flip=True)),
                         r"affine differing .*co-register"),
        "spacing_differs": ("mprage", arr(lambda: m, _affine(spacing=1.2)),
                            r"affine differing .* by 0\.2 mm"),
        "image_4d": ("flair", arr(lambda: np.stack([f, f], -1)), r"is 4D .*3D volume is required"),
        "image_2d": ("flair", arr(lambda: f[:, :, 10].copy()), r"is 2D .*3D volume is required"),
        "nan_voxels": ("mprage", arr(lambda: nan), r"has 1 NaN/Inf voxels"),
        "inf_voxels": ("mprage", arr(lambda: inf), r"has 1 NaN/Inf voxels"),
        "all_zero": ("flair", arr(lambda: np.zeros_like(f)), r"is all zero"),
        "mask_labels": ("mask", arr(lambda: labels), r"is not binary: values \[2\.0\]"),
        "mask_other_shape": ("mask", arr(lambda: gt[:, :, :18].copy()), r"has shape .*co-register"),
        "mask_other_affine": ("mask", arr(lambda: gt, _affine(shift=1.5)),
                              r"affine differing .* by 1\.5 mm"),
    }


BAD_FILES = _bad_files()
#: commands that read each kind of bad file (evaluate reads a prediction and a mask; an
#: all-zero prediction is valid there, an empty segmentation)
FILE_COMMANDS = ("explain", "predict", "evaluate", "cohort", "train")


def _applies(case, command):
    role = BAD_FILES[case][0]
    if command == "predict":
        return role != "mask"
    if command == "evaluate":
        return case != "all_zero"
    return True


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


#: model folders: name -> (mutation of a good checkpoint folder, message pattern)
def _write_json(p, **changes):
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


MODEL_CASES = {
    "weights_missing": (lambda d: (d / "model.safetensors").unlink(),
                        r"has no model\.safetensors"),
    "weights_truncated": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:60]), r"is not a valid safetensors file"),
    "weights_malicious_pickle": (lambda d: (d / "model.safetensors").write_bytes(
        pickle.dumps({"w": _Evil(d / "pwned")})), r"is not a valid safetensors file"),
    "config_wrong_arguments": (lambda d: _write_json(d / "config.json",
                                                     arguments={"channels": [4, 8]}),
                               r"cannot build test_reliability_detector with"),
    "weights_other_size": (lambda d: _write_json(d / "config.json",
                                                 arguments={"out_channels": 3}),
                           r"shape mismatch for head\.bias"),
    "config_one_channel": (lambda d: _write_json(d / "config.json", channels=["FLAIR"]),
                           r"declares 1 input channel\(s\) \['FLAIR'\], but its network "
                           r"takes 2"),
    "weights_one_channel": (None, r"declares 2 input channel\(s\) .*but its network takes 1"),
}
MODEL_COMMANDS = ("explain", "predict", "cohort")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs, bad files, manifests and model folders (module scope, never modified)."""
    register()
    root = tmp_path_factory.mktemp("world")
    f, m, gt = scan()
    good = {"flair": write(root / "flair.nii.gz", f), "mprage": write(root / "mprage.nii.gz", m),
            "mask": write(root / "mask.nii.gz", gt)}
    bad = {}
    for case, (role, writer, _) in BAD_FILES.items():
        bad[case] = writer(root / f"bad_{case}.nii.gz", good[role])
        paths = {**good, role: bad[case]}
        rel = {k: os.path.relpath(p, root) for k, p in paths.items()}
        for kind in ("cohort", "train"):
            (root / f"{kind}_{case}.csv").write_text(
                f"subject,flair,mprage,mask\ns1,{rel['flair']},{rel['mprage']},{rel['mask']}\n")
    (root / "good.csv").write_text("subject,flair,mprage,mask\n"
                                   "s1,flair.nii.gz,mprage.nii.gz,mask.nii.gz\n")
    (root / "no_mask.csv").write_text("subject,flair,mprage,mask\n"
                                      "s1,flair.nii.gz,mprage.nii.gz,\n")
    mods = {"good": root / "model"}
    save_checkpoint(mods["good"], Detector(), ModelConfig(ARCH, roi_size=[16, 16, 16]))
    for case, (mutate, _) in MODEL_CASES.items():
        d = root / f"model_{case}"
        if mutate is None:  # weights of a 1-channel model, config claiming FLAIR + MPRAGE
            save_checkpoint(d, Detector(in_channels=1),
                            ModelConfig(ARCH, arguments={"in_channels": 1},
                                        roi_size=[16, 16, 16]))
        else:
            save_checkpoint(d, Detector(), ModelConfig(ARCH, roi_size=[16, 16, 16]))
            mutate(d)
        mods[case] = d
    yield {"root": root, "good": good, "bad": bad, "models": mods}
    models.ARCHITECTURES.pop(ARCH, None)


# --------------------------------------------------------------------------------------------
# helpers


def snapshot(root):
    """Every file under ``root`` with its size, mtime and content hash."""
    import hashlib

    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


_DEBRIS = re.compile(r"\.(partial|old)-\d+$|\.tmp(\.|$)|^\.write-test")


def debris(*roots):
    return [str(p) for r in roots for p in Path(r).rglob("*") if _DEBRIS.search(p.name)]


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, pattern, names=()):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERR), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


def command_argv(command, world, out, flair=None, mprage=None, mask=None, model=None,
                 manifest=None, pred=None):
    g = world["good"]
    flair, mprage = flair or g["flair"], mprage or g["mprage"]
    mask = mask or g["mask"]
    model = model or world["models"]["good"]
    if command == "explain":
        return ["explain", "--flair", flair, "--mprage", mprage, "--mask", mask, "--model",
                model, "--out", out, *FAST]
    if command == "predict":
        return ["predict", "--flair", flair, "--mprage", mprage, "--model", model, "--out",
                out, "--quiet"]
    if command == "evaluate":
        return ["evaluate", "--pred", pred or g["mask"], "--mask", mask, "--out", out]
    if command == "cohort":
        return ["cohort", "--data", manifest or world["root"] / "good.csv", "--out", out,
                "--model", model, *COHORT_FAST]
    if command == "train":
        return ["train", "--manifest", manifest or world["root"] / "good.csv", "--out", out,
                "--architecture", ARCH, "--roi", "16", "--steps", "1", "--batch-size", "1"]
    raise AssertionError(command)


# --------------------------------------------------------------------------------------------
# the table: bad input files × commands


@pytest.mark.parametrize("case, command", [(c, k) for c in BAD_FILES for k in FILE_COMMANDS
                                           if _applies(c, k)])
def test_bad_input_file(world, tmp_path, capsys, case, command):
    role, _, pattern = BAD_FILES[case]
    bad = world["bad"][case]
    out = tmp_path / ("metrics.csv" if command == "evaluate" else "out")
    before = snapshot(world["root"])
    kw = {}
    if command in ("cohort", "train"):
        kw["manifest"] = world["root"] / f"{command}_{case}.csv"
    elif command == "evaluate":
        kw["mask" if role == "mask" else "pred"] = bad
    else:
        kw[role] = bad
    rc, _, err = run_cli(command_argv(command, world, out, **kw), capsys)
    assert_one_line_error(rc, err, pattern, [bad.name])
    if command == "cohort" and case != "missing":
        # the subject failed inside its run: recorded for a retry, no subject folder
        assert re.search(r"every subject failed \(1; first s1: ", err), err
        # no lock file left (the folder itself is locked)
        assert sorted(p.name for p in out.iterdir()) == ["failures.json", "subjects"]
        fails = json.loads((out / "failures.json").read_text())
        assert bad.name in fails["s1"]["message"]
        assert not list((out / "subjects").iterdir())
    else:
        assert not out.exists()
    assert snapshot(world["root"]) == before
    assert not debris(world["root"], tmp_path)


@pytest.mark.parametrize("command", ["explain", "predict", "evaluate"])
def test_unreadable_file(world, tmp_path, capsys, monkeypatch, command):
    """Permission denied (simulated: the tests may run as root, who reads anything)."""
    target = world["good"]["mask" if command == "evaluate" else "flair"]
    real = nib.load

    def denied(path, *a, **k):
        if Path(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(nib, "load", denied)
    out = tmp_path / "out"
    rc, _, err = run_cli(command_argv(command, world, out), capsys)
    assert_one_line_error(rc, err, r"is not a readable NIfTI image \(.*Permission denied",
                          [target.name])
    assert not out.exists() and not debris(tmp_path)


# --------------------------------------------------------------------------------------------
# the table: bad model folders × commands


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model(world, tmp_path, capsys, case, command):
    model = world["models"][case]
    out = tmp_path / "out"
    before = snapshot(world["root"])
    rc, _, err = run_cli(command_argv(command, world, out, model=model), capsys)
    pattern = MODEL_CASES[case][1]
    assert_one_line_error(rc, err, pattern, [model.name])
    # refused before anything is written (cohort checks the model once, up front)
    assert not out.exists()
    assert snapshot(world["root"]) == before
    assert not debris(world["root"], tmp_path)
    assert not (model / "pwned").exists()  # the pickle was never unpickled


@pytest.mark.parametrize("channels, pattern", [
    ("4", r"cannot build unet3d with .*channels"),
    ("4,x", r"--channels must be comma-separated integers, got '4,x'"),
    ("0,4", r"--channels must be positive"),
])
def test_train_wrong_architecture_arguments(world, tmp_path, capsys, channels, pattern):
    out = tmp_path / "out"
    argv = command_argv("train", world, out)
    argv[argv.index(ARCH)] = "unet3d"
    rc, _, err = run_cli([*argv, "--channels", channels], capsys)
    assert_one_line_error(rc, err, pattern)
    assert not out.exists()


@pytest.mark.parametrize("options, pattern", [
    (["--roi", "32"], r"has shape \(20, 20, 20\), smaller than the patch \(--roi 32\)"),
    (["--steps", "0"], r"--steps must be at least 1"),
])
def test_train_bad_options(world, tmp_path, capsys, options, pattern):
    out = tmp_path / "out"
    argv = command_argv("train", world, out)
    rc, _, err = run_cli([*argv, *options], capsys)
    assert_one_line_error(rc, err, pattern)
    assert not out.exists()


@pytest.mark.parametrize("command, options, pattern", [
    ("explain", ["--sw-batch-size", "0"], r"--batch-size and --sw-batch-size must be at least 1"),
    ("explain", ["--n-samples", "0"], r"--n-samples must be at least 1"),
    ("explain", ["--threshold", "1.5"], r"--threshold must lie strictly between 0 and 1"),
    ("explain", ["--min-size", "-1"], r"--min-size must be a finite number >= 0"),
    ("explain", ["--max-instances", "-1"], r"--max-instances must be at least 1"),
    ("explain", ["--max-instances", "0"], r"--max-instances must be at least 1"),
    ("cohort", ["--noise-level", "nan"], r"--noise-level must be a finite number >= 0"),
    ("predict", ["--threshold", "0"], r"--threshold must lie strictly between 0 and 1"),
])
def test_out_of_range_parameters(world, tmp_path, capsys, command, options, pattern):
    out = tmp_path / "out"
    rc, _, err = run_cli([*command_argv(command, world, out), *options], capsys)
    assert_one_line_error(rc, err, pattern)
    assert not out.exists() and not debris(tmp_path)


def test_train_subjects_need_masks(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(command_argv("train", world, out,
                                      manifest=world["root"] / "no_mask.csv"), capsys)
    assert_one_line_error(rc, err, r"training needs a lesion mask for every subject; none for s1")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# manifests: relative paths from the manifest's folder, which they may not leave


def test_manifest_paths_cannot_escape_root(world, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rel = os.path.relpath(world["good"]["flair"], data)  # ../../world/flair.nii.gz
    rel_m = os.path.relpath(world["good"]["mprage"], data)
    rel_gt = os.path.relpath(world["good"]["mask"], data)
    train_m = data / "train.csv"
    train_m.write_text(f"subject,flair,mprage,mask\ns1,{rel},{rel_m},{rel_gt}\n")
    eval_m = data / "eval.csv"
    eval_m.write_text(f"subject,prediction,mask\ns1,{rel_gt},{rel_gt}\n")
    out = tmp_path / "out"
    rc, _, err = run_cli(command_argv("train", world, out, manifest=train_m), capsys)
    assert_one_line_error(rc, err, r"row 1 \(subject 's1'\): flair path .* lies outside the "
                                   r"data root .*--allow-outside-root")
    rc, _, err = run_cli(["evaluate", "--manifest", eval_m, "--out", out], capsys)
    assert_one_line_error(rc, err, r"row 1 \(subject 's1'\): prediction path .* lies outside")
    assert not out.exists()
    # explicitly allowed: evaluate runs, and relative paths are read from the manifest folder
    rc, stdout, err = run_cli(["evaluate", "--manifest", eval_m, "--allow-outside-root"],
                              capsys)
    assert rc == 0, err
    table = pd.read_csv(io.StringIO(stdout))
    assert table.loc[0, "subject"] == "s1" and table.loc[0, "dice"] == 1.0
    # a manifest that does not exist: one line, for every command that reads one
    for argv in (["evaluate", "--manifest", data / "nope.csv"],
                 command_argv("train", world, out, manifest=data / "nope.csv"),
                 command_argv("cohort", world, out, manifest=data / "nope.csv")):
        rc, _, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, r"not found", ["nope.csv"])
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# outputs: a finished run is refused without --overwrite; unwritable locations


def _finished(command, world, out, capsys):
    rc, _, err = run_cli(command_argv(command, world, out), capsys)
    assert rc == 0, err
    return snapshot(out)


@pytest.mark.parametrize("command", ["explain", "predict", "train"])
def test_finished_run_refused_without_overwrite(world, tmp_path, capsys, command):
    out = tmp_path / "out"
    first = _finished(command, world, out, capsys)
    assert first
    rc, _, err = run_cli(command_argv(command, world, out), capsys)
    assert_one_line_error(rc, err, r"already (holds|exists).*use --overwrite to replace",
                          [out.name])
    assert snapshot(out) == first  # untouched
    assert not debris(tmp_path)
    rc, _, err = run_cli([*command_argv(command, world, out), "--overwrite"], capsys)
    assert rc == 0, err
    assert set(snapshot(out)) == set(first)  # replaced by a complete run, same files
    assert not debris(tmp_path)


@pytest.mark.parametrize("command", ["explain", "predict", "evaluate", "cohort", "train",
                                     "analyze"])
def test_output_cannot_be_written(world, tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    if command == "analyze":  # a finished cohort whose figures/ cannot be created
        co = tmp_path / "cohort"
        rc, _, err = run_cli(command_argv("cohort", world, co), capsys)
        assert rc == 0, err
        (co / "figures").write_text("in the way")
        before = snapshot(co)
        rc, _, err = run_cli(["analyze", co, "--n-boot", "20"], capsys)
        assert_one_line_error(rc, err, r"cannot write into .*figures", [])
        assert snapshot(co) == before  # checked before any file is replaced
        assert not debris(tmp_path)
        return
    out = blocker / ("metrics.csv" if command == "evaluate" else "out")
    rc, _, err = run_cli(command_argv(command, world, out), capsys)
    assert_one_line_error(rc, err, r"cannot (write into|create)", [blocker.name])
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_evaluate_replaces_its_csv_atomically(world, tmp_path, capsys):
    """evaluate writes one CSV (not a run folder): an existing file is replaced atomically."""
    out = tmp_path / "metrics.csv"
    out.write_text("old\n")
    rc, _, err = run_cli(command_argv("evaluate", world, out), capsys)
    assert rc == 0, err
    assert pd.read_csv(out).loc[0, "dice"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


@pytest.mark.parametrize("case, pattern", [
    ("missing_folder", r"cohort folder .*/nope does not exist$"),
    ("no_finished_subject", r"no subjects with instances\.csv under"),
    ("corrupt_table", r"cannot read .*s1/instances_full\.csv: Error tokenizing data"),
])
def test_analyze_bad_cohort_folder(world, tmp_path, capsys, case, pattern):
    co = tmp_path / "cohort"
    rc, _, err = run_cli(command_argv("cohort", world, co), capsys)
    assert rc == 0, err
    target = co
    if case == "missing_folder":
        target = tmp_path / "nope"
    elif case == "no_finished_subject":
        (co / "subjects" / "s1" / "run.json").unlink()  # an unfinished subject is not read
    else:
        for name in ("instances.csv", "instances_full.csv"):  # analyze reads the full one
            (co / "subjects" / "s1" / name).write_bytes(b"label,status\n\"1,TP\n")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(["analyze", target, "--n-boot", "20"], capsys)
    assert_one_line_error(rc, err, pattern)
    assert snapshot(tmp_path) == before and not debris(tmp_path)


def test_error_inside_a_saliency_method_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    """Grad-CAM++ fails after SmoothGrad has run: one line, no output, inputs and model
    unchanged (the in-memory model and input: tests/test_saliency.py::test_no_state_leaks)."""
    import instance_saliency.saliency as sal

    def broken(*args, **kwargs):
        raise ValueError("layer 'act' ran 2 times in one forward pass")

    monkeypatch.setattr(sal, "gradcampp", broken)
    before = snapshot(world["root"])
    out = tmp_path / "out"
    argv = command_argv("explain", world, out)[:-len(FAST)]
    rc, _, err = run_cli([*argv, "--methods", "smoothgrad,gradcampp", "--cam-layer", "act",
                          "--n-samples", "1", "--quiet"], capsys)
    assert_one_line_error(rc, err, r"Grad-CAM\+\+: layer 'act' ran 2 times")
    assert not out.exists() and not debris(tmp_path, world["root"])
    assert snapshot(world["root"]) == before


def test_cohort_finished_subjects_are_skipped_not_redone(world, tmp_path, capsys):
    out = tmp_path / "cohort"
    rc, _, err = run_cli(command_argv("cohort", world, out), capsys)
    assert rc == 0, err
    run_json = out / "subjects" / "s1" / "run.json"
    stamp = run_json.stat().st_mtime_ns
    rc, stdout, err = run_cli(command_argv("cohort", world, out), capsys)
    assert rc == 0, err
    assert "0 done, 1 skipped (already complete)" in stdout
    assert run_json.stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------
# scans without lesions, and with hundreds of tiny ones


def test_no_predicted_lesions_gives_empty_table_and_report(world, tmp_path, capsys):
    f, m, _ = scan()
    flair = write(tmp_path / "in" / "flair.nii.gz", m)  # no bright blob: nothing detected
    mprage = write(tmp_path / "in" / "mprage.nii.gz", m)
    out = tmp_path / "out"
    argv = ["explain", "--flair", flair, "--mprage", mprage, "--model",
            world["models"]["good"], "--out", out, "--n-samples", "1", "--cam-layer", "act",
            "--quiet"]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "no lesion instances found: empty table written" in stdout
    text = (out / "instances.csv").read_text()
    assert text.strip().split(",") == table_columns(("smoothgrad", "gradcampp"))
    assert len(pd.read_csv(out / "instances.csv")) == 0
    assert len(pd.read_csv(out / "profiles.csv")) == 0
    assert not np.asarray(nib.load(str(out / "prediction_mask.nii.gz")).dataobj).any()
    assert (out / "figures" / "distance_profile.png").stat().st_size > 0
    assert (out / "figures" / "modality_share.png").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 2
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["instances"] == 0 and run["summary"]["predicted"] == 0
    # the same for predict and evaluate: an empty mask, and metrics of it
    rc, stdout, err = run_cli(["predict", "--flair", flair, "--mprage", mprage, "--model",
                               world["models"]["good"], "--out", tmp_path / "p", "--quiet"],
                              capsys)
    assert rc == 0 and stdout.splitlines()[-1].startswith("0 lesion voxels in 0 lesion(s)"), err
    rc, stdout, err = run_cli(["evaluate", "--pred", tmp_path / "p" / "prediction_mask.nii.gz",
                               "--mask", world["good"]["mask"]], capsys)
    assert rc == 0, err
    assert pd.read_csv(io.StringIO(stdout)).loc[0, "n_pred_lesions"] == 0


def test_empty_table_columns_match_a_run_with_lesions(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli([*command_argv("explain", world, out)[:-len(FAST)], "--methods",
                          "smoothgrad,gradcampp", "--cam-layer", "act", "--n-samples", "1",
                          "--no-figures", "--quiet"], capsys)
    assert rc == 0, err
    assert list(pd.read_csv(out / "instances.csv").columns) == table_columns()


def test_hundreds_of_tiny_components(world, tmp_path, capsys):
    n = 24
    rng = np.random.default_rng(2)
    flair = rng.normal(1, 0.05, (n,) * 3).astype(np.float32)
    for x in range(0, n, 2):  # 12 x 12 x 6 = 864 separate 3-voxel segments, ...
        for y in range(0, n, 2):
            for z in range(0, n - 2, 4):
                flair[x, y, z:z + 3] = 5.0
    flair[1:9, 1:9] = rng.normal(1, 0.05, (8, 8, n))  # ... less 4 x 4 x 6 cleared here ...
    flair[2:7, 2:7, 2:7] = 5.0  # ... for one real lesion (125 voxels): 769 components
    f = write(tmp_path / "in" / "flair.nii.gz", flair)
    m = write(tmp_path / "in" / "mprage.nii.gz", rng.normal(1, 0.05, (n,) * 3)
              .astype(np.float32))
    point = tmp_path / "point_model"  # voxel-wise detector: every bright voxel is lesion
    save_checkpoint(point, Detector(kernel=1),
                    ModelConfig(ARCH, arguments={"kernel": 1}, roi_size=[16, 16, 16]))
    out = tmp_path / "out"
    argv = ["explain", "--flair", f, "--mprage", m, "--model", point, "--out", out, *FAST]
    t0 = time.time()
    rc, _, err = run_cli(argv, capsys)
    assert time.time() - t0 < 30  # refused after the prediction, no hang
    assert_one_line_error(rc, err, r"^instance-saliency: error: 769 lesion instances exceed "
                                   r"the limit of 300; raise --min-size or --max-instances")
    assert not out.exists() and not debris(tmp_path)
    rc, stdout, err = run_cli([*argv, "--min-size", "4"], capsys)  # the segments are 3 voxels
    assert rc == 0, err
    table = pd.read_csv(out / "instances.csv")
    assert len(table) == 1 and table.loc[0, "voxels"] == 125


# --------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_bitwise_identical_outputs(world, tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        argv = command_argv("explain", world, out)[:-len(FAST)]
        rc, _, err = run_cli([*argv, "--methods", "smoothgrad,gradcampp", "--cam-layer", "act",
                              "--n-samples", "3", "--noise-level", "0.2", "--seed", "7",
                              "--no-figures", "--quiet"], capsys)
        assert rc == 0, err
    maps = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.nii.gz"))
    assert len(maps) == 3 + 2 * 3  # prediction, mask, labels; 3 lesions x 2 methods
    assert maps == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.nii.gz"))
    for rel in maps:
        a, b = (np.asanyarray(nib.load(str(o / rel)).dataobj) for o in outs)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), rel  # bitwise
    sal = np.asanyarray(nib.load(str(outs[0] / "saliency/smoothgrad/lesion_001.nii.gz"))
                        .dataobj)
    assert np.abs(sal).max() > 0
    for name in ("instances.csv", "profiles.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    runs = [json.loads((o / "run.json").read_text()) for o in outs]
    assert runs[0]["parameters"] == runs[1]["parameters"] and runs[0]["seed"] == 7


# --------------------------------------------------------------------------------------------
# real processes: exit status and stderr, SIGKILL midway

RUNNER = ("import sys; sys.path.insert(0, {tests!r}); import test_reliability as t; "
          "t.register(); from instance_saliency import cli; sys.exit(cli.main(sys.argv[1:]))")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _spawn(argv, registered=False):
    if registered:
        cmd = [sys.executable, "-c", RUNNER.format(tests=str(TESTS))]
    else:
        cmd = [sys.executable, "-m", "instance_saliency.cli"]
    return subprocess.Popen([*cmd, *[str(a) for a in argv]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def test_real_process_exit_status_and_one_line(world, tmp_path):
    unet = tmp_path / "unet"  # a built-in architecture (the subprocess knows no test model)
    from instance_saliency.models import build_model

    save_checkpoint(unet, build_model("unet3d", channels=(2, 4), strides=(2,)),
                    ModelConfig("unet3d", arguments={"channels": [2, 4], "strides": [2]},
                                roi_size=[16, 16, 16]))
    w = unet / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    g = world["good"]
    runs = {
        "explain_missing": (["explain", "--flair", tmp_path / "nope.nii.gz", "--mprage",
                             g["mprage"], "--out", tmp_path / "o1"], "nope.nii.gz"),
        "predict_corrupt": (["predict", "--flair", g["flair"], "--mprage", g["mprage"],
                             "--model", unet, "--out", tmp_path / "o2"], "model.safetensors"),
        "evaluate_labels": (["evaluate", "--pred", g["mask"], "--mask",
                             world["bad"]["mask_labels"]], "bad_mask_labels.nii.gz"),
    }
    procs = {k: _spawn(a) for k, (a, _) in runs.items()}  # in parallel
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 2, (k, stderr)
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERR), (k, stderr)
        assert runs[k][1] in lines[0], (k, lines[0])
        assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def _kill_when(proc, ready, timeout=120):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ends or times out first."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be killed: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run to start")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # reaped: its pid no longer exists
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def slow_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow")
    f, m = many_blobs()
    return {"flair": write(root / "flair.nii.gz", f), "mprage": write(root / "mprage.nii.gz", m)}


def _slow_argv(slow_case, world, out, n_samples):
    return ["explain", "--flair", slow_case["flair"], "--mprage", slow_case["mprage"],
            "--model", world["models"]["good"], "--out", out, "--methods", "smoothgrad",
            "--n-samples", str(n_samples), "--no-figures", "--quiet"]


def test_sigkill_during_explain_keeps_previous_complete_run(world, slow_case, tmp_path,
                                                           capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(_slow_argv(slow_case, world, out, 1), capsys)  # complete, quick
    assert rc == 0, err
    before = snapshot(out)
    run_json = (out / "run.json").read_bytes()
    proc = _spawn([*_slow_argv(slow_case, world, out, 2000), "--overwrite"], registered=True)
    stage = tmp_path / f".out.partial-{proc.pid}"
    # midway: the prediction is written into the staging folder, SmoothGrad is running
    _kill_when(proc, lambda: (stage / "prediction_prob.nii.gz").exists())
    assert snapshot(out) == before  # the previous complete run, untouched
    assert (out / "run.json").read_bytes() == run_json
    assert stage.is_dir()  # SIGKILL cannot clean up; the next run does
    # the next run into the same place removes the dead process's staging folder
    rc, _, err = run_cli([*_slow_argv(slow_case, world, out, 1), "--overwrite"], capsys)
    assert rc == 0, err
    assert not stage.exists() and not debris(tmp_path)
    assert json.loads((out / "run.json").read_text())["summary"]["instances"] == 18


def test_sigkill_during_first_explain_leaves_no_output(world, slow_case, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _spawn(_slow_argv(slow_case, world, out, 2000), registered=True)
    stage = tmp_path / f".out.partial-{proc.pid}"
    _kill_when(proc, lambda: (stage / "instances.nii.gz").exists())
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [stage.name]
    assert remove_stale_staging(out) == [stage.name]
    assert not any(tmp_path.iterdir())


def test_stale_staging_of_dead_processes_removed_live_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: the pid no longer exists
    live = os.getppid()
    out = tmp_path / "run"
    for name in (f".run.partial-{dead.pid}", f".run.old-{dead.pid}", f".run.partial-{live}",
                 f".other.partial-{dead.pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "instances.csv").write_text("x")
    (tmp_path / f".run.partial-{dead.pid}x").mkdir()  # not a staging name
    stage = prepare_output(out, overwrite=False)
    assert stage.name == f".run.partial-{os.getpid()}"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".run.partial-{live}", f".other.partial-{dead.pid}",
                           f".run.partial-{dead.pid}x", stage.name])
    stage.rmdir()


def test_cohort_sigkill_then_resume(world, tmp_path, monkeypatch):
    """A cohort killed midway (SIGKILL) resumes: no subject lost, none done twice."""
    data = tmp_path / "data"
    f, m = many_blobs()
    names = ["s1", "s2", "s3", "s4"]
    for k in names:
        write(data / "imagesTs" / f"{k}_0000.nii.gz", f)
        write(data / "imagesTs" / f"{k}_0001.nii.gz", m)
    out = tmp_path / "cohort"
    opts = ["--methods", "smoothgrad", "--n-samples", "12", "--no-figures", "--quiet",
            "--n-boot", "20"]
    proc = _spawn(["cohort", "--data", data, "--out", out, "--model", world["models"]["good"],
                   *opts], registered=True)
    sub = out / "subjects"

    def one_done():
        return sub.is_dir() and any((sub / k / "run.json").is_file() for k in names)

    _kill_when(proc, one_done)
    complete = sorted(k for k in names if (sub / k / "run.json").is_file())
    assert 1 <= len(complete) < 4, complete
    stamps = {k: (sub / k / "run.json").stat().st_mtime_ns for k in complete}
    calls = []
    real = explain_mod.explain

    def counting(flair, mprage, target, **kw):
        calls.append(Path(target).name)
        return real(flair, mprage, target, **kw)

    monkeypatch.setattr(cohort, "explain", counting)
    cfg = explain_mod.ExplainConfig(methods=("smoothgrad",), n_samples=12, figures=False)
    res = cohort.run_cohort(data, out, cfg, model_dir=world["models"]["good"], progress=False,
                            n_boot=20, log=lambda msg: None)
    assert sorted(calls) == sorted(set(names) - set(complete))  # none done twice
    assert res["skipped"] == complete
    assert all((sub / k / "run.json").is_file() for k in names)  # none lost
    assert {k: (sub / k / "run.json").stat().st_mtime_ns for k in complete} == stamps
    assert not debris(tmp_path)
    assert json.loads((out / "stats.json").read_text())["n_subjects"] == 4


# --------------------------------------------------------------------------------------------
# output-folder safety (found by a new user trying to break the tool)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(world, tmp_path, capsys):
    """--overwrite replaces only a finished run: a folder with other files is refused."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli(command_argv("explain", world, out) + extra, capsys)
        assert_one_line_error(rc, err, "not an instance-saliency run", [out])
    assert (out / "notes.txt").read_text() == "precious"


def test_output_folder_containing_the_inputs_is_refused(world, tmp_path, capsys):
    import shutil

    d = tmp_path / "inputs"
    d.mkdir()
    f = shutil.copy(world["good"]["flair"], d / "f.nii.gz")
    m = shutil.copy(world["good"]["mprage"], d / "m.nii.gz")
    before = snapshot(d)
    rc, _, err = run_cli(command_argv("explain", world, d, flair=f, mprage=m) + ["--overwrite"],
                         capsys)
    assert_one_line_error(rc, err, "contains the input")
    assert snapshot(d) == before


def test_predict_never_overwrites_an_input(world, tmp_path, capsys):
    import shutil

    f = Path(shutil.copy(world["good"]["flair"], tmp_path / "f.nii.gz"))
    before = f.read_bytes()
    rc, _, err = run_cli(command_argv("predict", world, f, flair=f) + ["--overwrite"], capsys)
    assert_one_line_error(rc, err, "would overwrite an input")
    assert f.read_bytes() == before


def test_concurrent_run_is_not_silently_replaced(world, tmp_path, capsys, monkeypatch):
    """A run that finishes while another already committed into the same --out is refused."""
    from instance_saliency import explain as ex

    out = tmp_path / "conc"
    real_commit = ex.commit_output

    def other_run_finishes_first(stage, o, overwrite=False, inputs=()):
        out.mkdir()
        (out / ex.RUN_FILE).write_text("{}")  # the other run's result
        return real_commit(stage, o, overwrite, inputs)

    monkeypatch.setattr(ex, "commit_output", other_run_finishes_first)
    rc, _, err = run_cli(command_argv("explain", world, out), capsys)
    assert_one_line_error(rc, err, "already holds a finished run")
    assert (out / ex.RUN_FILE).read_text() == "{}"
    assert not debris(tmp_path)


def test_symlinked_output_folder_is_followed(world, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    rc, _, err = run_cli(command_argv("explain", world, link), capsys)
    assert rc == 0, err
    assert link.is_symlink() and (real / "run.json").is_file()
    assert not debris(tmp_path)


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_unavailable_device_is_a_one_line_error(world, tmp_path, capsys, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    for dev, pattern in (("cuda", "no CUDA GPU"), ("tpu9", "device")):
        rc, _, err = run_cli(command_argv(command, world, tmp_path / "o") + ["--device", dev],
                             capsys)
        assert_one_line_error(rc, err, pattern)
    assert not (tmp_path / "o").exists()


def test_missing_cam_layer_refused_before_any_work(world, tmp_path, capsys):
    rc, _, err = run_cli(command_argv("explain", world, tmp_path / "o")
                         + ["--methods", "smoothgrad,gradcampp", "--cam-layer", "no.such.layer"],
                         capsys)
    assert_one_line_error(rc, err, "is not in this model")
    assert not (tmp_path / "o").exists() and not debris(tmp_path)


def test_evaluate_out_folder_and_analyze_unknown_method(world, tmp_path, capsys):
    rc, _, err = run_cli(command_argv("evaluate", world, tmp_path), capsys)
    assert_one_line_error(rc, err, "is a folder")
    out = tmp_path / "coh"
    rc, _, err = run_cli(command_argv("cohort", world, out), capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["analyze", out, "--method", "foo", "--n-boot", "0"], capsys)
    assert_one_line_error(rc, err, "--method foo: no foo maps in this cohort; present: "
                                   "smoothgrad")


def test_overwrite_refuses_a_run_folder_holding_user_files(tmp_path):
    """Found by a fresh user: --overwrite of a finished run must not delete files the user
    added to it."""
    from instance_saliency.errors import OutputError
    from instance_saliency.explain import check_output_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "instances.csv").write_text("")
    check_output_folder(out, overwrite=True)  # only run files: may be replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"not part of a run \(notes.txt\)"):
        check_output_folder(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
