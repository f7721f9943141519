"""nnU-Net v2 trained-model folders: prediction as nnU-Net's own predictor makes it, exact
instance gradients through nnU-Net's windows / Gaussian / mirroring / folds, maps on the user's
grid, safe loading, and every bad input for this path.

The folders under ``tests/data/nnunet/`` are real nnU-Net v2 results folders, built by nnU-Net's
own planning, preprocessing and trainer (``tests/fixtures/make_nnunet_fixtures.py``; see
``tests/data/nnunet/README.md``).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from _helpers import DATA, needs_data

nnunetv2 = pytest.importorskip("nnunetv2", reason="the nnunet extra is not installed")

from instance_saliency import datasets  # noqa: E402
from instance_saliency.errors import InputError, ModelError  # noqa: E402
from instance_saliency.inference import sliding_window_logits  # noqa: E402
from instance_saliency.models import load_model  # noqa: E402
from instance_saliency.models.nnunet import load_checkpoint_safely  # noqa: E402
from instance_saliency.saliency import gradcampp, smoothgrad  # noqa: E402
from instance_saliency.targets import InstanceTarget  # noqa: E402

FIXTURES = Path(__file__).parent / "data" / "nnunet"


def _folder(dataset: str) -> Path:
    found = sorted((FIXTURES).glob(f"{dataset}*/*__*__3d_fullres"))
    assert found, f"no nnU-Net fixture for {dataset} in {FIXTURES}"
    return found[0]


FT1 = _folder("Dataset501")  # FLAIR + T1, folds 0 and 1
FLAIR_ONLY = _folder("Dataset502")  # FLAIR, fold 0


# --------------------------------------------------------------------------------------------
# helpers


def _predictor(model_dir: Path, folds, mirroring: bool):
    """nnU-Net's own predictor on the same folder (manual initialisation: the fixture's trainer
    class is defined only in the generator script, as with many in-house results folders)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dj = json.loads((model_dir / "dataset.json").read_text())
    pm = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    cks = [load_checkpoint_safely(model_dir / f"fold_{f}" / "checkpoint_final.pth")
           for f in folds]
    cm = pm.get_configuration(cks[0]["init_args"]["configuration"])
    m = load_model(model_dir, folds=list(folds), mirroring=mirroring)
    net = m.networks[0]
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                        perform_everything_on_device=False, device=torch.device("cpu"),
                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    p.manual_initialization(net, pm, cm, [c["network_weights"] for c in cks], dj,
                            cks[0]["trainer_name"], cks[0]["inference_allowed_mirroring_axes"])
    return p


def _ours(model, image_xyz: np.ndarray, spacing):
    prep = model.prepare(image_xyz, spacing)
    with torch.no_grad():
        logits = sliding_window_logits(model.network, torch.from_numpy(prep.x)[None],
                                       model.grid(prep.x.shape[1:]))
    return prep, logits[0].numpy(), prep.probabilities(logits[0].numpy())


def _theirs(predictor, image_xyz: np.ndarray, spacing):
    img = np.ascontiguousarray(image_xyz.transpose(0, 3, 2, 1))  # SimpleITK order (z, y, x)
    seg, probs = predictor.predict_single_npy_array(img, {"spacing": list(spacing)[::-1]},
                                                    None, None, True)
    return seg.transpose(2, 1, 0), probs.transpose(0, 3, 2, 1)


@pytest.fixture(scope="module")
def scan():
    """A crop of real patient07 (FLAIR, T1, mask): non-cubic, 489 lesion voxels; 2 nnU-Net
    windows per axis of the fixture's 48 x 64 x 56 patch (kept small: with 2 folds x 8
    mirrorings every window runs 16 times)."""
    if DATA is None:
        pytest.skip("real scans not found")
    p = datasets.fetch_subject("patient07", DATA)
    f = nib.load(p["flair"]).get_fdata(dtype=np.float32)
    t = nib.load(p["mprage"]).get_fdata(dtype=np.float32)
    m = np.asarray(nib.load(p["mask"]).dataobj) > 0
    box = (slice(60, 124), slice(85, 165), slice(70, 142))  # 64 x 80 x 72, periventricular
    return np.stack([f[box], t[box]]), m[box]


