"""Cohort runs: dataset discovery, manifest root checks, sharding, resume after interruption,
failure bookkeeping.

Subjects are tiny synthetic scans (24^3 voxels) written here: a bright FLAIR blob inside the
ground-truth mask (TP), a bright blob outside it (FP) and a masked blob that is not bright (FN).
The model is a registered hand-set architecture (lesion logit grows with local FLAIR), ROI 16,
one SmoothGrad sample, no figures, so that one subject takes a fraction of a second.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from instance_saliency import cli, cohort, explain as explain_mod, models
from instance_saliency.errors import InputError
from instance_saliency.explain import ExplainConfig, prepare_output
from instance_saliency.models import ModelConfig, save_checkpoint

# Lesion logit = 4 · mean FLAIR (3^3) − 6: bright FLAIR blobs become lesions.
from _helpers import Detector as BlobDetector
from _helpers import save_fold_ensemble

N = 24
CFG = dict(methods=("smoothgrad",), n_samples=1, figures=False)
FAST = ["--methods", "smoothgrad", "--n-samples", "1", "--no-figures", "--quiet",
        "--n-boot", "20"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    models.ARCHITECTURES["test_cohort_blob"] = BlobDetector
    d = tmp_path_factory.mktemp("model")
    save_checkpoint(d, BlobDetector(), ModelConfig("test_cohort_blob", roi_size=[16, 16, 16]))
    yield d
    models.ARCHITECTURES.pop("test_cohort_blob", None)


def _ball(c, r):
    g = np.indices((N, N, N)).astype(float)
    return ((g - np.asarray(c, float)[:, None, None, None]) ** 2).sum(0) <= r * r


def subject_arrays(seed):
    rng = np.random.default_rng(seed)
    brain = _ball((12, 12, 12), 11)
    flair = np.where(brain, rng.normal(1, 0.05, (N,) * 3), 0).astype(np.float32)
    mprage = np.where(brain, rng.normal(1, 0.05, (N,) * 3), 0).astype(np.float32)
    s = seed % 3
    tp, fp, fn = _ball((8, 8, 12 + s), 2.5), _ball((16, 15, 12 - s), 2), _ball((12, 17, 6), 2)
    flair[tp] = 3.0
    flair[fp] = 2.6 + 0.2 * s
    mask = (tp | fn).astype(np.uint8)
    return flair, mprage, mask


def write_nifti(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def make_nnunet(root, names, split="Ts", labels=True):
    for k, name in enumerate(names):
        f, m, gt = subject_arrays(k)
        write_nifti(root / f"images{split}" / f"{name}_0000.nii.gz", f)
        write_nifti(root / f"images{split}" / f"{name}_0001.nii.gz", m)
        if labels:
            write_nifti(root / f"labels{split}" / f"{name}.nii.gz", gt)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_nnunet(tmp_path_factory.mktemp("data"), ["sub-01", "sub-02", "sub-03", "sub-04"])


def complete(out):
    return sorted(p.name for p in (out / "subjects").iterdir()
                  if not p.name.startswith(".") and (p / "run.json").is_file())


# --------------------------------------------------------------------------------------------
# discovery


def test_nnunet_layout_discovered(tmp_path):
    root = make_nnunet(tmp_path / "ds", ["b", "a"])
    (root / "imagesTs" / ".DS_Store").write_text("x")
    (root / "imagesTs" / "README.txt").write_text("x")
    (root / "labelsTs" / "a.nii.gz").unlink()  # case a has no ground truth
    write_nifti(root / "imagesTs" / "a_0002.nii.gz", np.ones((2, 2, 2), np.float32))  # ignored
    cases = cohort.discover_cases(root)
    assert [c.subject for c in cases] == ["a", "b"]
    a, b = cases
    assert a.flair.name == "a_0000.nii.gz" and a.mprage.name == "a_0001.nii.gz"
    assert a.mask is None and b.mask == root / "labelsTs" / "b.nii.gz"
    # imagesTr when there is no imagesTs
    tr = make_nnunet(tmp_path / "tr", ["x"], split="Tr")
    (c,) = cohort.discover_cases(tr)
    assert c.flair.parent.name == "imagesTr" and c.mask.parent.name == "labelsTr"
    # a case without its MPRAGE is named
    (root / "imagesTs" / "b_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="case 'b'.*no MPRAGE"):
        cohort.discover_cases(root)
    write_nifti(root / "imagesTs" / "b_0001.nii.gz", np.ones((2, 2, 2), np.float32))
    write_nifti(root / "imagesTs" / "stray.nii.gz", np.ones((2, 2, 2), np.float32))
    with pytest.raises(InputError, match="stray.nii.gz"):
        cohort.discover_cases(root)
    with pytest.raises(InputError, match="not found"):
        cohort.discover_cases(tmp_path / "missing")
    with pytest.raises(InputError, match="imagesTs"):
        cohort.discover_cases(tmp_path)


def _manifest(path, rows, header="subject,flair,mprage,mask"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_manifest_paths_and_root_check(tmp_path):
    data = tmp_path / "data"
    f, m, gt = subject_arrays(0)
    for k, a in (("f", f), ("m", m), ("gt", gt)):
        write_nifti(data / "scans" / f"s1_{k}.nii.gz", a)
        write_nifti(tmp_path / "outside" / f"s1_{k}.nii.gz", a)
    ok = _manifest(data / "list.csv", [("s1", "scans/s1_f.nii.gz", "scans/s1_m.nii.gz", ""),
                                       ("s2", "scans/s1_f.nii.gz", "scans/s1_m.nii.gz",
                                        "scans/s1_gt.nii.gz")])
    c1, c2 = cohort.discover_cases(ok)
    assert c1.flair == (data / "scans" / "s1_f.nii.gz").resolve() and c1.mask is None
    assert c2.mask == (data / "scans" / "s1_gt.nii.gz").resolve()
    # a relative path that escapes the data root is refused, naming the row
    esc = _manifest(data / "esc.csv", [("s1", "scans/s1_f.nii.gz", "scans/s1_m.nii.gz", ""),
                                       ("s2", "../outside/s1_f.nii.gz", "scans/s1_m.nii.gz", "")])
    with pytest.raises(InputError, match=r"row 2 \(subject 's2'\).*outside the data root"):
        cohort.discover_cases(esc)
    assert len(cohort.discover_cases(esc, allow_outside_root=True)) == 2
    # absolute paths and symbolic links are checked after resolving
    absolute = _manifest(data / "abs.csv", [
        ("s1", str(tmp_path / "outside" / "s1_f.nii.gz"), "scans/s1_m.nii.gz", "")])
    with pytest.raises(InputError, match="outside the data root"):
        cohort.discover_cases(absolute)
    os.symlink(tmp_path / "outside" / "s1_m.nii.gz", data / "scans" / "link.nii.gz")
    link = _manifest(data / "link.csv", [("s1", "scans/s1_f.nii.gz", "scans/link.nii.gz", "")])
    with pytest.raises(InputError, match="mprage path 'scans/link.nii.gz' lies outside"):
        cohort.discover_cases(link)
    # the CLI reports it on one line, exit status 2, nothing written
    out = tmp_path / "out"
    assert cli.main(["cohort", "--data", str(esc), "--out", str(out), *FAST]) == 2
    assert not out.exists()


@pytest.mark.parametrize("rows, message", [
    ([("s1", "a.nii.gz", "", "")], "no MPRAGE"),
    ([("s1", "a.nii.gz", "a.nii.gz", ""), ("s1", "a.nii.gz", "a.nii.gz", "")], "not unique"),
    ([("S1", "a.nii.gz", "a.nii.gz", ""), ("s1", "a.nii.gz", "a.nii.gz", "")], "not unique"),
    ([("../evil", "a.nii.gz", "a.nii.gz", "")], "not usable as a folder"),
    ([(".hidden", "a.nii.gz", "a.nii.gz", "")], "not usable as a folder"),
    ([("a b", "a.nii.gz", "a.nii.gz", "")], "not usable as a folder"),
    ([("s1", "a.nii.gz", "missing.nii.gz", "")], "row 1 .*mprage file .* not found"),
])
def test_manifest_refusals(tmp_path, rows, message):
    write_nifti(tmp_path / "a.nii.gz", np.ones((2, 2, 2), np.float32))
    with pytest.raises(InputError, match=message):
        cohort.discover_cases(_manifest(tmp_path / "m.csv", rows))


def test_manifest_missing_column(tmp_path):
    with pytest.raises(InputError, match="lacks column"):
        cohort.discover_cases(_manifest(tmp_path / "m.csv", [("s", "a")], "subject,flair"))


def test_shards_partition_deterministically():
    cases = [cohort.Case(f"s{k}", (Path("f"), Path("m"))) for k in (5, 1, 3, 0, 6, 2, 4)]
    parts = [cohort.shard_cases(cases, (i, 3)) for i in (1, 2, 3)]
    assert [c.subject for c in parts[0]] == ["s0", "s3", "s6"]
    assert [c.subject for c in parts[1]] == ["s1", "s4"]
    names = [c.subject for p in parts for c in p]
    assert sorted(names) == sorted(c.subject for c in cases) and len(set(names)) == 7
    assert cohort.shard_cases(cases[::-1], (2, 3)) == parts[1]
    assert cohort.parse_shard(" 2/3 ") == (2, 3)
    for bad in ("0/3", "4/3", "1/0", "a/b", "2"):
        with pytest.raises(InputError, match="--shard"):
            cohort.parse_shard(bad)


# --------------------------------------------------------------------------------------------
# running


def test_resume_after_interruption(dataset, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "cohort"
    real = explain_mod.explain
    calls = []

    def killed_on_third(flair, mprage, target, **kw):
        calls.append(Path(target).name)
        if len(calls) == 3:  # emulate SIGKILL mid-subject: staging folder left behind
            prepare_output(Path(target), False)
            raise KeyboardInterrupt
        return real(flair, mprage, target, **kw)

    monkeypatch.setattr(cohort, "explain", killed_on_third)
    cfg = ExplainConfig(**CFG)
    with pytest.raises(KeyboardInterrupt):
        cohort.run_cohort(dataset, out, cfg, model_dir=model_dir, progress=False, n_boot=20,
                          log=lambda m: None)
    assert complete(out) == ["sub-01", "sub-02"]
    leftovers = [p.name for p in (out / "subjects").iterdir() if p.name.startswith(".")]
    assert leftovers == [f".sub-03.partial-{os.getpid()}"]
    assert not (out / "stats.json").exists() and not (out / "failures.json").exists()
    stamps = {s: (out / "subjects" / s / "run.json").stat().st_mtime_ns
              for s in complete(out)}

    calls.clear()

    def counting(flair, mprage, target, **kw):
        calls.append(Path(target).name)
        return real(flair, mprage, target, **kw)

    monkeypatch.setattr(cohort, "explain", counting)
    logs = []
    res = cohort.run_cohort(dataset, out, cfg, model_dir=model_dir, progress=False,
                            n_boot=20, log=logs.append)
    assert calls == ["sub-03", "sub-04"]  # nothing done twice
    assert res["skipped"] == ["sub-01", "sub-02"] and res["done"] == ["sub-03", "sub-04"]
    assert res["removed_leftovers"] == leftovers
    assert complete(out) == ["sub-01", "sub-02", "sub-03", "sub-04"]  # nothing lost
    assert not [p for p in (out / "subjects").iterdir() if p.name.startswith(".")]
    assert {s: (out / "subjects" / s / "run.json").stat().st_mtime_ns for s in stamps} == stamps
    assert any("2 done, 2 skipped (already complete), 0 failed of 4" in m for m in logs)
    js = json.loads((out / "stats.json").read_text())
    assert js["n_subjects"] == 4 and js["counts"] == {"TP": 4, "FP": 4, "FN": 4, "unknown": 0}
    assert js["flag_errors"]["cv"] == "LeaveOneGroupOut"
    assert not (out / "cohort_report.html").exists()  # --no-figures
    # a third run, now with figures, does nothing but the analysis, and says that the
    # subjects explained with --no-figures keep no page
    calls.clear()
    logs.clear()
    res = cohort.run_cohort(dataset, out, ExplainConfig(**{**CFG, "figures": True}),
                            model_dir=model_dir, progress=False, n_boot=20, log=logs.append)
    assert calls == [] and len(res["skipped"]) == 4
    assert any("4 complete subject(s) explained earlier with --no-figures have no report.html"
               " and are kept as they are: sub-01, sub-02, sub-03, sub-04 (remove their folders"
               " and run again to draw them; --overwrite redoes the whole cohort)" in m
               for m in logs)
    # other explain parameters are refused instead of mixing them into one cohort
    with pytest.raises(InputError, match="n_samples = 1 there, 2 now"):
        cohort.run_cohort(dataset, out, ExplainConfig(**{**CFG, "n_samples": 2}),
                          model_dir=model_dir, progress=False, log=lambda m: None)
    assert calls == []


def test_failures_recorded_and_retried(dataset, model_dir, tmp_path, capsys):
    data = tmp_path / "ds"
    import shutil

    shutil.copytree(dataset, data)
    bad = data / "imagesTs" / "sub-02_0001.nii.gz"
    good = bad.read_bytes()
    write_nifti(bad, np.ones((20, 20, 20), np.float32))  # MPRAGE on another grid
    out = tmp_path / "cohort"
    args = ["cohort", "--data", str(data), "--out", str(out), "--model", str(model_dir), *FAST]
    assert cli.main(args) == 1  # some subjects failed
    fails = json.loads((out / "failures.json").read_text())
    assert list(fails) == ["sub-02"] and fails["sub-02"]["error"] == "InputError"
    assert "sub-02_0001.nii.gz" in fails["sub-02"]["message"]
    assert complete(out) == ["sub-01", "sub-03", "sub-04"]  # the run went on
    err = capsys.readouterr()
    assert "3 done, 0 skipped (already complete), 1 failed of 4" in err.out + err.err
    assert json.loads((out / "stats.json").read_text())["failures"]["sub-02"]
    bad.write_bytes(good)
    assert cli.main(args) == 0
    assert complete(out) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert not (out / "failures.json").exists()


def test_shards_then_analyze(dataset, model_dir, tmp_path):
    out = tmp_path / "cohort"
    base = ["cohort", "--data", str(dataset), "--out", str(out), "--model", str(model_dir),
            *FAST]
    assert cli.main([*base, "--shard", "1/2"]) == 0
    assert complete(out) == ["sub-01", "sub-03"]
    assert not (out / "stats.json").exists()  # no analysis for one shard of several
    assert cli.main([*base, "--shard", "2/2"]) == 0
    assert complete(out) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert cli.main(["analyze", str(out), "--n-boot", "20", "--no-figures"]) == 0
    js = json.loads((out / "stats.json").read_text())
    assert js["subjects"] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert js["n_lesions"] == 12


def test_analyze_fit_flagger_then_explain_flagger(dataset, model_dir, tmp_path):
    """cohort -> analyze --fit-flagger -> explain --flagger: the per-lesion FP probability of
    explain equals the flagger's formula on that run's own table; flagged lesions are marked."""
    import pandas as pd

    from instance_saliency import flagging

    out = tmp_path / "cohort"
    assert cli.main(["cohort", "--data", str(dataset), "--out", str(out), "--model",
                     str(model_dir), *FAST]) == 0
    table = pd.read_csv(out / "subjects" / "sub-01" / "instances.csv")
    assert "smoothgrad_flair_glcm_in_contrast" in table and "smoothgrad_mprage_fo_rim_p90" in table
    assert "smoothgrad_flair_glszm_rim_zp" in table and (table.brain_border_mm > 0).all()
    js = json.loads((out / "stats.json").read_text())
    assert js["flag_errors"]["status"] == "ok" and "smoothgrad" in js["flag_errors"]["methods"]
    assert "beyond size and confidence" in (out / "stats.md").read_text()
    fl_path = tmp_path / "flagger.json"
    assert cli.main(["analyze", str(out), "--n-boot", "20", "--n-perm", "20", "--no-figures",
                     "--fit-flagger", str(fl_path), "--flagger-set", "baseline"]) == 0
    fl = json.loads(fl_path.read_text())
    assert fl["features"] == ["log_volume_mm3", "prob_mean", "prob_max", "brain_border_mm"]
    assert fl["feature_set"] == "baseline" and fl["fitted_on"]["subjects"] == [
        "sub-01", "sub-02", "sub-03", "sub-04"]
    assert fl["fitted_on"]["model"] and fl["fitted_on"]["explain_parameters"]["n_samples"] == 1
    # force a threshold every predicted lesion reaches, so that flags are visible
    fl["threshold"] = 0.0
    fl_path.write_text(json.dumps(fl))
    f, m, gt = subject_arrays(0)
    src = tmp_path / "one"
    fp, mp, gp = (write_nifti(src / n, a) for n, a in (("f.nii.gz", f), ("m.nii.gz", m),
                                                        ("gt.nii.gz", gt)))
    run = tmp_path / "run"
    assert cli.main(["explain", "--flair", str(fp), "--mprage", str(mp), "--mask", str(gp),
                     "--model", str(model_dir), "--methods", "smoothgrad", "--n-samples", "1",
                     "--quiet", "--flagger", str(fl_path), "--out", str(run)]) == 0
    t = pd.read_csv(run / "instances_full.csv")  # full precision (instances.csv: 4 decimals)
    pred = t.source == "pred"
    expect = flagging.flagger_probabilities(flagging.load_flagger(fl_path), t[pred])
    np.testing.assert_allclose(t.flagger_prob_fp[pred], expect, rtol=0, atol=1e-9)
    assert t.flagger_prob_fp[~pred].isna().all() and t.flagger_flagged[pred].all()
    report = (run / "report.html").read_text()
    assert "flagged as likely FP" in report
    rj = json.loads((run / "run.json").read_text())
    assert rj["parameters"]["flagger"] == str(fl_path)
    assert rj["flagger"]["feature_set"] == "baseline" and len(rj["flagger"]["sha256"]) == 64


def test_training_scans_explained_by_the_members_that_never_saw_them(dataset, tmp_path):
    """A checkpoint ensemble whose members record their training scans: each subject is
    explained with the members that did not train on it (run.json says which); a subject
    every member trained on gets the whole model and a warning; --include-training-scans
    uses the whole model for everyone."""
    models.ARCHITECTURES["test_cohort_blob"] = BlobDetector
    try:
        root = save_fold_ensemble(tmp_path / "ens", BlobDetector, "test_cohort_blob",
                                  {"fold_a": ["sub-01", "sub-03"], "fold_b": ["sub-02", "sub-03"]})
        out = tmp_path / "cohort"
        lines = []
        cohort.run_cohort(dataset, out, ExplainConfig(**CFG), model_dir=root, progress=False,
                          n_boot=20, log=lines.append)

        def used(subject, where=out):
            run = json.loads((where / "subjects" / subject / "run.json").read_text())
            return [m["member"] for m in run["model"]["members_trained_on"]]

        assert used("sub-01") == ["fold_b"]
        assert used("sub-02") == ["fold_a"]
        assert used("sub-03") == ["fold_a", "fold_b"]
        assert used("sub-04") == ["fold_a", "fold_b"]
        assert any("sub-03 is a training scan" in m for m in lines)
        assert any(m.startswith("sub-01: a training scan") and "fold_b" in m for m in lines)
        out2 = tmp_path / "cohort_all"
        cohort.run_cohort(dataset, out2, ExplainConfig(**CFG), model_dir=root, progress=False,
                          n_boot=20, log=lines.append, include_training_scans=True)
        assert used("sub-01", out2) == ["fold_a", "fold_b"]
        # resuming with the rule flipped would mix held-out and whole-model subjects: refused
        with pytest.raises(InputError, match="subject sub-01 .* other parameters .*"
                                             "include-training-scans"):
            cohort.run_cohort(dataset, out, ExplainConfig(**CFG), model_dir=root,
                              progress=False, n_boot=20, log=lines.append,
                              include_training_scans=True)
    finally:
        models.ARCHITECTURES.pop("test_cohort_blob", None)
