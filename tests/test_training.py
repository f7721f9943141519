"""Training: a resumed run equals the uninterrupted one; schedule and recipes."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from instance_saliency.errors import InputError
from instance_saliency.io import Subject
from instance_saliency.training import augmentations, lr_at, train


def _subject(seed: int) -> Subject:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 1, (2, 24, 20, 22)).astype(np.float32) + 3
    mask = np.zeros((24, 20, 22), np.uint8)
    mask[8:12, 6:10, 9:12] = 1
    img[0][mask > 0] += 2
    return Subject(img, np.eye(4), (1.0, 1.0, 1.0), nib.Nifti1Header(), mask)


KW = dict(arguments={"channels": [4, 8], "strides": [2]}, roi_size=(16, 16, 16), steps=6,
          val_every=3, progress=False, warmup=2, checkpoint_every=1)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("recipe", ["v2", "v2-carvemix"])
def test_resume_equals_uninterrupted_run(tmp_path, recipe):
    subs = [_subject(0), _subject(1)]
    val = [_subject(2)]
    a = train(subs, val, tmp_path / "a", recipe=recipe, **KW)
    assert a["recipe"] == recipe
    s = train(subs, val, tmp_path / "b", stop_after=4, recipe=recipe, **KW)
    assert s == {"stopped_at": 4}
    assert (tmp_path / "b" / "train_state.pt").is_file()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    b = train(subs, val, tmp_path / "b", resume=True, recipe=recipe, **KW)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit
    la, lb = _weights(tmp_path / "a" / "last"), _weights(tmp_path / "b" / "last")
    assert all(torch.equal(la[k], lb[k]) for k in la)
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert [h["val_ndsc"] for h in ha] == [h["val_ndsc"] for h in hb]
    assert a["weights"] == b["weights"] == "EMA"
    assert [t["from_step"] for t in a["sittings"]] == [1]
    assert [t["from_step"] for t in b["sittings"]] == [1, 5]  # stopped after step 4
    assert b["sittings"][1]["processes"] == 1
    assert not (tmp_path / "b" / "train_state.pt").exists()  # removed when finished
    assert (tmp_path / "b" / "history.png").stat().st_size > 0
    # EMA weights differ from the raw last-step weights
    assert any(not torch.equal(wa[k], la[k]) for k in wa if wa[k].is_floating_point())


def test_resume_without_state_is_refused(tmp_path):
    with pytest.raises(InputError, match="train_state.pt not found"):
        train([_subject(0)], [], tmp_path / "c", resume=True, **KW)


def test_resume_with_other_settings_is_refused(tmp_path):
    """Resuming with another learning rate, batch size or network is refused with one line
    naming what changed (the result would be neither run); a state written before the
    settings were stored is still checked against the network it holds."""
    subs = [_subject(0), _subject(1)]
    out = tmp_path / "r"
    assert train(subs, [], out, stop_after=2, **KW) == {"stopped_at": 2}
    with pytest.raises(InputError, match=r"started with batch_size 2, lr 0\.001; this command "
                                         r"gives batch_size 4, lr 0\.5"):
        train(subs, [], out, resume=True, batch_size=4, lr=0.5, **KW)
    with pytest.raises(InputError, match="n_train_subjects 2; this command gives "
                                         "n_train_subjects 1"):
        train(subs[:1], [], out, resume=True, **KW)
    with pytest.raises(InputError, match=r"train_subjects \['a', 'b'\]"):  # named vs named
        train(subs, [], out / "named", stop_after=1, trained_on=["a", "b"], **KW)
        train(subs, [], out / "named", resume=True, trained_on=["a", "c"], **KW)
    st = torch.load(out / "train_state.pt", weights_only=True)
    del st["settings"]  # as written by an earlier version
    torch.save(st, out / "train_state.pt")
    other = dict(KW, arguments={"channels": [4, 16], "strides": [2]})
    with pytest.raises(InputError, match="holds another network than --architecture unet3d"):
        train(subs, [], out, resume=True, **other)
    assert train(subs, [], out, resume=True, **KW)["steps"] == 6  # the same settings resume


def test_cli_refuses_to_restart_an_interrupted_training_silently(tmp_path, capsys):
    """Re-running ``train`` into a folder with an interrupted run (train_state.pt) without
    --resume used to start again from step 0 and delete the state: now refused, exit 2, the
    state untouched; --overwrite starts again on purpose."""
    from instance_saliency import cli

    for k in (0, 1):
        sub = _subject(k)
        nib.save(nib.Nifti1Image(sub.image[0], np.eye(4)), str(tmp_path / f"f{k}.nii.gz"))
        nib.save(nib.Nifti1Image(sub.image[1], np.eye(4)), str(tmp_path / f"t{k}.nii.gz"))
        nib.save(nib.Nifti1Image(sub.mask, np.eye(4)), str(tmp_path / f"m{k}.nii.gz"))
    (tmp_path / "man.csv").write_text("subject,flair,mprage,mask\n" + "".join(
        f"s{k},f{k}.nii.gz,t{k}.nii.gz,m{k}.nii.gz\n" for k in (0, 1)))
    argv = ["train", "--manifest", str(tmp_path / "man.csv"), "--out", str(tmp_path / "m"),
            "--roi", "16", "--channels", "4,8", "--steps", "4", "--val-every", "4",
            "--checkpoint-every", "1"]
    assert cli.main(argv + ["--stop-after", "2"]) == 0
    state = (tmp_path / "m" / "train_state.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"instance-saliency: error: output folder {tmp_path / 'm'} holds an "
                   f"interrupted training (train_state.pt); add --resume to continue it, or "
                   f"--overwrite to start again"]
    assert (tmp_path / "m" / "train_state.pt").read_bytes() == state
    assert cli.main(argv + ["--lr", "0.01", "--resume"]) == 2  # other settings: refused too
    assert "started with lr 0.001; this command gives lr 0.01" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(argv + ["--resume"]) == 2  # finished: said so, not "no interrupted run"
    assert capsys.readouterr().err.strip() == (
        f"instance-saliency: error: --resume: the training in {tmp_path / 'm'} has finished "
        f"(model.safetensors is written); nothing to resume")


def test_lr_schedule():
    assert lr_at(1, 100, 1e-3, warmup=10) == pytest.approx(1e-4)
    assert lr_at(10, 100, 1e-3, warmup=10) == pytest.approx(1e-3)
    assert lr_at(100, 100, 1e-3, warmup=10) == pytest.approx(2e-5)
    mid = lr_at(55, 100, 1e-3, warmup=10)
    assert mid == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5))


def test_recipes_keep_patch_shape_and_labels_binary():
    item = {"image": torch.from_numpy(_subject(0).image),
            "label": torch.from_numpy(_subject(0).mask[None].astype(np.float32))}
    flat = item["label"].reshape(-1) > 0
    item["fg_idx"], item["bg_idx"] = np.flatnonzero(flat), np.flatnonzero(~flat)
    for recipe in ("v1", "v2", "v3", "v2-carvemix"):
        xf = augmentations((16, 16, 16), 2, recipe)
        xf.set_random_state(seed=0)
        for _ in range(5):
            out = xf(item)
            assert len(out) == 2
            for o in out:
                assert tuple(o["image"].shape) == (2, 16, 16, 16)
                assert set(np.unique(np.asarray(o["label"]))) <= {0.0, 1.0}
    with pytest.raises(InputError, match="unknown training recipe"):
        augmentations((16, 16, 16), 2, "v9")


def test_histogram_normalisation_is_learnt_on_training_scans_and_used_at_inference(tmp_path):
    """``normalisation="histogram"``: the standard scale is the mean of the training scans'
    landmarks, stored in config.json, and the loaded model prepares inputs with it."""
    from instance_saliency.io import histogram_landmarks, standardise_histogram
    from instance_saliency.models import load_model

    subs = [_subject(0), _subject(1)]
    subs[1] = Subject(subs[1].image ** 1.5, subs[1].affine, subs[1].spacing, subs[1].header,
                      subs[1].mask)  # a second "site" with another contrast curve
    train(subs, [_subject(2)], tmp_path / "h", normalisation="histogram",
          **{**KW, "steps": 2, "val_every": 2})
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["normalisation"] == "histogram"
    expected = (histogram_landmarks(subs[0].image) + histogram_landmarks(subs[1].image)) / 2
    np.testing.assert_allclose(cfg["landmarks"], expected, atol=1e-6)
    m = load_model(tmp_path / "h")
    x = _subject(3).image
    np.testing.assert_allclose(m.prepare(x, (1, 1, 1)).x,
                               standardise_histogram(x, cfg["landmarks"]), atol=1e-5)
    # a config whose landmarks do not fit its channels is refused in one line
    cfg["landmarks"] = cfg["landmarks"][:1]
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    from instance_saliency.errors import ModelError

    with pytest.raises(ModelError, match="'landmarks' must be 2 increasing rows of 11"):
        load_model(tmp_path / "h")


def test_fine_tuning_starts_from_the_given_weights_and_keeps_their_scale(tmp_path):
    """``init_from``: a run of zero learning rate (EMA off) returns the starting weights
    exactly; the starting model's histogram standard and training subjects are kept and its
    provenance recorded; another network, normalisation or an ensemble is refused in one
    line."""
    import hashlib

    from instance_saliency.errors import InputError

    subs = [_subject(0), _subject(1)]
    hist = {**KW, "steps": 2, "val_every": 2, "normalisation": "histogram"}
    train(subs, [], tmp_path / "base", trained_on=["a", "b"], **hist)
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    other = [_subject(5)]  # another scan: its landmarks would give another standard
    out = train(other, [], tmp_path / "ft", trained_on=["C", "A"], init_from=tmp_path / "base",
                **{**hist, "lr": 1e-30, "ema_decay": 0.0})
    w0, w1 = _weights(tmp_path / "base"), _weights(tmp_path / "ft")
    float_keys = [k for k in w0 if w0[k].is_floating_point() and "running" not in k]
    assert float_keys and all(torch.equal(w0[k], w1[k]) for k in float_keys)
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["landmarks"] == base["landmarks"]
    assert cfg["trained_on"] == ["C", "A", "b"]  # names compared case-insensitively
    digest = hashlib.sha256((tmp_path / "base" / "model.safetensors").read_bytes()).hexdigest()
    assert out["init_from"] == {"folder": str((tmp_path / "base").resolve()), "sha256": digest,
                                "trained_on": ["a", "b"], "threshold": 0.5}
    with pytest.raises(InputError, match=r"holds unet3d \{'channels': \[4, 8\], 'strides': "
                                         r"\[2\]\}, not unet3d \{'channels': \[4, 16\]"):
        train(other, [], tmp_path / "x", init_from=tmp_path / "base",
              **{**hist, "arguments": {"channels": [4, 16], "strides": [2]}})
    with pytest.raises(InputError, match="trained with --normalisation histogram, not "
                                         "zscore_nonzero"):
        train(other, [], tmp_path / "y", init_from=tmp_path / "base",
              **{**hist, "normalisation": "zscore_nonzero"})
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "config.json").write_text(json.dumps({**base, "members": ["m0"]}))
    with pytest.raises(InputError, match="is an ensemble of 1 members; give one member's"):
        train(other, [], tmp_path / "z", init_from=tmp_path / "ens", **hist)


def test_cli_fine_tunes_with_the_starting_models_settings(tmp_path, capsys):
    """``train --init-from DIR`` without --channels / --normalisation takes the starting
    model's; the fine-tuned model differs from it and names it in config.json."""
    from instance_saliency import cli

    subs = [_subject(0), _subject(1)]
    train(subs, [], tmp_path / "base", **{**KW, "steps": 2, "val_every": 2,
                                           "normalisation": "histogram"})
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    base["threshold"] = 0.3  # as chosen for the shipped folds: kept by the fine-tuned model
    (tmp_path / "base" / "config.json").write_text(json.dumps(base))
    sub = _subject(4)
    nib.save(nib.Nifti1Image(sub.image[0], np.eye(4)), str(tmp_path / "f.nii.gz"))
    nib.save(nib.Nifti1Image(sub.image[1], np.eye(4)), str(tmp_path / "t.nii.gz"))
    nib.save(nib.Nifti1Image(sub.mask, np.eye(4)), str(tmp_path / "m.nii.gz"))
    (tmp_path / "man.csv").write_text("subject,flair,mprage,mask\ns4,f.nii.gz,t.nii.gz,"
                                      "m.nii.gz\n")
    assert cli.main(["train", "--manifest", str(tmp_path / "man.csv"), "--roi", "16",
                     "--steps", "2", "--val-every", "2", "--init-from", str(tmp_path / "base"),
                     "--out", str(tmp_path / "ft")]) == 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["arguments"] == {"channels": [4, 8], "strides": [2]}
    assert cfg["normalisation"] == "histogram"
    assert cfg["threshold"] == 0.3
    assert cfg["training"]["init_from"]["folder"] == str((tmp_path / "base").resolve())
    w0, w1 = _weights(tmp_path / "base"), _weights(tmp_path / "ft")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    # refusals name --init-from and leave nothing behind
    capsys.readouterr()
    for bad, msg in ((tmp_path / "nope", f"--init-from: model folder not found: "
                      f"{tmp_path / 'nope'}"),
                     (tmp_path, f"--init-from: model folder {tmp_path} has no config.json")):
        assert cli.main(["train", "--manifest", str(tmp_path / "man.csv"), "--roi", "16",
                         "--steps", "2", "--init-from", str(bad),
                         "--out", str(tmp_path / "refused")]) == 2
        assert capsys.readouterr().err.strip() == f"instance-saliency: error: {msg}"
        assert not (tmp_path / "refused").exists()
    assert cli.main(["train", "--manifest", str(tmp_path / "man.csv"), "--roi", "16",
                     "--steps", "2", "--channels", "4,16", "--init-from",
                     str(tmp_path / "base"), "--out", str(tmp_path / "refused")]) == 2
    assert "give the same --architecture and --channels" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def _item(seed: int, boxes):
    """A training item of :func:`_to_item` with lesions at ``boxes`` (one component each)."""
    from instance_saliency.models import ModelConfig
    from instance_saliency.training import _to_item

    s = _subject(seed)
    s.mask[:] = 0
    for b in boxes:
        s.mask[b] = 1
    return _to_item(s, ModelConfig("unet3d"), lesions=True)