# --------------------------------------------------------------------------------------------
# loading


def test_folder_is_detected_and_described():
    with pytest.warns(UserWarning, match="not installed"):
        m = load_model(FT1)
    assert m.kind == "nnunet"
    assert m.channels == ["FLAIR", "T1"]
    assert m.class_names[m.lesion_class] == "lesion"
    assert m.info["folds"] == ["0", "1"]
    assert m.decision == "argmax"
    assert any("not installed" in w for w in m.warnings)
    axes = m.info["mirror_axes"]
    assert len(m.members) == 2 * 2 ** len(axes)
    assert m.cam_layer is not None and m.cam_layer.startswith("decoder.stages.")
    one = load_model(FT1, folds=[1], mirroring=False)
    assert len(one.members) == 1 and one.info["folds"] == ["1"]
    fo = load_model(FLAIR_ONLY)
    assert fo.channels == ["FLAIR"]


def test_checkpoint_loads_without_unpickling_code():
    ck = load_checkpoint_safely(FT1 / "fold_0" / "checkpoint_final.pth")
    assert {"network_weights", "init_args", "trainer_name"} <= set(ck)


def test_malicious_checkpoint_is_refused(tmp_path):
    import pickle

    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {target}",))

    bad = tmp_path / "model"
    shutil.copytree(FT1, bad)
    ck = bad / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "evil": Evil()}, ck, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ModelError, match="refused"):
        load_model(bad, folds=[0])
    assert not target.exists()


# --------------------------------------------------------------------------------------------
# prediction agrees with nnU-Net's predictor


