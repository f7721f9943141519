"""Per-lesion trust checks (instance_saliency.checks) on models where the answer is known:
a linear model (closed-form deletion curve; randomising its only layer decorrelates the map),
a model that ignores one channel, a model with a known receptive field (context curve flat
beyond it), exact weight restoration, exact local re-prediction, and ROAD imputation."""

import numpy as np
import pytest
import torch
from torch import nn

from instance_saliency.checks import (
    CheckConfig,
    aopc,
    LocalPredictor,
    check_lesions,
    compute_maps,
    context_curve,
    deletion_order,
    layer_groups,
    perturbation_curve,
    randomisation_layers,
    randomised,
    recovery_distance,
    road_impute,
    similarity,
)
from instance_saliency.errors import InputError
from instance_saliency.inference import WindowGrid, sliding_window_logits
from instance_saliency.models.module import from_module
from instance_saliency.targets import InstanceTarget

SHAPE = (20, 22, 18)
ROI = (12, 12, 12)


def _x(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (2,) + shape).astype(np.float32)


def _lesion(shape=SHAPE, seed=0, sparse=False):
    m = np.zeros(shape, bool)
    m[8:13, 9:14, 7:11] = True
    if sparse:
        rng = np.random.default_rng(seed)
        m &= rng.random(shape) < 0.6
        m[10, 11, 9] = True
    return m


class Linear(nn.Module):
    """One 5x5x5 convolution, no nonlinearity: the lesion target is linear in the input."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(2, 2, 5, padding=2)

    def forward(self, x):
        return self.conv(x)


class IgnoresMPRAGE(nn.Module):
    """Uses only the first channel (FLAIR)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.b = nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.act(self.a(x[:, :1])))


