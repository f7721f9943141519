"""torchrun: cohorts split over ranks, a killed or failing rank, DDP training.

Real ``torchrun --standalone --nproc-per-node 2`` launches on the CPU (gloo). The cohort is four
32^3 crops of two real scans (the two largest consensus lesions of open_ms_data patient07 and
patient19), explained by the hand-set FLAIR detector of ``_helpers`` (registered in the ranks by
``tests/torchrun_site/sitecustomize.py``) with one SmoothGrad sample and no figures; its
results are compared with a single-process run of the same cohort. Training compares two
processes with one process at the same global batch.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from instance_saliency import cli, cohort, datasets, models
from instance_saliency.distributed import World, process_group, timeout_s
from instance_saliency.errors import DistributedError, InputError
from instance_saliency.models import ModelConfig, save_checkpoint

from _helpers import DATA, Detector, needs_data

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
ARCH = "test_dist_detector"
FAST = ["--methods", "smoothgrad", "--n-samples", "1", "--no-figures", "--quiet",
        "--n-boot", "20"]
SUBJECTS = ["patient07-a", "patient07-b", "patient19-a", "patient19-b"]


def _torchrun() -> list:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def launch(args: list, nproc: int = 2, timeout: int = 400, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc ARGS`` with the worktree's sources."""
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS / "torchrun_site"), str(SRC)]),
         "IS_TEST_ARCH": ARCH, "IS_TEST_HELPERS": str(TESTS), "OMP_NUM_THREADS": "1",
         "INSTANCE_SALIENCY_DIST_TIMEOUT": "240", **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([*_torchrun(), "--standalone", f"--nproc-per-node={nproc}", *args],
                          env=e, capture_output=True, text=True, timeout=timeout)


def _crop(img, sl, path: Path) -> None:
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ np.array([s.start for s in sl]) + img.affine[:3, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[sl], aff, img.header), str(path))


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """nnU-Net raw folder of four real 32^3 crops, one around each of the two largest
    consensus lesions of patient07 and patient19."""
    if DATA is None:
        pytest.skip("real scans not found: set INSTANCE_SALIENCY_DATA")
    root = tmp_path_factory.mktemp("crops")
    for scan in ("patient07", "patient19"):
        p = datasets.fetch_subject(scan, DATA)
        imgs = {k: nib.load(str(p[k])) for k in ("flair", "mprage", "mask")}
        lab = cc3d.connected_components((np.asarray(imgs["mask"].dataobj) > 0).astype(np.uint8),
                                        connectivity=26)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        for tag, comp in zip("ab", np.argsort(sizes)[::-1][:2]):
            c = np.argwhere(lab == comp).mean(0).astype(int)
            sl = tuple(slice(int(min(max(a - 16, 0), n - 32)), int(min(max(a - 16, 0), n - 32))
                             + 32) for a, n in zip(c, lab.shape))
            name = f"{scan}-{tag}"
            _crop(imgs["flair"], sl, root / "imagesTs" / f"{name}_0000.nii.gz")
            _crop(imgs["mprage"], sl, root / "imagesTs" / f"{name}_0001.nii.gz")
            _crop(imgs["mask"], sl, root / "labelsTs" / f"{name}.nii.gz")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    models.ARCHITECTURES[ARCH] = Detector
    d = tmp_path_factory.mktemp("model")
    save_checkpoint(d, Detector(), ModelConfig(ARCH, roi_size=[32, 32, 32]))
    yield d
    models.ARCHITECTURES.pop(ARCH, None)


@pytest.fixture(scope="module")
def reference(crops, model_dir, tmp_path_factory):
    """The same cohort run in this one process."""
    out = tmp_path_factory.mktemp("single") / "cohort"
    assert cli.main(["cohort", "--data", str(crops), "--out", str(out), "--model",
                     str(model_dir), *FAST]) == 0
    return out


def complete(out: Path) -> list:
    return sorted(p.name for p in (out / "subjects").iterdir()
                  if not p.name.startswith(".") and (p / "run.json").is_file())