def _fp16_like_nnunet(model, x: torch.Tensor, grid) -> torch.Tensor:
    """nnU-Net 2.x's CPU accumulation, reproduced: per fold, window outputs (float32, averaged
    over the mirrorings) times a float16 Gaussian, summed into float16 logits and a float16
    normaliser and divided in float16; folds then summed and divided in float16
    (nnUNetPredictor.predict_logits_from_preprocessed_data and
    _internal_predict_sliding_window_return_logits)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    g16 = compute_gaussian(tuple(grid.roi_size), 1 / 8, 10, dtype=torch.float16, device="cpu")
    xp = grid.pad(x[None])
    folds: dict = {}
    for m in model.members:
        folds.setdefault(id(m.net), []).append(m)
    total = None
    with torch.no_grad():
        for members in folds.values():
            acc = n = None
            for w in range(grid.n_windows):
                sl = grid.window_slices(w)
                xw = xp[(slice(None), slice(None)) + sl]
                pred = sum(mm.module(xw)[0] for mm in members) / len(members)
                if acc is None:
                    acc = torch.zeros((pred.shape[0],) + grid.padded_shape, dtype=torch.half)
                    n = torch.zeros(grid.padded_shape, dtype=torch.half)
                pred *= g16
                acc[(slice(None),) + sl] += pred
                n[sl] += g16
            torch.div(acc, n, out=acc)
            acc = grid.crop(acc)
            total = acc if total is None else total + acc
    if len(folds) > 1:
        total /= len(folds)
    return total.float()


def _agree(model_dir, folds, mirroring, image, spacing):
    """Our float32 prediction against nnU-Net's predictor. The only difference is nnU-Net's
    float16 accumulation: reproducing it gives nnU-Net's probabilities to 1e-5; in float32 the
    difference is measured and bounded (it is largest at the corners of the padded image, where
    one window covers a voxel with a Gaussian weight near float16's smallest numbers)."""
    model = load_model(model_dir, folds=list(folds), mirroring=mirroring)
    pred = _predictor(model_dir, folds, mirroring)
    prep, _, probs = _ours(model, image, spacing)
    seg_t, probs_t = _theirs(pred, image, spacing)
    assert probs.shape == probs_t.shape == (len(model.class_names),) + image.shape[1:]
    x = torch.from_numpy(prep.x)
    emu = prep.probabilities(_fp16_like_nnunet(model, x, model.grid(x.shape[1:])).numpy())
    # same computation, same numbers (the cubic resampling of the input adds ~1e-4 when the
    # spacing differs)
    assert np.abs(emu - probs_t).max() <= (1e-5 if prep.exact else 5e-4)
    d = np.abs(probs - probs_t)[model.lesion_class]
    # measured on these crops: max 0.17-0.18 where the blended Gaussian weight is < 1e-3 of its
    # peak (image borders, covered by one window's tail, where float16 keeps few digits);
    # <= 5.4e-4 everywhere else; mean 3-4e-5
    grid = model.grid(prep.x.shape[1:])
    norm = grid.crop(grid.norm).numpy()
    rel = prep.to_user(norm[None])[0] / norm.max()
    assert d[rel > 1e-3].max() < 1e-3, d[rel > 1e-3].max()
    assert d.mean() < 1e-4, d.mean()
    ours_mask = model.segment(probs)
    theirs_mask = seg_t == model.lesion_class
    differ = ours_mask != theirs_mask
    # masks differ only where the probability lies within the measured difference of 0.5
    assert not (differ & (np.abs(probs[model.lesion_class] - 0.5) > d)).any()
    assert differ.mean() < 1e-3
    return prep, probs, float(d.max()), int(differ.sum())


@needs_data
@pytest.mark.parametrize("folds,mirroring", [((0,), False), ((0, 1), False)])
def test_prediction_equals_nnunet_predictor_1mm(scan, folds, mirroring):
    """Fold averaging here; mirroring against the predictor in the resampled test below; both
    together (2 folds x 8 mirrorings, the suite's slowest case, dropped for CI time) through
    the exact-gradient test, whose reference is nnU-Net's own windows, Gaussian, mirroring and
    fold averaging."""
    image, _ = scan
    prep, probs, diff, n = _agree(FT1, folds, mirroring, image, (1.0, 1.0, 1.0))
    assert prep.exact and not prep.mapping["resampled"]
    assert probs[1].max() > 0.5  # the tiny model finds lesion voxels in this crop


@needs_data
def test_prediction_equals_nnunet_predictor_resampled(scan):
    """Spacing (1.2, 1.0, 0.8) mm differs from the plans' 1 mm on two axes: nnU-Net's
    resampling is exercised (in and out), and the anisotropic, non-cubic input catches a
    swapped axis."""
    image, _ = scan
    prep, probs, diff, n = _agree(FT1, (0,), True, image, (1.2, 1.0, 0.8))
    assert not prep.exact and prep.mapping["resampled"]
    assert "resampled back" in prep.mapping["maps_back"]


@needs_data
def test_flair_only_prediction_equals_predictor(scan):
    image, _ = scan
    _agree(FLAIR_ONLY, (0,), True, image[:1], (1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# exact instance gradients


def _reference_logits(nets, axes, x, cm_patch, step):
    """Float32 sliding-window logits from nnU-Net's own window positions and Gaussian, its
    mirroring and fold averaging, differentiable in ``x`` (1, C, *shape)."""
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian, compute_steps_for_sliding_window)

    shape = tuple(x.shape[2:])
    padded = tuple(max(p, s) for p, s in zip(cm_patch, shape))
    lo = [(p - s) // 2 for p, s in zip(padded, shape)]
    pads = []
    for p, s, b in reversed(list(zip(padded, shape, lo))):
        pads += [b, p - s - b]
    xp = torch.nn.functional.pad(x, pads)
    g = compute_gaussian(tuple(cm_patch), 1 / 8, 10, dtype=torch.float32, device="cpu")
    steps = compute_steps_for_sliding_window(padded, tuple(cm_patch), step)
    combos = [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    acc = torch.zeros((1, 2) + padded)
    n = torch.zeros(padded)
    for st in itertools.product(*steps):
        sl = tuple(slice(a, a + p) for a, p in zip(st, cm_patch))
        xw = xp[(slice(None), slice(None)) + sl]
        fold_outs = []
        for net in nets:
            outs = []
            for c in combos:
                d = [a + 2 for a in c]
                outs.append(torch.flip(net(torch.flip(xw, d)), d) if c else net(xw))
            fold_outs.append(torch.stack(outs).mean(0))
        acc[(slice(None), slice(None)) + sl] = acc[(slice(None), slice(None)) + sl] \
            + torch.stack(fold_outs).mean(0) * g
        n[sl] += g
    out = acc / n
    return out[(slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(lo, shape))]


@needs_data
def test_exact_gradient_with_mirroring_and_two_folds(scan):
    image, _ = scan
    model = load_model(FT1, folds=[0, 1], mirroring=True)
    # a small non-cubic region keeps the reference (full autograd graph) cheap
    sub = image[:, 10:80, 15:90, 8:70]
    prep = model.prepare(sub, (1.0, 1.0, 1.0))
    x = torch.from_numpy(prep.x)
    grid = model.grid(x.shape[1:])
    starts = grid.starts - np.array(grid.pad_before)
    # instances on window borders: each straddles the start of a second window
    shape = x.shape[1:]
    masks = []
    for k in (1, len(starts) // 2):
        c = [int(min(max(starts[k][a], 3), shape[a] - 4)) for a in range(3)]
        m = np.zeros(shape, bool)
        m[c[0] - 2:c[0] + 2, c[1] - 1:c[1] + 3, c[2] - 2:c[2] + 1] = True
        masks.append(m)
    targets = [InstanceTarget(m, model.lesion_class) for m in masks]
    res = smoothgrad(model, x, targets, grid=grid, n_samples=1, noise_level=0.0)
    nets = model.networks
    axes = list(model.info["mirror_axes"])
    assert axes and len(nets) == 2
    xr = x[None].clone().requires_grad_(True)
    logits = _reference_logits(nets, axes, xr, list(model.roi_size), 0.5)  # one graph
    for k, (t, r) in enumerate(zip(targets, res)):
        assert r.n_windows >= 2
        score = logits[0, model.lesion_class][torch.from_numpy(t.mask)].sum()
        (g,) = torch.autograd.grad(score, xr, retain_graph=k < len(targets) - 1)
        ours = torch.from_numpy(r.maps["mean"].to_dense())
        rel = float((ours - g[0]).abs().max() / g[0].abs().max())
        assert rel <= 1e-5, rel


@needs_data
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.2, 1.0, 0.8)])
def test_maps_land_on_the_user_grid_in_its_axis_order(scan, spacing):
    """On the non-cubic crop, at the plans' spacing (exact re-indexing) and at an anisotropic
    spacing (resampled both ways): an instance mask goes to the network grid and back to the
    same voxels, and the instance's own SmoothGrad map, brought back to the user grid, peaks at
    the instance (not at a transposed or mirrored place)."""
    image, _ = scan
    model = load_model(FT1, folds=[0], mirroring=False)
    prep = model.prepare(image, spacing)
    m = np.zeros(image.shape[1:], bool)
    m[40:44, 52:55, 20:26] = True  # asymmetric box: a swap or flip moves it
    net = prep.to_net(m)
    if prep.exact:
        assert net.sum() == m.sum()
    back = prep.to_user(net[None].astype(np.float32))[0] > 0.5
    assert (back & m).sum() >= 0.7 * m.sum() and (back & ~m).sum() <= 0.3 * m.sum()
    if prep.exact:
        assert np.array_equal(back, m)
    (r,) = smoothgrad(model, torch.from_numpy(prep.x), [InstanceTarget(net, model.lesion_class)],
                      grid=model.grid(prep.x.shape[1:]), n_samples=1, noise_level=0.0)
    user = prep.to_user(r.maps["mean"].to_dense())
    assert user.shape == (2,) + image.shape[1:]
    peak = np.unravel_index(np.abs(user[0]).argmax(), m.shape)
    dist = np.abs(np.argwhere(m) - np.array(peak)).sum(1).min()
    assert dist <= 3, (peak, dist)


@needs_data
def test_gradcampp_runs_on_every_member(scan):
    image, _ = scan
    model = load_model(FT1, folds=[0, 1], mirroring=True)
    prep = model.prepare(image, (1.0, 1.0, 1.0))
    m = np.zeros(prep.x.shape[1:], bool)
    m[40:44, 50:53, 38:41] = True
    (r,) = gradcampp(model, torch.from_numpy(prep.x), [InstanceTarget(m, model.lesion_class)],
                     model.cam_layer, grid=model.grid(prep.x.shape[1:]))
    d = r.maps["raw"].to_dense()
    assert d.shape == (1,) + prep.x.shape[1:] and np.isfinite(d).all() and d.max() > 0


# --------------------------------------------------------------------------------------------
# bad input on this path: one line, exit status 2, nothing written


def _nifti(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    nib.save(nib.Nifti1Image(rng.normal(5, 1, (20, 22, 18)).astype(np.float32), np.eye(4)),
             str(path))
    return path


def _copy(tmp_path: Path, src: Path = FT1) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _bad_ckpt_truncated(folder):
    p = folder / "fold_0" / "checkpoint_final.pth"
    p.write_bytes(p.read_bytes()[:1000])


def _bad_ckpt_evil(folder):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {folder / 'pwned'}",))

    torch.save({"network_weights": Evil()}, folder / "fold_0" / "checkpoint_final.pth")


BAD_FOLDERS = {
    "no_plans": (lambda d: (d / "plans.json").unlink(), {},
                 r"nnU-Net model folder \S+ has dataset.json, fold_0/, fold_1/ but no plans.json"),
    "no_dataset_json": (lambda d: (d / "dataset.json").unlink(), {},
                        r"nnU-Net model folder \S+ has plans.json, fold_0/, fold_1/ but no "
                        r"dataset.json$"),
    "plans_not_json": (lambda d: (d / "plans.json").write_text("{oops"), {},
                       r"plans.json is not valid JSON"),
    "fold_missing": (None, {"folds": ["3"]},
                     r"fold\(s\) 3 of .* have no checkpoint_final.pth \(folds present: 0, 1\)"),
    "no_fold_at_all": (lambda d: [shutil.rmtree(f) for f in d.glob("fold_*")], {},
                       r"has no fold_\*/checkpoint_final.pth"),
    "best_checkpoint_missing": (None, {"checkpoint": "checkpoint_best.pth"},
                                r"has no fold_\*/checkpoint_best.pth"),
    "corrupt_checkpoint": (_bad_ckpt_truncated, {"folds": ["0"]},
                           r"checkpoint_final.pth is truncated or damaged \(an incomplete "
                           r"PyTorch checkpoint\); copy or download it again$"),
    "malicious_checkpoint": (_bad_ckpt_evil, {"folds": ["0"]}, r"refused: the checkpoint needs "
                             r"code or types outside the allow-list"),
    "channel_count_mismatch": (lambda d: _edit_json(d / "dataset.json",
                                                    channel_names={"0": "FLAIR"}),
                               {"images": {"FLAIR": 0}},
                               r"does not fit the network built from plans.json: "
                               r"\S+ has shape \(\d+, 2, 3, 3, 3\) in the file, "
                               r"\(\d+, 1, 3, 3, 3\) in the network"),
    "region_labels": (lambda d: _edit_json(d / "dataset.json",
                                           labels={"background": 0, "lesion": [1, 2]}), {},
                      r"region-based labels .* are not supported"),
    "two_foreground_labels": (lambda d: _edit_json(d / "dataset.json", labels={
        "background": 0, "lesion": 1, "other": 2}), {},
        r"has 2 foreground labels \(background=0, lesion=1, other=2\); choose the lesion class"),
    "unknown_lesion_label": (None, {"lesion_label": "tumour"},
                             r"--lesion-label 'tumour': no such foreground label"),
    "unknown_channel": (None, {"images": {"FLAIR": 0, "T2": 1}},
                        r"has no input channel 'T2'; its channels are: FLAIR, T1"),
    "missing_channel": (None, {"images": {"FLAIR": 0}},
                        r"needs the channel\(s\) T1; its channels are: FLAIR, T1"),
    "bad_step_size": (None, {"step_size": "1.5"}, r"--step-size must lie in \(0, 1\]"),
}


def _argv(command, folder, imgs, out, opts):
    images = opts.get("images", {"FLAIR": 0, "T1": 1})
    argv = [command, "--model", str(folder), "--out", str(out)]
    for name, k in images.items():
        argv += ["--image", f"{name}={imgs[k]}"]
    for key, flag in (("folds", "--folds"), ("checkpoint", "--checkpoint"),
                      ("lesion_label", "--lesion-label"), ("step_size", "--step-size")):
        if key in opts:
            v = opts[key]
            argv += [flag] + (list(v) if isinstance(v, list) else [v])
    if command == "explain":
        argv += ["--quiet", "--n-samples", "1"]
    return argv


@pytest.mark.parametrize("command", ["explain", "predict"])
@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_nnunet_input(tmp_path, capsys, case, command):
    from instance_saliency.cli import main

    edit, opts, pattern = BAD_FOLDERS[case]
    folder = _copy(tmp_path)
    if edit is not None:
        edit(folder)
    imgs = [_nifti(tmp_path / "f.nii.gz", 0), _nifti(tmp_path / "t.nii.gz", 1)]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = main(_argv(command, folder, imgs, out, opts))
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if not e.startswith("instance-saliency: warning:")]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("instance-saliency: error: "), err
    import re

    assert re.search(pattern, err[0]), err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert not (folder / "pwned").exists()  # nothing was unpickled


def test_without_nnunetv2_the_error_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ImportError
    with pytest.raises(ModelError, match=r"install the extra: pip install "
                                         r"'instance-saliency\[nnunet\]'"):
        load_model(FT1)


def test_core_package_does_not_import_nnunetv2():
    import subprocess
    import sys

    code = ("import sys, instance_saliency.models, instance_saliency.explain, "
            "instance_saliency.cli; m = instance_saliency.models.load_model(); "
            "print('nnunetv2' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_nnunet_options_refused_for_our_checkpoints():
    with pytest.raises(InputError, match="apply to nnU-Net model folders only"):
        load_model(None, folds=[0])


# --------------------------------------------------------------------------------------------
# end to end on a full-size real scan


@needs_data
@pytest.mark.parametrize("folder,channels", [(FT1, ("FLAIR", "T1")), (FLAIR_ONLY, ("FLAIR",))])
def test_explain_full_size_scan_end_to_end(tmp_path, capsys, folder, channels):
    """``explain --model NNUNET_FOLDER`` on full-size patient07 (182 x 218 x 182): every output
    on the input grid and affine, columns per the model's channels. Only the largest predicted
    lesions (--min-size) and one noise sample keep it short; fold 0, no mirroring."""
    from instance_saliency.cli import main

    p = datasets.fetch_subject("patient07", DATA)
    files = {"FLAIR": p["flair"], "T1": p["mprage"]}
    out = tmp_path / "out"
    argv = ["explain", "--model", str(folder), "--folds", "0", "--no-mirroring",
            "--n-samples", "1", "--min-size", "3000", "--min-size-unit", "mm3", "--no-figures",
            "--quiet", "--maps", "full", "--out", str(out)]
    for c in channels:
        argv += ["--image", f"{c}={files[c]}"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "instance-saliency: warning: trainer class 'nnUNetTrainer_ISFixture'" in err
    ref = nib.load(p["flair"])
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["kind"] == "nnunet" and run["model"]["channels"] == list(channels)
    assert run["grids"]["exact"] is True and run["summary"]["threshold"] == "argmax"
    assert run["model"]["warnings"]
    for name in ("prediction_prob", "prediction_mask", "instances"):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    import pandas as pd

    table = pd.read_csv(out / "instances.csv")
    assert len(table) >= 1 and (table["status"] == "unknown").all()
    lab = np.asarray(nib.load(out / "instances.nii.gz").dataobj)
    for c in channels:
        col = f"smoothgrad_{c.lower()}_sum_abs"
        assert (table[col] > 0).all()
    assert ("smoothgrad_flair_share" in table) == (len(channels) > 1)
    for _, r in table.iterrows():
        sg = nib.load(out / "saliency" / "smoothgrad" / f"lesion_{int(r['label']):03d}.nii.gz")
        assert sg.shape == ref.shape + ((len(channels),) if len(channels) > 1 else ())
        assert np.allclose(sg.affine, ref.affine)
        data = np.asarray(sg.dataobj)
        flair = data[..., 0] if data.ndim == 4 else data
        m = lab == int(r["label"])
        assert m.sum() == r["voxels"]
        # the map is there, around this lesion (a transposed map would miss it)
        assert np.abs(flair[m]).sum() > 0
        cam = nib.load(out / "saliency" / "gradcampp" / f"lesion_{int(r['label']):03d}.nii.gz")
        assert cam.shape == ref.shape


# --------------------------------------------------------------------------------------------
# any channels: a FLAIR-only nnU-Net cohort, a three-channel torch module


def _crop_to(path: Path, dst: Path, box) -> Path:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)[box]
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ np.array([b.start for b in box]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, aff), str(dst))
    return dst


@needs_data
def test_cohort_with_a_flair_only_nnunet_model(tmp_path, capsys):
    """An nnU-Net raw layout with one channel (``_0000`` = FLAIR) and the FLAIR-only model:
    every subject explained, the cohort statistics run (no FLAIR/MPRAGE comparison)."""
    from instance_saliency.cli import main

    box = (slice(60, 124), slice(85, 165), slice(70, 142))
    root = tmp_path / "raw"
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    for s in ("patient07", "patient19"):
        p = datasets.fetch_subject(s, DATA)
        _crop_to(p["flair"], root / "imagesTs" / f"{s}_0000.nii.gz", box)
        _crop_to(p["mask"], root / "labelsTs" / f"{s}.nii.gz", box)
    out = tmp_path / "cohort"
    rc = main(["cohort", "--data", str(root), "--out", str(out), "--model", str(FLAIR_ONLY),
               "--no-mirroring", "--n-samples", "1", "--min-size", "200", "--min-size-unit",
               "mm3", "--no-figures", "--quiet", "--n-boot", "20", "--methods", "smoothgrad"])
    assert rc == 0, capsys.readouterr().err
    import pandas as pd

    for s in ("patient07", "patient19"):
        run = json.loads((out / "subjects" / s / "run.json").read_text())
        assert run["model"]["channels"] == ["FLAIR"]
        t = pd.read_csv(out / "subjects" / s / "instances.csv")
        assert "smoothgrad_flair_mean_in" in t and "smoothgrad_flair_share" not in t
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_subjects"] == 2
    assert stats["flair_vs_mprage"]["available"] is False


def test_three_channel_module_end_to_end(tmp_path):
    """Any torch module with three named channels: explain matches the images by name, writes
    one column group per channel and the first channel's share."""
    import pandas as pd

    from instance_saliency.explain import ExplainConfig, explain
    from instance_saliency.models import from_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        for p_ in net.parameters():
            p_.zero_()
        net[0].weight[0, 0, 1, 1, 1] = 1.0
        net[0].weight[0, 2, 1, 1, 1] = 0.5
        net[2].weight[1, 0] = 6.0
        net[2].bias[1] = -9.0
    model = from_module(net, channels=["FLAIR", "T1", "T2"], roi_size=(16, 16, 16),
                        cam_layer="0")
    rng = np.random.default_rng(0)
    shape = (24, 26, 22)
    imgs = {}
    for k, name in enumerate(("flair", "t1w", "T2")):
        a = rng.normal(10, 1, shape).astype(np.float32)
        if k == 0:
            a[8:12, 9:13, 7:10] += 8
        imgs[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(a, np.diag([1.0, 1.2, 0.9, 1.0])), str(imgs[name]))
    out = tmp_path / "out"
    explain(None, None, out, images=imgs, model=model,
            config=ExplainConfig(n_samples=1, figures=False, maps="full"), progress=False,
            log=lambda m: None)
    t = pd.read_csv(out / "instances_full.csv")  # full precision: the share is recomputed
    assert len(t) >= 1
    for ch in ("flair", "t1", "t2"):
        assert f"smoothgrad_{ch}_sum_abs" in t
    assert "smoothgrad_flair_share" in t
    share = t["smoothgrad_flair_share"].iloc[0]
    total = sum(t[f"smoothgrad_{c}_sum_abs"].iloc[0] for c in ("flair", "t1", "t2"))
    assert share == pytest.approx(t["smoothgrad_flair_sum_abs"].iloc[0] / total)
    sg = nib.load(out / "saliency" / "smoothgrad" / "lesion_001.nii.gz")
    assert sg.shape == shape + (3,)
    # T1 does not enter the lesion logit: its map is zero
    assert np.abs(np.asarray(sg.dataobj)[..., 1]).max() == 0
