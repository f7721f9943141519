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


def test_resume_equals_uninterrupted_run(tmp_path):
    subs = [_subject(0), _subject(1)]
    val = [_subject(2)]
    a = train(subs, val, tmp_path / "a", **KW)
    s = train(subs, val, tmp_path / "b", stop_after=4, **KW)
    assert s == {"stopped_at": 4}
    assert (tmp_path / "b" / "train_state.pt").is_file()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    b = train(subs, val, tmp_path / "b", resume=True, **KW)
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
    assert not (tmp_path / "b" / "train_state.pt").exists()  # removed when finished
    assert (tmp_path / "b" / "history.png").stat().st_size > 0
    # EMA weights differ from the raw last-step weights
    assert any(not torch.equal(wa[k], la[k]) for k in wa if wa[k].is_floating_point())


def test_resume_without_state_is_refused(tmp_path):
    with pytest.raises(InputError, match="train_state.pt not found"):
        train([_subject(0)], [], tmp_path / "c", resume=True, **KW)


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
    for recipe in ("v1", "v2", "v3"):
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