def assert_same_results(out: Path, ref: Path) -> None:
    """Per-lesion tables of every subject and the pooled table equal the reference's."""
    assert complete(out) == complete(ref) == SUBJECTS
    for s in SUBJECTS:
        a = pd.read_csv(out / "subjects" / s / "instances_full.csv")
        b = pd.read_csv(ref / "subjects" / s / "instances_full.csv")
        assert len(a) > 0, s
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-9)
    a, b = pd.read_csv(out / "cohort_instances.csv"), pd.read_csv(ref / "cohort_instances.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-9)
    ja, jb = json.loads((out / "stats.json").read_text()), json.loads((ref / "stats.json")
                                                                     .read_text())
    assert ja["subjects"] == jb["subjects"] == SUBJECTS
    assert ja["counts"] == jb["counts"] and ja["n_lesions"] == jb["n_lesions"]


def _cohort_args(crops, out, model_dir) -> list:
    return ["-m", "instance_saliency", "cohort", "--data", str(crops), "--out", str(out),
            "--model", str(model_dir), *FAST]


# --------------------------------------------------------------------------------------------
# the rank environment


def test_world_from_environment_and_devices(monkeypatch):
    assert World.from_environment({}) == World(0, 1, 0)
    w = World.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.shard, str(w)) == (3, 4, 1, (4, 4), "rank 3 of 4")
    assert w.distributed and not w.is_main
    assert w.device("cpu") == "cpu" and World(0, 1, 0).device("cuda:1") == "cuda:1"
    for env, msg in [({"WORLD_SIZE": "2"}, "RANK is not set"),
                     ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside 0..1"),
                     ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not an integer")]:
        with pytest.raises(DistributedError, match=msg):
            World.from_environment(env)
    with pytest.raises(InputError, match="give --device cuda"):
        w.device("cuda:1")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus == 0:  # no GPU at all: the hint is --device cpu, not fewer ranks
        with pytest.raises(InputError, match="no CUDA GPU is visible on this node; use "
                                             "--device cpu"):
            w.device("cuda")
    elif n_gpus < 2:
        with pytest.raises(InputError, match="LOCAL_RANK 1 has no GPU of its own"):
            w.device("cuda")
    monkeypatch.setenv("INSTANCE_SALIENCY_DIST_TIMEOUT", "-5")
    with pytest.raises(InputError, match="positive number of seconds"):
        timeout_s(10)
    monkeypatch.setenv("INSTANCE_SALIENCY_DIST_TIMEOUT", "7.5")
    assert timeout_s(10) == 7.5


def test_bad_setups_under_torchrun_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "out"
    assert cli.main(["cohort", "--data", str(tmp_path), "--out", str(out), "--shard", "1/2",
                     *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["instance-saliency: error: [rank 0 of 2] --shard 1/2 cannot be combined "
                   "with torchrun "
                   "(WORLD_SIZE=2): each rank takes shard RANK+1/WORLD_SIZE itself"]
    t = tmp_path / "model"
    assert cli.main(["train", "--manifest", str(tmp_path / "m.csv"), "--out", str(t),
                     "--batch-size", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "instance-saliency: error: [rank 0 of 2] --batch-size 3 (the global batch) must be a "
        "multiple of the number of processes, WORLD_SIZE=2")
    assert cli.main(["train", "--manifest", str(tmp_path / "m.csv"), "--out", str(t),
                     "--device", "cuda:0"]) == 2
    assert "give --device cuda, each rank then uses cuda:LOCAL_RANK" in capsys.readouterr().err
    if not torch.cuda.is_available():  # no GPU at all: the hint is --device cpu, not fewer ranks
        assert cli.main(["train", "--manifest", str(tmp_path / "m.csv"), "--out", str(t),
                         "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == (
            "instance-saliency: error: [rank 0 of 2] --device cuda, but no CUDA GPU is visible "
            "on this node; use --device cpu")
    for dev in ("mps", "meta"):  # devices the tool does not support: one line, exit 2
        assert cli.main(["train", "--manifest", str(tmp_path / "m.csv"), "--out", str(t),
                         "--device", dev]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"--device {dev}: only cpu and cuda devices are supported")
    assert not t.exists()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set"):
        with process_group(World(0, 2, 0)):
            pass
    assert not out.exists()


def test_the_command_line_closes_the_process_group_when_its_command_ends(tmp_path,
                                                                         monkeypatch):
    """Every rank closes the group it opened at the end of its command (a gloo group left to
    the interpreter's exit aborted one rank in CI after a torchrun ``train``); a group that
    the calling script opened itself is left open."""
    import torch.distributed as dist

    from instance_saliency import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        fail = ["evaluate", "--pred", str(tmp_path / "none"), "--mask", str(tmp_path / "none")]
        assert cli.main(fail) == 2
        assert dist.is_initialized()  # the script's own group
        monkeypatch.setattr(distributed, "_OPENED", True)  # as process_group leaves it
        assert cli.main(fail) == 2  # a command that fails: closed all the same
        assert not dist.is_initialized() and not distributed._OPENED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _record_failures(out: str, rank: int, no_flock: bool) -> None:
    if no_flock:  # as on NFS, where a folder cannot be flock-ed
        import errno
        import fcntl

        def refuse(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")

        fcntl.flock = refuse
    for k in range(15):
        cohort._update_failures(Path(out), {f"r{rank}-s{k}": {"error": "InputError",
                                                             "message": "m"}}, [])


@pytest.mark.parametrize("no_flock", [False, True])
def test_failures_json_merges_updates_of_concurrent_ranks(tmp_path, no_flock):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_failures, args=(str(tmp_path), r, no_flock))
             for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    fails = json.loads((tmp_path / "failures.json").read_text())
    assert sorted(fails) == sorted(f"r{r}-s{k}" for r in range(4) for k in range(15))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failures.json"]  # no lock left


def test_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    lock.mkdir()
    old = time.time() - cohort._STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    t0 = time.monotonic()
    with cohort._folder_lock(lock):
        assert lock.is_dir()
    assert not lock.exists() and time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------------
# torchrun cohorts


@needs_data
def test_torchrun_cohort_equals_single_process(crops, model_dir, reference, tmp_path):
    out = tmp_path / "cohort"
    r = launch(_cohort_args(crops, out, model_dir))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    # each rank explained its shard, RANK + 1 of WORLD_SIZE, each subject exactly once
    for rank, mine in ((0, SUBJECTS[0::2]), (1, SUBJECTS[1::2])):
        assert (f"[rank {rank} of 2] cohort (rank {rank} of 2): 2 done, 0 skipped (already "
                f"complete), 0 failed of 2 subject(s)") in log
        for s in mine:
            run = json.loads((out / "subjects" / s / "run.json").read_text())
            assert run["parameters"]["n_samples"] == 1
    assert log.count("cohort (2 ranks): 4 done, 0 skipped (already complete), 0 failed of 4 "
                     "subject(s)") == 1
    assert log.count("cohort statistics of 4 subject(s)") == 1  # the analysis ran once
    assert not [p for p in (out / "subjects").iterdir() if p.name.startswith(".")]
    assert not (out / "failures.json").exists()
    assert_same_results(out, reference)


@needs_data
def test_killed_rank_then_rerun_finishes_only_what_is_missing(crops, model_dir, reference,
                                                              tmp_path):
    out = tmp_path / "cohort"
    r = launch(_cohort_args(crops, out, model_dir), IS_TEST_FAIL_RANK="1")
    assert r.returncode != 0
    first = complete(out)
    # rank 1 (patient07-b, patient19-b) was killed right after its first subject, and
    # torchrun stopped rank 0: its finished subjects stay, the second one of rank 1 is missing
    assert "patient07-b" in first and "patient19-b" not in first
    assert not (out / "stats.json").exists()
    stamps = {s: (out / "subjects" / s / "run.json").stat().st_mtime_ns for s in first}
    # the same command again (here with the console script under torchrun)
    script = Path(sys.executable).with_name("instance-saliency")
    args = _cohort_args(crops, out, model_dir)
    r = launch([str(script), *args[2:]] if script.is_file() else args)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    n = len(first)
    assert (f"cohort (2 ranks): {4 - n} done, {n} skipped (already complete), 0 failed of 4 "
            f"subject(s)") in log
    assert {s: (out / "subjects" / s / "run.json").stat().st_mtime_ns for s in first} == stamps
    assert not [p for p in (out / "subjects").iterdir() if p.name.startswith(".")]
    assert_same_results(out, reference)


@needs_data
def test_failing_rank_stops_the_analysis_without_hanging(crops, model_dir, tmp_path):
    out = tmp_path / "cohort"
    t0 = time.monotonic()
    r = launch(_cohort_args(crops, out, model_dir), IS_TEST_FAIL_RANK="1",
               IS_TEST_FAIL_HOW="raise")
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert time.monotonic() - t0 < 200  # well under the 240 s timeout: nobody waited for it
    assert ("instance-saliency: error: [rank 0 of 2] rank(s) 1 failed (rank 1: RuntimeError: "
            "injected "
            "failure); cohort statistics not computed; run the same command again to finish "
            "the missing subjects") in log
    assert "RuntimeError: injected failure" in log  # rank 1's own traceback
    assert complete(out) == SUBJECTS[0::2]  # rank 0 finished its share
    assert not (out / "stats.json").exists()


# --------------------------------------------------------------------------------------------
# distributed training

#: the trainings of one torchrun launch (train_ranks.py): "plain" without normalisation
#: layers (compared with one process), "bn" the unet3d that `train --channels 4,8` builds, and
#: the same stopped after step 2 (resumed by the command line)
TRAIN = dict(roi_size=[16, 16, 16], steps=4, batch_size=2, val_every=2, warmup=1,
             checkpoint_every=1)
BN = dict(TRAIN, arguments={"channels": [4, 8], "strides": [2]})
RUNS = {"plain": dict(TRAIN, arguments={"channels": [4, 8], "strides": [2], "norm": None},
                      validate=True),
        "bn": BN, "bn_stopped": dict(BN, stop_after=2)}


def _train_subject(seed: int):
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 1, (2, 24, 20, 22)).astype(np.float32) + 3
    mask = np.zeros((24, 20, 22), np.uint8)
    mask[8:12, 6:10, 9:12] = 1
    mask[14:17, 12:15, 4:7] = seed % 2
    img[0][mask > 0] += 2
    return img, mask


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """Manifests of two training subjects and one validation subject (synthetic scans)."""
    root = tmp_path_factory.mktemp("train_data")
    for name, seeds in (("train.csv", (0, 1)), ("val.csv", (2,))):
        rows = ["subject,flair,mprage,mask"]
        for k in seeds:
            img, mask = _train_subject(k)
            for what, a in (("flair", img[0]), ("mprage", img[1]), ("mask", mask)):
                nib.save(nib.Nifti1Image(a, np.eye(4)), str(root / f"s{k}_{what}.nii.gz"))
            rows.append(f"s{k},s{k}_flair.nii.gz,s{k}_mprage.nii.gz,s{k}_mask.nii.gz")
        (root / name).write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def ddp_runs(train_data, tmp_path_factory):
    """RUNS trained by ``torchrun --nproc-per-node 2`` (global batch 2 = 1 patch per rank)."""
    out = tmp_path_factory.mktemp("ddp")
    # all three trainings in ONE launch (one process, one process group per rank): before the
    # group was kept open between calls, the ranks hung at the start of the second training in
    # some launches (a reopened group reused the first one's rendezvous keys)
    r = launch([str(TESTS / "torchrun_site" / "train_ranks.py"), str(train_data / "train.csv"),
                str(train_data / "val.csv"), str(out), json.dumps(RUNS)], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for name, kw in RUNS.items():  # every training ran (the stopped one to its checkpoint)
        assert (out / name / ("train_state.pt" if "stop_after" in kw else "model.safetensors")
                ).is_file(), name
    return out


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_ranks_draw_disjoint_shares_of_the_single_process_batch(train_data):
    from instance_saliency.training import _draw_patches, _to_item, augmentations

    subs = cli._load_manifest_subjects(str(train_data / "train.csv"))
    items = [_to_item(s, ModelConfig("unet3d")) for s in subs]
    xf = augmentations((16, 16, 16), 1, "v2")
    for step in (1, 7):
        x, y = _draw_patches(items, xf, 0, step, range(4))
        parts = [_draw_patches(items, xf, 0, step, range(k, k + 2)) for k in (0, 2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(x[0], x[1]) and x.shape == (4, 2, 16, 16, 16)


def test_ddp_training_equals_one_process_with_the_global_batch(train_data, ddp_runs, tmp_path):
    from instance_saliency.training import train

    subs = cli._load_manifest_subjects(str(train_data / "train.csv"))
    val = cli._load_manifest_subjects(str(train_data / "val.csv"))
    kw = dict(RUNS["plain"])
    kw.pop("validate")
    one = train(subs, val, tmp_path / "one", progress=False, **kw)
    two = ddp_runs / "plain"
    for sub in ("", "last"):
        wa, wb = _weights(tmp_path / "one" / sub), _weights(two / sub)
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-5, atol=1e-7,
                                       err_msg=k)
        # and the weights moved: the comparison is not between two initialisations
    init = models.build_model("unet3d", **kw["arguments"]).state_dict()
    assert any(not torch.allclose(wa[k], init[k]) for k in wa)
    ha = json.loads((tmp_path / "one" / "history.json").read_text())
    hb = json.loads((two / "history.json").read_text())
    assert [h["step"] for h in hb] == [2, 4]
    np.testing.assert_allclose([h["loss"] for h in hb], [h["loss"] for h in ha], rtol=1e-5)
    np.testing.assert_allclose([h["val_ndsc"] for h in hb], [h["val_ndsc"] for h in ha],
                               atol=1e-6)
    cfg = json.loads((two / "config.json").read_text())["training"]
    assert (cfg["processes"], cfg["batch_size"], cfg["batch_per_process"]) == (2, 2, 1)
    assert cfg["lr"] == one["lr"] == 1e-3 and "not scaled" in cfg["lr_rule"]
    assert cfg["batch_norm"] == "none"
    assert one["processes"] == 1 and one["batch_per_process"] == 2
    # rank 0 alone wrote the log: one set-up line, two validation lines
    lines = (two / "train.log").read_text().splitlines()
    assert sum('"processes": 2' in ln for ln in lines) == 1
    assert sum('"val_ndsc"' in ln for ln in lines) == 2
    assert not (two / "train_state.pt").exists()


def test_train_cli_resumes_under_torchrun(train_data, ddp_runs, tmp_path):
    """``torchrun ... -m instance_saliency train --resume`` continues a two-process run that
    stopped after step 2 and ends with the weights of the uninterrupted run, bit for bit."""
    out = tmp_path / "cli"
    shutil.copytree(ddp_runs / "bn_stopped", out)
    assert (out / "train_state.pt").is_file() and not (out / "model.safetensors").exists()
    r = launch(["-m", "instance_saliency", "train", "--manifest", str(train_data / "train.csv"),
                "--channels", "4,8", "--roi", "16", "--steps", "4", "--batch-size", "2",
                "--val-every", "2", "--warmup", "1", "--checkpoint-every", "1",
                "--out", str(out), "--resume"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    # rank 0 alone prints
    assert log.count("training on 2 processes (cpu): global batch 2 = 1 patch(es) per process "
                     "x 2; learning rate 0.001 for the global batch (not scaled); batch norm: "
                     "per process") == 1
    assert log.count("trained 4 steps (EMA weights)") == 1
    for sub in ("", "last"):
        wa, wb = _weights(ddp_runs / "bn" / sub), _weights(out / sub)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    cfg = json.loads((out / "config.json").read_text())["training"]
    assert cfg["processes"] == 2 and cfg["batch_norm"].startswith("per process")
    # each sitting is recorded, not only the last one
    assert [(t["from_step"], t["processes"], t["batch_per_process"], t["device"])
            for t in cfg["sittings"]] == [(1, 2, 1, "cpu"), (3, 2, 1, "cpu")]
    assert cfg["command"].startswith("instance-saliency train --manifest")
    lines = (out / "train.log").read_text().splitlines()
    assert sum('"resumed_at_step": 2' in ln for ln in lines) == 1
    assert sum('"processes": 2' in ln for ln in lines) == 2  # one per sitting, rank 0's
    assert not (out / "train_state.pt").exists()


def test_commands_that_do_not_split_their_work_are_refused_under_torchrun(monkeypatch, capsys,
                                                                          tmp_path):
    """``explain`` (or any command but cohort and train) under torchrun used to run whole on
    every rank, the copies racing for one output folder: now one line, exit 2, nothing
    written."""
    from instance_saliency import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for argv in (["explain", "--flair", "f.nii.gz", "--mprage", "t.nii.gz", "--out",
                  str(tmp_path / "e")], ["analyze", str(tmp_path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"instance-saliency: error: [rank 1 of 2] '{argv[0]}' runs one job and "
                       "does not split it among torchrun's 2 processes (each would do all of "
                       "it); run it without torchrun, or use cohort for many scans"]
    assert not (tmp_path / "e").exists()
