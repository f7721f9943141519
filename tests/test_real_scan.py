"""The shipped model on a real public scan: a regression guard on segmentation quality and
what instance saliency looks like on a clearly detected lesion."""

import numpy as np
import pytest
import torch

from _helpers import DATA, needs_data
from instance_saliency import datasets
from instance_saliency.inference import WindowGrid, predict_probability
from instance_saliency.instances import find_instances
from instance_saliency.io import load_subject, normalise
from instance_saliency.metrics import evaluate_pair
from instance_saliency.models import default_model_dir, load_checkpoint_model, read_config
from instance_saliency.saliency import gradcampp, smoothgrad
from instance_saliency.targets import InstanceTarget

pytestmark = needs_data


@pytest.fixture(scope="module")
def shipped_on_patient07():
    p = datasets.fetch_subject("patient07", DATA)
    s = load_subject(p["flair"], p["mprage"], p["mask"])
    # the shipped ensemble's members that never saw patient07 (one fold), as the demo uses it
    sm = load_checkpoint_model(exclude_subjects=["patient07"])
    assert [u["member"] for u in sm.info["members_trained_on"]] == ["fold_patient07"]
    model, cfg = sm.network.eval(), sm.config
    x = normalise(s.image, sm.normalisation, sm.landmarks)
    assert np.array_equal(x, sm.prepare(s.image, s.spacing).x)
    prob = predict_probability(model, x, cfg.roi_size, cfg.overlap, cfg.lesion_class)
    return s, model, cfg, x, prob


def test_shipped_model_is_the_four_fold_ensemble():
    """Four leave-one-scan-out folds, each trained on the three other shared scans; weights of
    all shipped models together within the 60 MB budget."""
    root = default_model_dir()
    cfg = read_config(root)
    scans = {"patient07", "patient19", "P18", "P39"}
    assert sorted(cfg.members) == sorted(f"fold_{h}" for h in scans)
    for h in scans:
        assert set(read_config(root / f"fold_{h}").trained_on) == scans - {h}
    size = sum(f.stat().st_size for f in root.parent.rglob("*.safetensors"))
    assert size <= 60e6, size


def test_shipped_model_ndsc_floor(shipped_on_patient07):
    """patient07 was held out from training and from every setting of the shipped model
    (threshold 0.3 chosen on the other cross-validation folds). Measured nDSC 0.479 with the
    5,400-step member (the model card; 0.413 with the 2,400-step member shipped before it); the
    floor 0.43 allows for platform arithmetic differences but catches a broken loader, a wrong
    normalisation or channel order (those score below 0.15 here) or a return to the old weights."""
    s, model, cfg, x, prob = shipped_on_patient07
    m = evaluate_pair(s.mask, prob >= cfg.threshold, s.spacing)
    assert m["ndsc"] > 0.43
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


def test_saliency_on_a_clearly_detected_lesion(shipped_on_patient07):
    """Exact (sliding-window) SmoothGrad and Grad-CAM++ of the largest true-positive lesion.

    Observed when this test was written: FLAIR saliency inside the lesion positive on
    average (brighter FLAIR → more lesion logit), MPRAGE negative (T1-hypointense lesions);
    the test asserts only the FLAIR sign, which the seed paper reports across lesions.
    """
    s, model, cfg, x, prob = shipped_on_patient07
    iset = find_instances(prob >= cfg.threshold, s.mask, s.affine, s.spacing, min_size=3)
    tps = [i for i in iset.instances if i.status == "TP"]
    inst = max(tps, key=lambda i: i.voxels)
    m = iset.mask(inst)
    assert prob[m].mean() > 0.6  # clearly detected
    grid = WindowGrid.create(s.shape, cfg.roi_size, cfg.overlap)
    torch.manual_seed(0)
    (sg,) = smoothgrad(model, x, [InstanceTarget(m)], grid=grid, n_samples=2, noise_level=0.05)
    dense = sg.maps["mean"].to_dense()
    assert np.isfinite(dense).all()
    assert dense[0][m].mean() > 0
    (cam,) = gradcampp(model, x, [InstanceTarget(m)], "model.1.submodule.2", grid=grid)
    raw = cam.maps["raw"].to_dense()
    assert np.isfinite(raw).all() and raw.min() >= 0 and raw.max() > 0