class ThreeConvs(nn.Module):
    """Three 3x3x3 convolutions: the receptive field reaches 3 voxels from a voxel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Tanh(),
                                 nn.Conv3d(4, 4, 3, padding=1), nn.Tanh(),
                                 nn.Conv3d(4, 2, 3, padding=1))
        with torch.no_grad():
            self.net[-1].bias[1] += 2.0  # lesion logit mostly positive: detected

    def forward(self, x):
        return self.net(x)


def _model(net, **kw):
    return from_module(net.eval(), roi_size=ROI, threshold=0.5, **kw)


def _grad(net, x, grid, lesion):
    xt = torch.from_numpy(x)[None].requires_grad_(True)
    lg = sliding_window_logits(net, xt, grid, 2)
    t = lg[0, 1][torch.from_numpy(lesion)].sum()
    (g,) = torch.autograd.grad(t, xt)
    return float(t), g[0].numpy().astype(np.float64)


def test_local_prediction_equals_full_sliding_window():
    net = ThreeConvs().eval()
    x = _x(1)
    grid = WindowGrid.create(SHAPE, ROI, 0.25)
    lesion = np.zeros(SHAPE, bool)
    lesion[1:4, 2:5, 1:3] = True  # near a corner: only some windows touch it
    pred = LocalPredictor(net, grid, 1, 0.5, sw_batch_size=3)
    got = pred.logits([x, 2 * x], lesion)
    with torch.no_grad():
        full = sliding_window_logits(net, torch.from_numpy(x)[None], grid, 2)[0].numpy()
        full2 = sliding_window_logits(net, torch.from_numpy(2 * x)[None], grid, 2)[0].numpy()
    np.testing.assert_allclose(got[0], full[:, lesion], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], full2[:, lesion], rtol=1e-5, atol=1e-6)
    assert pred.forwards == 2 * len(grid.windows_touching(lesion)) < 2 * grid.n_windows


def test_linear_model_deletion_curve_has_its_closed_form():
    """T is linear: T_k = T_0 - Σ_{e removed} G_e (x_e - b_e), G = ∂T/∂x (= the SmoothGrad map,
    whatever the noise)."""
    net = Linear().eval()
    model = _model(net)
    x = _x(2)
    lesion = _lesion()
    grid = model.grid(SHAPE)
    t0, G = _grad(net, x, grid, lesion)
    cfg = CheckConfig(n_samples=3, noise_level=0.1)
    maps = compute_maps(model, torch.from_numpy(x), [InstanceTarget(lesion)], ["smoothgrad"],
                        grid, None, cfg)["smoothgrad"][0]
    np.testing.assert_allclose(maps, G, rtol=1e-4, atol=1e-6)
    region = np.zeros(SHAPE, bool)
    region[5:16, 6:17, 4:14] = True
    order = deletion_order(maps, region, per_channel=True)
    assert order.shape == (2 * region.sum(), 4)
    vals = maps[tuple(order.T)]
    assert np.all(np.diff(vals) <= 0)  # descending saliency
    b = np.full_like(x, -0.5)
    pred = LocalPredictor(net, grid, 1, 0.5)
    steps = 4
    tk, dk = perturbation_curve(pred, x, lesion, order, steps, b)
    n = len(order)
    for k in range(steps + 1):
        part = order[:int(round(n * k / steps))]
        ix = tuple(part.T)
        expect = t0 - float(np.sum(G[ix] * (x[ix] - b[ix])))
        assert tk[k] == pytest.approx(expect, rel=1e-4, abs=1e-3)
    assert tk[0] == pytest.approx(t0, rel=1e-5)
    nv = int(lesion.sum())
    assert aopc(tk, nv, "sum") == pytest.approx(np.mean(tk[0] - tk[1:]) / nv)
    assert aopc(tk / nv, nv, "mean") == pytest.approx(aopc(tk, nv, "sum"))
    # removing the most positive gradient x (x - b) first lowers the target faster than the
    # least: the ordered curve sits below the reversed one
    t_rev, _ = perturbation_curve(pred, x, lesion, order[::-1], steps, b)
    assert tk[0] == pytest.approx(t_rev[0]) and tk[-1] == pytest.approx(t_rev[-1], rel=1e-4)
    assert 0 <= dk.min() and dk.max() <= 1


def test_shared_inputs_are_run_once_per_lesion_with_the_same_curves():
    """Every deletion curve starts from the unperturbed input and (fixed baseline) ends at the
    fully replaced neighbourhood; insertion runs the other way. With a per-lesion cache these
    inputs are run once: same values, fewer window forwards."""
    net = Linear(seed=5).eval()
    model = _model(net)
    x = _x(6)
    lesion = _lesion()
    grid = model.grid(SHAPE)
    region = np.zeros(SHAPE, bool)
    region[5:16, 6:17, 4:14] = True
    rng = np.random.default_rng(0)
    sal = rng.normal(size=x.shape)
    orders = [deletion_order(sal, region, True), deletion_order(sal, region, False),
              np.argwhere(region)[rng.permutation(int(region.sum()))]]
    b = np.full_like(x, -0.5)
    steps = 4
    plain = LocalPredictor(net, grid, 1, 0.5)
    shared = LocalPredictor(net, grid, 1, 0.5)
    cache: dict = {}
    for ins in (False, True):
        for o in orders:
            t1, d1 = perturbation_curve(plain, x, lesion, o, steps, b, insertion=ins)
            t2, d2 = perturbation_curve(shared, x, lesion, o, steps, b, insertion=ins,
                                        cache=cache, cache_key="background")
            np.testing.assert_array_equal(t1, t2)
            np.testing.assert_array_equal(d1, d2)
    n_win = len(grid.windows_touching(lesion))
    assert plain.forwards == 6 * (steps + 1) * n_win
    # 6 curves x (steps - 1) distinct inner steps + the unperturbed and the replaced input
    assert shared.forwards == (6 * (steps - 1) + 2) * n_win
    assert set(cache) == {("unperturbed",), ("all replaced", "background")}


def test_randomising_the_only_layer_decorrelates_the_map_and_weights_come_back_bitwise():
    net = Linear(seed=3).eval()
    model = _model(net)
    x = _x(4)
    lesion = _lesion(sparse=True)
    grid = model.grid(SHAPE)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert randomisation_layers(net) == ["conv"]
    cfg = CheckConfig(n_samples=1, noise_level=0.0)
    tg = [InstanceTarget(lesion)]
    m0 = compute_maps(model, torch.from_numpy(x), tg, ["smoothgrad"], grid, None, cfg)
    with randomised([net], ["conv"], seed=11):
        assert not torch.equal(net.conv.weight, before["conv.weight"])
        m1 = compute_maps(model, torch.from_numpy(x), tg, ["smoothgrad"], grid, None, cfg)
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    same = similarity(m0["smoothgrad"][0], m0["smoothgrad"][0], lesion)
    assert same["spearman_signed"] == pytest.approx(1.0) and same["ssim"] == pytest.approx(1.0)
    sim = similarity(m0["smoothgrad"][0], m1["smoothgrad"][0], lesion)
    assert abs(sim["spearman_signed"]) < 0.3
    # weights are restored even when the block raises
    with pytest.raises(ValueError):
        with randomised([net], ["conv"], seed=12):
            raise ValueError("boom")
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)


def test_ignored_channel_map_is_zero_and_stays_zero_under_randomisation():
    net = IgnoresMPRAGE().eval()
    model = _model(net, cam_layer="act")
    x = _x(5)
    lesion = _lesion()
    lab = [7]
    cfg = CheckConfig(checks=("randomisation",), methods=("smoothgrad",), n_samples=2,
                      stages=2, margin_mm=2.0)
    tg = [InstanceTarget(lesion)]
    grid = model.grid(SHAPE)
    m0 = compute_maps(model, torch.from_numpy(x), tg, ["smoothgrad"], grid, None, cfg)
    assert np.abs(m0["smoothgrad"][0][0]).max() > 0
    assert not m0["smoothgrad"][0][1].any()  # exactly zero
    groups = layer_groups(randomisation_layers(net), 2)
    assert groups == [["b"], ["a"]]  # output side first
    with randomised([net], [n for g in groups for n in g], seed=3):
        m1 = compute_maps(model, torch.from_numpy(x), tg, ["smoothgrad"], grid, None, cfg)
    assert not m1["smoothgrad"][0][1].any()
    rows, curves, cost = check_lesions(model, x, [lesion], lab, ["TP"], (1, 1, 1), cfg)
    assert [r["check"] for r in rows] == ["randomisation"]
    assert rows[0]["label"] == 7 and rows[0]["stages"] == 2
    stages = sorted({c["x"] for c in curves})
    assert stages == [1, 2]


def test_context_curve_is_flat_beyond_the_receptive_field():
    net = ThreeConvs().eval()
    x = _x(6)
    lesion = _lesion()
    grid = WindowGrid.create(SHAPE, ROI, 0.25)
    pred = LocalPredictor(net, grid, 1, 0.5)
    dists = [0.0, 1.0, 2.0, 3.0, 4.0, 5.2, 6.0]
    bg = np.zeros(2, np.float32)
    cc = context_curve(pred, x, lesion, (1.0, 1.0, 1.0), dists, bg)
    t = cc["target"]
    # receptive field: a cube of ±3 voxels, whose corners lie 3·√3 = 5.196 mm away: from there
    # on the lesion's logits are the full-context ones
    t_full = pred.logits([x], lesion)[0][1].sum()
    for k, d in enumerate(dists):
        if d >= 3 * np.sqrt(3):
            assert t[k] == pytest.approx(t_full, rel=1e-6)
    assert abs(t[dists.index(3.0)] - t_full) > 0  # inside the cube's reach it still differs
    assert abs(t[0] - t_full) > 1e-3 * abs(t_full)  # less context does change it
    assert np.all((cc["dice"] >= 0) & (cc["dice"] <= 1))
    assert recovery_distance(dists, np.array([0, 0, 1, 1, 1, 1, 1.0]), 0.25) == 2.0
    assert recovery_distance(dists, np.array([1, 0, 1, 0, 1, 1, 1.0]), 0.25) == 4.0
    assert np.isnan(recovery_distance(dists, np.array([1, 1, 1, 1, 1, 1, 0.0]), 0.25))


def test_road_imputation_reproduces_a_harmonic_image():
    """Linear ramps are harmonic: the Laplace imputation of removed voxels recovers them
    exactly (noise 0); with noise the values scatter by the stated fraction of the std."""
    ax = np.arange(12, dtype=np.float64)
    ramp = (0.5 * ax[:, None, None] - 0.2 * ax[None, :, None] + 0.1 * ax[None, None, :])
    x = np.stack([ramp, 2 * ramp + 1]).astype(np.float64)
    removed = np.zeros((12, 12, 12), bool)
    removed[3:9, 4:10, 2:8] = True
    rng = np.random.default_rng(0)
    out = road_impute(x, removed, 0.0, rng)
    np.testing.assert_allclose(out, x, atol=1e-8)
    noisy = road_impute(x, removed, 0.1, np.random.default_rng(1))
    d = (noisy - x)[0][removed]
    assert d.std() == pytest.approx(0.1 * x[0].std(), rel=0.15)
    assert (noisy[:, ~removed] == x[:, ~removed]).all()


def test_check_lesions_all_checks_value_sanity(tmp_path):
    """Every check on a two-lesion scan: rows per lesion x method x check, AOPC of the random
    order averaged over its seeds, context only for TP lesions, cost recorded."""
    net = ThreeConvs().eval()
    model = _model(net, cam_layer="net.2")
    x = _x(7)
    l1 = _lesion()
    l2 = np.zeros(SHAPE, bool)
    l2[2:5, 2:5, 2:5] = True
    cfg = CheckConfig(methods=("smoothgrad", "gradcampp", "hirescam"), n_samples=2, stages=2,
                      steps=2, random_orders=2, baselines=("background", "road"),
                      margin_mm=2.0, context_mm=(0.0, 3.0))
    rows, curves, cost = check_lesions(model, x, [l1, l2], [1, 2], ["TP", "FP"], (1, 1, 1),
                                       cfg, cam_layer="net.2", threshold=0.5)
    kinds = [(r["label"], r["method"], r["check"]) for r in rows]
    for lab in (1, 2):
        for m in ("smoothgrad", "gradcampp", "hirescam"):
            assert (lab, m, "randomisation") in kinds and (lab, m, "deletion") in kinds
    assert (1, "model", "context") in kinds and (2, "model", "context") not in kinds
    for r in rows:
        if r["check"] == "deletion":
            assert r["aopc_background_minus_random"] == pytest.approx(
                r["aopc_background"] - r["aopc_background_random"])
            assert np.isfinite(r["aopc_road"])
    ctx = [r for r in rows if r["check"] == "context"][0]
    assert ctx["recovery_mm"] in (0.0, 3.0) or np.isnan(ctx["recovery_mm"])
    assert cost["deletion_windows"] > 0 and cost["seconds_per_lesion"] > 0
    # the page's table is titled as what it holds (rows of checks, not lesions)
    import pandas as pd

    from instance_saliency.report.checks import write_checks_report

    page = write_checks_report(tmp_path, pd.DataFrame(rows), pd.DataFrame(curves),
                               {"lesions": [1, 2], "cost": cost})
    assert f"<h2>Checks (one row per lesion, method and check) ({len(rows)})</h2>" in \
        page.read_text()


def test_insertion_uses_the_first_baseline_that_is_not_road():
    """ROAD has no fixed image to insert into: insertion starts from the next baseline (and is
    empty, with an empty insertion_baseline, when ROAD is the only one)."""
    net = ThreeConvs().eval()
    model = _model(net, cam_layer="net.2")
    x = _x(8)
    les = _lesion()
    kw = dict(methods=("gradcampp",), n_samples=1, steps=2, random_orders=1, margin_mm=2.0,
              checks=("deletion",))
    for bases, expect in ((("road", "background"), "background"), (("road",), "")):
        rows, curves, _ = check_lesions(model, x, [les], [1], ["TP"], (1, 1, 1),
                                        CheckConfig(baselines=bases, **kw), cam_layer="net.2",
                                        threshold=0.5)
        (row,) = rows
        assert row["insertion_baseline"] == expect
        assert np.isfinite(row["insertion"]) == bool(expect)
        assert any(c["check"] == "insertion_background" for c in curves) == bool(expect)


def test_bad_check_config_is_refused():
    with pytest.raises(InputError, match="unknown check"):
        CheckConfig(checks=("sanity",)).validate()
    with pytest.raises(InputError, match="unknown baseline"):
        CheckConfig(baselines=("zero",)).validate()
    with pytest.raises(InputError, match="--steps must be at least 1"):
        CheckConfig(steps=0).validate()


def test_pool_checks_over_a_cohort(tmp_path):
    """Medians with subject-bootstrap CIs, the pass rules, and the paired method comparison."""
    import pandas as pd

    from instance_saliency.checks import checks_markdown, pool_checks

    assert pool_checks(tmp_path) is None
    rng = np.random.default_rng(0)
    for s in range(5):
        rows = []
        for lab in range(1, 7):
            rows.append({"label": lab, "status": "TP", "voxels": 10, "method": "smoothgrad",
                         "check": "randomisation", "spearman_abs_full": 0.05 * rng.random(),
                         "ssim_full": 0.1})
            rows.append({"label": lab, "status": "TP", "voxels": 10, "method": "gradcampp",
                         "check": "randomisation", "spearman_abs_full": 0.9, "ssim_full": 0.8})
            for m, a in (("smoothgrad", 2.0), ("gradcampp", 0.5)):
                rows.append({"label": lab, "status": "TP", "voxels": 10, "method": m,
                             "check": "deletion", "aopc_background": a + 0.01 * lab,
                             "aopc_background_minus_random": a - 1.0, "insertion": 0.5})
            rows.append({"label": lab, "status": "TP", "voxels": 10, "method": "model",
                         "check": "context", "recovery_mm": 7.0})
        d = tmp_path / "subjects" / f"s{s}"
        d.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(d / "checks.csv", index=False)
    pooled = pool_checks(tmp_path, n_boot=200)
    sg, cam = pooled["methods"]["smoothgrad"], pooled["methods"]["gradcampp"]
    assert pooled["n_subjects"] == 5
    assert sg["randomisation_passes"] and not cam["randomisation_passes"]
    assert sg["deletion_passes"] and not cam["deletion_passes"]
    assert sg["deletion_aopc_minus_random"]["median"] == pytest.approx(1.0)
    assert cam["randomisation_spearman_abs"]["ci_low"] == pytest.approx(0.9)
    assert pooled["methods"]["model"]["context_recovery_mm"]["median"] == 7.0
    (pair,) = pooled["pairwise"]
    assert {pair["a"], pair["b"]} == {"smoothgrad", "gradcampp"}
    assert abs(pair["median_aopc_difference"]) == pytest.approx(1.5)
    assert pair["n_lesions"] == 30 and pair["wilcoxon_p"] < 1e-3
    md = checks_markdown(pooled)
    assert pooled["methods"]["model"]["context_not_recovered"] == 0
    assert "SmoothGrad passes the randomisation check" in md
    assert "Grad-CAM++ does not pass the deletion check" in md
    assert "recovers 7 [7, 7] (n = 30) mm" in md


def test_check_refuses_bad_runs_and_context_lists(tmp_path):
    """One-line errors before any work: a missing folder, a predict run, a reversed or
    decreasing --context-mm."""
    import json

    from instance_saliency import cli
    from instance_saliency.checks import run_checks

    with pytest.raises(InputError, match="does not exist"):
        run_checks(tmp_path / "nope")
    (tmp_path / "run.json").write_text(json.dumps({"command": "predict", "parameters": {},
                                                   "inputs": {}, "model": {"channels": []}}))
    with pytest.raises(InputError, match="is a predict run, not an explain run"):
        run_checks(tmp_path)
    with pytest.raises(InputError, match="increasing distances"):
        CheckConfig(context_mm=(6.0, 4.0)).validate()
    assert cli.main(["check", str(tmp_path), "--context-mm", "6:0:2"]) == 2


def test_check_cohort_refuses_other_settings_before_any_work(tmp_path):
    """A cohort whose subjects were checked with other settings is refused (one line) rather
    than silently pooled as a mixture; the same settings skip the subject."""
    import json
    from dataclasses import asdict

    from instance_saliency.checks import check_cohort

    d = tmp_path / "subjects" / "s1"
    d.mkdir(parents=True)
    (d / "run.json").write_text("{}")
    (d / "checks.csv").write_text("label\n")
    had = CheckConfig(steps=2, max_lesions=1)
    (d / "checks.json").write_text(json.dumps({"config": asdict(had)}, default=list))
    with pytest.raises(InputError, match=r"subject s1 .* checked with other settings "
                                         r"\(max_lesions, steps\)"):
        check_cohort(tmp_path, CheckConfig(steps=4, max_lesions=2))
    lines = []
    assert check_cohort(tmp_path, had, log=lines.append) == []
    assert lines == ["checks: 1 subject(s) already checked with these settings, kept: s1"]