def test_carvemix_pastes_donor_lesions_with_their_rim_and_nothing_else():
    from instance_saliency.training import carvemix

    target = _item(0, [np.s_[2:5, 2:5, 2:5]])
    donor = _item(1, [np.s_[8:11, 6:9, 9:12], np.s_[16:18, 12:15, 4:6]])
    assert len(donor["lesion_boxes"]) == 2
    before = target["image"].clone(), target["label"].clone()
    mixed = carvemix(target, donor, np.random.default_rng(3), max_lesions=2, margin=(2.0, 2.0))
    # the target item is untouched; the mix is a new item
    assert torch.equal(target["image"], before[0]) and torch.equal(target["label"], before[1])
    changed = (mixed["image"] != target["image"]).any(0) | (mixed["label"] != target["label"])[0]
    # every changed voxel carries the donor's image and label ...
    assert torch.equal(mixed["image"][:, changed], donor["image"][:, changed])
    assert torch.equal(mixed["label"][:, changed], donor["label"][:, changed])
    # ... and lies within 2 voxels (Euclidean) of a pasted donor lesion
    from scipy import ndimage

    lesions = donor["lesions"]
    pasted = np.isin(lesions, np.unique(lesions.reshape(-1)[mixed["fg_idx"]]))
    assert np.all(ndimage.distance_transform_edt(~pasted)[changed.numpy()] <= 2.0)
    # the pasted lesions are whole, and a lesion-centred crop lands on them only
    assert mixed["label"][0].numpy()[pasted].all()
    assert np.array_equal(np.sort(mixed["fg_idx"]), np.flatnonzero(pasted.reshape(-1)))
    assert mixed["label"][0, 2:5, 2:5, 2:5].all()  # the target's own lesion, far away, kept
    # the same generator state pastes the same
    again = carvemix(target, donor, np.random.default_rng(3), max_lesions=2, margin=(2.0, 2.0))
    assert torch.equal(again["image"], mixed["image"])
    # a donor without lesions changes nothing; scans on other grids are refused
    empty = _item(2, [])
    assert carvemix(target, empty, np.random.default_rng(0)) is target
    other = dict(donor, image=donor["image"][:, :-1])
    with pytest.raises(ValueError, match="do not share one grid"):
        carvemix(target, other, np.random.default_rng(0))


