"""End-to-end `explain` on a cropped real scan with a tiny hand-set model.

The model is a registered custom architecture (a 3D convolution whose lesion logit grows with
the FLAIR intensity), so that predicted lesions follow real hyperintensities and the test
exercises the "any torch.nn.Module" path. Values in instances.csv are recomputed from the
written NIfTI maps.
"""

import json
import os
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from instance_saliency import cli, datasets, models
from instance_saliency.datasets import sha256sum
from instance_saliency.models import ModelConfig, save_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = Path(os.environ.get("INSTANCE_SALIENCY_DATA") or SHARED)
needs_data = pytest.mark.skipif(not (DATA / "SHA256SUMS").is_file(),
                                reason=f"real-scan mirror not found at {DATA}")


class FlairDetector(torch.nn.Module):
    """Lesion logit ≈ 4 · (smoothed FLAIR − 2.2): bright FLAIR voxels become lesions."""

    def __init__(self, in_channels=2, out_channels=2):
        super().__init__()
        self.features = torch.nn.Conv3d(in_channels, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Conv3d(4, out_channels, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            self.features.weight[0, 0] = 1.0 / 27  # mean FLAIR
            self.features.weight[1, 1] = 1.0 / 27  # mean MPRAGE
            self.features.bias[2] = 1.0
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[1, 0] = 4.0
            self.head.weight[1, 1] = -0.2
            self.head.weight[1, 2] = -8.8

    def forward(self, x):
        return self.head(self.act(self.features(x)))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    if not (DATA / "SHA256SUMS").is_file():
        pytest.skip(f"real-scan mirror not found at {DATA}")
    tmp = tmp_path_factory.mktemp("explain")
    p = datasets.fetch_subject("patient07", DATA)
    gt_img = nib.load(str(p["mask"]))
    gt = np.asarray(gt_img.dataobj) > 0
    # crop a 48^3 box around the densest lesion region
    lab = cc3d.connected_components(gt.astype(np.uint8), connectivity=26)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    c = np.argwhere(lab == sizes.argmax()).mean(0).astype(int)
    sl = tuple(slice(int(a) - 24, int(a) + 24) for a in c)
    out = {}
    for k in ("flair", "mprage", "mask"):
        img = nib.load(str(p[k]))
        data = np.asarray(img.dataobj)[sl]
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ np.array([s.start for s in sl]) + img.affine[:3, 3]
        f = tmp / f"{k}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff, img.header), str(f))
        out[k] = f
    models.ARCHITECTURES["test_flair_detector"] = FlairDetector
    mdir = tmp / "model"
    save_checkpoint(mdir, FlairDetector(), ModelConfig("test_flair_detector", roi_size=[32, 32, 32]))
    run = tmp / "run"
    rc = cli.main(["explain", "--flair", str(out["flair"]), "--mprage", str(out["mprage"]),
                   "--mask", str(out["mask"]), "--model", str(mdir), "--out", str(run),
                   "--n-samples", "2", "--cam-layer", "act", "--quiet", "--min-size", "3"])
    assert rc == 0
    yield {"run": run, "inputs": out, "model": mdir, "tmp": tmp}
    models.ARCHITECTURES.pop("test_flair_detector", None)


@needs_data
def test_outputs_exist_and_rows_match_components(case):
    run = case["run"]
    for f in ("prediction_prob.nii.gz", "prediction_mask.nii.gz", "instances.nii.gz",
              "instances.csv", "profiles.csv", "report.html", "run.json",
              "figures/distance_profile.png", "figures/modality_share.png"):
        assert (run / f).is_file(), f
    table = pd.read_csv(run / "instances.csv")
    pred = np.asarray(nib.load(str(run / "prediction_mask.nii.gz")).dataobj) > 0
    gt = np.asarray(nib.load(str(case["inputs"]["mask"])).dataobj) > 0
    plab, n_pred = cc3d.connected_components(pred.astype(np.uint8), connectivity=26,
                                             return_N=True)
    glab, n_gt = cc3d.connected_components(gt.astype(np.uint8), connectivity=26, return_N=True)
    n_fn = sum(1 for g in range(1, n_gt + 1) if not pred[glab == g].any())
    assert n_pred > 0 and n_fn > 0, "the crop should hold detected and missed lesions"
    assert len(table) == n_pred + n_fn
    assert (table["status"] == "FN").sum() == n_fn
    tp = [not gt[plab == k].any() for k in range(1, n_pred + 1)]
    assert (table["status"] == "FP").sum() == sum(tp)


def _crop_start(img, ref):
    """Voxel of ``ref``'s grid where a cropped map starts (same rotation/zooms, integer shift)."""
    np.testing.assert_allclose(img.affine[:3, :3], ref.affine[:3, :3], atol=1e-6)
    start = np.linalg.solve(ref.affine[:3, :3], img.affine[:3, 3] - ref.affine[:3, 3])
    np.testing.assert_allclose(start, np.rint(start), atol=1e-4)
    return tuple(int(v) for v in np.rint(start))


def _full(img, ref):
    """A cropped map file placed back on ``ref``'s grid (zeros outside the crop)."""
    start = _crop_start(img, ref)
    data = np.asarray(img.dataobj)
    out = np.zeros(ref.shape + data.shape[3:], np.float32)
    out[tuple(slice(a, a + n) for a, n in zip(start, data.shape[:3]))] = data
    return out, start


@needs_data
def test_maps_cropped_on_input_grid_and_csv_recomputed(case):
    """Default --maps crop: each file holds the lesion's bounding box + 8 mm, with the input
    affine translated to the crop and the input's qform/sform codes; every number of the row
    is recomputed from the cropped files (the box holds all voxels any number reads)."""
    from instance_saliency.quantify import quantify_instance

    run = case["run"]
    ref = nib.load(str(case["inputs"]["flair"]))
    table = pd.read_csv(run / "instances_full.csv").set_index("label")
    # the user-facing table is the same, rounded (4 significant digits of saliency, ...)
    from instance_saliency._format import round_table

    shown = pd.read_csv(run / "instances.csv").set_index("label")
    pd.testing.assert_frame_equal(shown, round_table(table), check_dtype=False, rtol=1e-12)
    assert shown["smoothgrad_flair_mean_in"].map(lambda v: len(f"{abs(v):.15g}".replace(
        ".", "").lstrip("0")) <= 4).all()
    labels = np.asarray(nib.load(str(run / "instances.nii.gz")).dataobj)
    gt = np.asarray(nib.load(str(case["inputs"]["mask"])).dataobj) > 0
    glab = cc3d.connected_components(gt.astype(np.uint8), connectivity=26)
    assert json.loads((run / "run.json").read_text())["parameters"]["maps_margin_mm"] == 8.0
    prob_img = nib.load(str(run / "prediction_prob.nii.gz"))
    for label, row in table.iterrows():
        img = nib.load(str(run / "saliency" / "smoothgrad" / f"lesion_{label:03d}.nii.gz"))
        assert img.get_data_dtype() == np.float32
        for code in ("qform_code", "sform_code"):  # as every full-grid output of the run
            assert int(img.header[code]) == int(prob_img.header[code])
        sal, start = _full(img, ref)
        box = tuple(slice(row[f"bbox_{a}_start"], row[f"bbox_{a}_stop"]) for a in "xyz")
        want = tuple(max(s.start - 8, 0) for s in box)
        assert start == want
        assert img.shape[:3] == tuple(min(s.stop + 8, n) - a
                                      for s, n, a in zip(box, ref.shape, want))
        assert img.shape[3] == 2
        assert np.isfinite(sal).all()
        if row["source"] == "gt":  # find the GT component by its bounding box
            cands = [k for k in np.unique(glab[box]) if k and all(
                (s.start, s.stop) == (int(i.min()), int(i.max()) + 1)
                for s, i in zip(box, np.nonzero(glab == k)))]
            assert len(cands) == 1
            m = glab == cands[0]
        else:
            m = labels == label
        assert m.sum() == row["voxels"]
        got = quantify_instance(np.moveaxis(sal, -1, 0), m, ref.header.get_zooms()[:3])
        for k, v in got.items():
            np.testing.assert_allclose(row[k], v, rtol=1e-12, atol=0, err_msg=k)
        # the map features of explain are those of the written map (features.map_features):
        # they read the lesion and its 3 mm rim, inside the crop
        from instance_saliency.features import map_features

        mf = map_features(np.moveaxis(sal, -1, 0), m, ref.header.get_zooms()[:3])
        fo = [k for k in mf if "_fo_" in k]
        np.testing.assert_allclose(row[fo].to_numpy(float), [mf[k] for k in fo], rtol=1e-4,
                                   atol=1e-6)
        assert np.abs(sal).sum() > 0, "saliency of a lesion cannot be identically zero here"
        cam_img = nib.load(str(run / "saliency" / "gradcampp" / f"lesion_{label:03d}.nii.gz"))
        cam, cstart = _full(cam_img, ref)
        assert cstart == start and cam.shape == ref.shape and (cam >= 0).all()
        got = quantify_instance(cam[None], m, ref.header.get_zooms()[:3], ("CAM",), "gradcampp")
        for k, v in got.items():
            np.testing.assert_allclose(row[k], v, rtol=1e-12, atol=0, err_msg=k)
        prob = np.asarray(nib.load(str(run / "prediction_prob.nii.gz")).dataobj)
        np.testing.assert_allclose(row["prob_max"], prob[m].max(), rtol=1e-6)


@needs_data
def test_maps_full_and_none_give_the_same_tables(case):
    """--maps full (today's full-grid files) and --maps none write the same instances.csv and
    profiles.csv bytes as the default crop; the full files hold the crop's values in place."""
    run = case["run"]
    ref = nib.load(str(case["inputs"]["flair"]))
    outs = {}
    for mode in ("full", "none"):
        outs[mode] = case["tmp"] / f"run_{mode}"
        rc = cli.main(["explain", "--flair", str(case["inputs"]["flair"]),
                       "--mprage", str(case["inputs"]["mprage"]),
                       "--mask", str(case["inputs"]["mask"]), "--model", str(case["model"]),
                       "--out", str(outs[mode]), "--n-samples", "2", "--cam-layer", "act",
                       "--quiet", "--min-size", "3", "--maps", mode, "--no-figures"])
        assert rc == 0
    for f in ("instances.csv", "profiles.csv"):
        crop_bytes = (run / f).read_bytes()
        assert (outs["full"] / f).read_bytes() == crop_bytes, f
        assert (outs["none"] / f).read_bytes() == crop_bytes, f
    assert not (outs["none"] / "saliency").exists()
    files = sorted((run / "saliency").rglob("*.nii.gz"))
    assert files and [p.relative_to(run) for p in files] == [
        p.relative_to(outs["full"]) for p in sorted((outs["full"] / "saliency").rglob("*.nii.gz"))]
    for p in files:
        full = nib.load(str(outs["full"] / p.relative_to(run)))
        assert full.shape[:3] == ref.shape
        np.testing.assert_allclose(full.affine, ref.affine, atol=1e-5)
        crop, _ = _full(nib.load(str(p)), ref)
        fd = np.asarray(full.dataobj)
        inside = crop != 0
        np.testing.assert_array_equal(crop[inside], fd[inside])
    size = {k: sum(p.stat().st_size for p in (d / "saliency").rglob("*.nii.gz"))
            for k, d in (("crop", run), ("full", outs["full"]))}
    assert size["crop"] < size["full"]


@needs_data
def test_run_json_records_inputs_and_parameters(case):
    run = json.loads((case["run"] / "run.json").read_text())
    for k, p in case["inputs"].items():
        assert run["inputs"][k]["sha256"] == sha256sum(p)
    assert run["parameters"]["n_samples"] == 2
    assert run["parameters"]["cam_layer"] == "act"
    assert run["model"]["config"]["architecture"] == "test_flair_detector"
    assert set(run["timings_s"]) >= {"predict_s", "smoothgrad_s", "gradcampp_s", "total_s"}


@needs_data
def test_refuses_finished_run_without_overwrite(case, capsys):
    run = case["run"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    rc = cli.main(["explain", "--flair", str(case["inputs"]["flair"]),
                   "--mprage", str(case["inputs"]["mprage"]), "--model", str(case["model"]),
                   "--out", str(run), "--quiet", "--cam-layer", "act"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert not list(run.parent.glob(f".{run.name}.partial-*"))


@needs_data
def test_hirescam_is_an_opt_in_third_method(case, tmp_path):
    """``--methods hirescam`` writes HiResCAM maps and columns (same CAM layer and quantities
    as Grad-CAM++); the default run has none."""
    assert not (case["run"] / "saliency" / "hirescam").exists()
    inp = case["inputs"]
    run = tmp_path / "hr"
    rc = cli.main(["explain", "--flair", str(inp["flair"]), "--mprage", str(inp["mprage"]),
                   "--mask", str(inp["mask"]), "--model", str(case["model"]), "--out", str(run),
                   "--methods", "hirescam,gradcampp", "--cam-layer", "act", "--quiet",
                   "--min-size", "3", "--no-figures"])
    assert rc == 0
    table = pd.read_csv(run / "instances_full.csv").set_index("label")  # full precision
    labels = np.asarray(nib.load(str(run / "instances.nii.gz")).dataobj)
    assert "smoothgrad_flair_mean_in" not in table.columns
    pred_rows = table[table["source"] == "pred"]
    assert len(pred_rows)
    for label, row in pred_rows.iterrows():
        m = labels == label
        ref = nib.load(str(inp["flair"]))  # cropped maps, placed back on the input grid
        hr, _ = _full(nib.load(str(run / "saliency" / "hirescam" /
                                   f"lesion_{label:03d}.nii.gz")), ref)
        cpp, _ = _full(nib.load(str(run / "saliency" / "gradcampp" /
                                    f"lesion_{label:03d}.nii.gz")), ref)
        assert (hr >= 0).all() and hr[m].max() > 0
        np.testing.assert_allclose(row["hirescam_cam_mean_in"], hr[m].mean(), rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(row["gradcampp_cam_mean_in"], cpp[m].mean(), rtol=1e-5,
                                   atol=1e-7)