def test_carvemix_patches_split_over_ranks_and_leave_other_recipes_unchanged():
    from instance_saliency.training import CARVEMIX, _draw_patches

    items = [_item(0, [np.s_[2:5, 2:5, 2:5]]), _item(1, [np.s_[8:11, 6:9, 9:12]])]
    xf = augmentations((16, 16, 16), 1, "v2-carvemix")
    p = CARVEMIX["v2-carvemix"]
    for step in (1, 2, 3):
        x, y = _draw_patches(items, xf, 0, step, range(4), p)
        parts = [_draw_patches(items, xf, 0, step, range(k, k + 2), p) for k in (0, 2)]
        assert torch.equal(torch.cat([q[0] for q in parts]), x)
        assert torch.equal(torch.cat([q[1] for q in parts]), y)
    # with carvemix_p = 0 the patches are those of the v2 recipe
    v2 = augmentations((16, 16, 16), 1, "v2")
    a = _draw_patches(items, v2, 0, 5, range(2))
    b = _draw_patches(items, xf, 0, 5, range(2), 0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # with p = 1 some patch differs from the unmixed draw (lesions of the other scan in it)
    mixed = [_draw_patches(items, xf, 0, s, range(2), 1.0) for s in range(1, 5)]
    plain = [_draw_patches(items, xf, 0, s, range(2), 0.0) for s in range(1, 5)]
    assert any(not torch.equal(m[1], q[1]) for m, q in zip(mixed, plain))
