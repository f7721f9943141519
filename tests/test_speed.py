"""Issue 15 (speed): the fast saliency path gives the previous path's maps, batch-norm folding,
precision options, the GPU check's dry run, figures drawn once.

The comparisons are against the code path before issue 15, kept behind the private switch
``instance_saliency.saliency._speed.LEGACY``; tolerances are relative to the largest magnitude
of the reference map (float32 rounding: folding batch norms changes the network's arithmetic).
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import DATA, needs_data
from instance_saliency.saliency import (_speed, fold_batchnorm, gradcampp, hirescam,
                                        record_layer_sums, smoothgrad)
from instance_saliency.saliency.base import prefetch
from instance_saliency.targets import MaskTarget

ROOT = Path(__file__).resolve().parents[1]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def legacy_switch():
    """Set ``_speed.LEGACY`` inside a test and restore it afterwards."""
    old = _speed.LEGACY
    yield lambda v: setattr(_speed, "LEGACY", v)
    _speed.LEGACY = old


def _bn_stats(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.data.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


# ------------------------------------------------------------------------- batch-norm folding


def test_fold_batchnorm_convolutions_and_transposed():
    """Conv→BN and ConvTranspose→BN pairs (also inside nested Sequentials, a BN without
    affine, a conv without bias) are folded; outputs equal to float32 rounding; the original
    is untouched; a BN after a ReLU, a BN in training mode and a pair with a hook are not."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.Sequential(nn.BatchNorm3d(4), nn.ReLU()),
        nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1),
        nn.BatchNorm3d(3, affine=False),
        nn.Conv3d(3, 3, 1), nn.ReLU(), nn.BatchNorm3d(3))
    _bn_stats(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert folded is not net
    kinds = [type(m).__name__ for m in folded.modules()]
    assert kinds.count("BatchNorm3d") == 1  # only the one after the ReLU is left
    x = torch.randn(2, 2, 6, 6, 6)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-6
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # nothing foldable: the network itself comes back (no copy)
    net.train()
    assert fold_batchnorm(net) is net  # batch norms in training mode
    only = nn.Sequential(nn.Conv3d(2, 2, 1), nn.ReLU())
    assert fold_batchnorm(only) is only
    hooked = _bn_stats(nn.Sequential(nn.Conv3d(2, 2, 1), nn.BatchNorm3d(2)))
    hooked[0].register_forward_hook(lambda *a: None)
    assert fold_batchnorm(hooked) is hooked


def test_fast_networks_in_place_is_undone_after_an_error():
    """The saliency calls fold in place for their duration: inside, the batch norm's slot
    holds an Identity and the PReLU's a FrozenPReLU; afterwards (also after an exception) the
    very same parameter and module objects are back, with the same values."""
    from instance_saliency.saliency._speed import FrozenPReLU, fast_networks

    net = _bn_stats(nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), nn.PReLU()))
    with torch.no_grad():
        net[2].weight.fill_(0.3)
    w, b, bn, act = net[0].weight, net[0].bias, net[1], net[2]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 2, 5, 5, 5)
    with torch.no_grad():
        ref = net(x)
    with pytest.raises(RuntimeError, match="inside"):
        with fast_networks(net):
            assert isinstance(net[1], nn.Identity) and net[0].weight is not w
            assert isinstance(net[2], FrozenPReLU)
            with torch.no_grad():
                assert _rel(net(x), ref) < 1e-6
            raise RuntimeError("inside")
    assert net[0].weight is w and net[0].bias is b and net[1] is bn and net[2] is act
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_frozen_prelu_bit_identical():
    """FrozenPReLU: the values and input gradients of a one-parameter PReLU, bit for bit."""
    from instance_saliency.saliency._speed import FrozenPReLU

    act = nn.PReLU()
    with torch.no_grad():
        act.weight.fill_(0.173)
    x = torch.randn(2, 3, 7, 7, 7, requires_grad=True)
    g = torch.randn(2, 3, 7, 7, 7)
    a, b = act(x), FrozenPReLU(act.weight.item())(x)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, x, g)[0])


def test_fold_batchnorm_keeps_named_layer_and_monai_blocks():
    """MONAI's UNet blocks (Convolution = conv + ADN) are folded; a convolution named in
    ``keep`` is left as it is (its own output is what Grad-CAM++ reads)."""
    from instance_saliency.models import build_model

    torch.manual_seed(0)
    net = _bn_stats(build_model("unet3d", channels=(4, 8, 16), strides=(2, 2)))
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    folded = fold_batchnorm(net)
    assert sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules()) == 0
    kept = fold_batchnorm(net, keep=("model.0.conv",))
    assert sum(isinstance(m, nn.BatchNorm3d) for m in kept.modules()) == 1
    assert torch.equal(dict(kept.named_modules())["model.0.conv"].weight,
                       dict(net.named_modules())["model.0.conv"].weight)
    assert set(dict(folded.named_modules())) == set(dict(net.named_modules()))  # names kept
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert _rel(folded(x), net(x)) < 1e-5
    assert n_bn > 0


# ------------------------------------------------------- sub-pixel transposed convolutions


@pytest.mark.parametrize("k,s,p,op,size", [(3, 2, 1, 1, (5, 6, 4)), (2, 2, 0, 0, (4, 3, 5)),
                                           (4, 2, 1, 0, (3, 4, 4)), (3, 3, 1, 2, (3, 2, 4))])
def test_subpixel_transposed_convolution_equals_torch(k, s, p, op, size):
    """The sub-pixel form of a transposed convolution (one ordinary convolution with s³·C_out
    channels + pixel shuffle) gives F.conv_transpose3d's values and input gradients to float32
    rounding, in channels-last memory, for several kernels, strides and paddings."""
    from instance_saliency.saliency import _speed

    torch.manual_seed(0)
    ct = nn.ConvTranspose3d(5, 2, k, stride=s, padding=p, output_padding=op).eval()
    for prm in ct.parameters():
        prm.requires_grad_(False)
    x = torch.randn((3, 5) + size, requires_grad=True)
    ref = ct(x)
    run = _speed.SubpixelConvTranspose3d(ct)
    out = run(x)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert _rel(out.detach(), ref.detach()) < 1e-6
    g = torch.randn_like(ref)
    assert _rel(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]) < 1e-6


def test_subpixel_falls_back_where_it_does_not_apply():
    """An output length that is not a multiple of the stride, weights that need gradients or
    an input without gradients run the original module: the same values bit for bit."""
    from instance_saliency.saliency import _speed

    torch.manual_seed(1)
    ct = nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1)  # output 2n − 1: no sub-pixel form
    x = torch.randn(2, 4, 5, 5, 5)
    assert _speed.subpixel_plan(ct.weight.shape, ct.stride, ct.padding, ct.output_padding,
                                x.shape[2:]) is None
    assert torch.equal(_speed.SubpixelConvTranspose3d(ct)(x), ct(x))  # also: weights need grad
    conv = nn.Conv3d(2, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 8, 8, 8)
    assert torch.equal(_speed.SubpixelGradConv3d(conv)(x), conv(x))


@pytest.mark.parametrize("size", [(16, 12, 10), (15, 13, 11)])
def test_subpixel_input_gradient_of_strided_convolution(size):
    """A U-Net's first layer (stride 2, two input channels): the forward is the module's own,
    bit for bit; its input gradient, a transposed convolution, in the sub-pixel form equals
    autograd's to float32 rounding — for even sizes, and through the fallback for odd ones."""
    from instance_saliency.saliency import _speed

    torch.manual_seed(2)
    conv = nn.Conv3d(2, 6, 3, stride=2, padding=1).eval()
    for prm in conv.parameters():
        prm.requires_grad_(False)
    x = torch.randn((3, 2) + size, requires_grad=True)
    ref, out = conv(x), _speed.SubpixelGradConv3d(conv)(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    assert _rel(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]) < 1e-6


def test_fast_networks_swaps_the_few_channel_ends_of_a_unet():
    """Inside fast_networks a MONAI UNet's first convolution (2 input channels) and last
    transposed convolution (2 output channels) run in the sub-pixel form, a layer named in
    ``keep`` does not; input gradients equal the original network's to 1e-5; afterwards the
    very same module objects are back."""
    from instance_saliency.models import build_model
    from instance_saliency.saliency._speed import (SubpixelConvTranspose3d,
                                                   SubpixelGradConv3d, fast_networks)

    torch.manual_seed(0)
    net = _bn_stats(build_model("unet3d", channels=(4, 8, 16), strides=(2, 2)))
    for prm in net.parameters():
        prm.requires_grad_(False)
    first, last = net.model[0].conv, net.model[2].conv
    x = torch.randn(2, 2, 16, 16, 16, requires_grad=True)
    g = torch.randn(2, 2, 16, 16, 16)
    ref = torch.autograd.grad(net(x), x, g)[0]
    with fast_networks(net):
        assert isinstance(net.model[0].conv, SubpixelGradConv3d)
        assert isinstance(net.model[2].conv, SubpixelConvTranspose3d)
        assert _rel(torch.autograd.grad(net(x), x, g)[0], ref) < 1e-5
    assert net.model[0].conv is first and net.model[2].conv is last
    with fast_networks(net, keep=("model.2.conv",)):
        assert net.model[2].conv is last
    assert dict(net.named_modules())["model.2.conv"] is last


# ------------------------------------------------------------------ fast path == legacy path


def _tiny_case():
    from instance_saliency.inference import WindowGrid
    from instance_saliency.models import build_model

    torch.manual_seed(0)
    net = _bn_stats(build_model("unet3d", channels=(4, 8, 16), strides=(2, 2)))
    shape = (20, 18, 22)
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(3))
    masks = []
    for box in (((2, 6), (3, 7), (4, 9)), ((10, 14), (8, 13), (12, 18)),
                ((15, 19), (1, 4), (2, 5))):
        m = np.zeros(shape, bool)
        m[tuple(slice(a, b) for a, b in box)] = True
        masks.append(m)
    targets = [MaskTarget(m, 1, reduction=r) for m, r in zip(masks, ("sum", "mean", "sum"))]
    grid = WindowGrid.create(shape, (16, 16, 16), 0.25)
    return net, x, targets, grid


@pytest.mark.parametrize("variants,batch_size,grad_batch", [
    (("mean",), 1, 1), (("mean", "squared", "vargrad"), 2, 3)])
def test_smoothgrad_fast_equals_legacy(legacy_switch, variants, batch_size, grad_batch):
    """Sliding-window SmoothGrad (3 targets over 8 windows, N = 3): the fast path (folded
    batch norms, cached cotangent crops, batched backward passes) equals the previous path."""
    net, x, targets, grid = _tiny_case()
    kw = dict(grid=grid, n_samples=3, seed=4, sw_batch_size=2, variants=variants,
              batch_size=batch_size)
    legacy_switch(True)
    ref = smoothgrad(net, x, targets, **kw)
    legacy_switch(False)
    new = smoothgrad(net, x, targets, grad_batch=grad_batch, **kw)
    for r, n in zip(ref, new):
        assert n.n_windows == r.n_windows
        for v in variants:
            assert n.maps[v].region == r.maps[v].region
            assert _rel(n.maps[v].data, r.maps[v].data) < 1e-5


@pytest.mark.parametrize("fn,signed", [(gradcampp, True), (hirescam, False)])
def test_cam_fast_equals_legacy_with_recorded_sums(legacy_switch, fn, signed):
    """Grad-CAM++ / HiResCAM: the fast path, with the layer sums recorded during a prediction
    pass (no pass of its own) or computed by itself, equals the previous path; so do the
    channel weights."""
    from instance_saliency.inference import sliding_window_logits

    net, x, targets, grid = _tiny_case()
    layer = "model.1.submodule.2"
    with torch.inference_mode(), record_layer_sums(net, layer) as rec:
        sliding_window_logits(net, x[None], grid, 3)
    sums = rec.per_member(grid.n_windows, 3)
    assert sums is not None and len(sums) == 1 and len(sums[0]) == grid.n_windows
    assert rec.per_member(grid.n_windows, 2) is None  # another batching: not usable
    kw = dict(grid=grid, sw_batch_size=2)
    if fn is gradcampp:
        kw["signed"] = signed
    legacy_switch(True)
    ref = fn(net, x, targets, layer, **kw)
    legacy_switch(False)
    for new in (fn(net, x, targets, layer, layer_sums=sums, **kw),
                fn(net, x, targets, layer, grad_batch=2, **kw)):
        for r, n in zip(ref, new):
            for k in r.maps:
                assert _rel(n.maps[k].data, r.maps[k].data) < 1e-5, k
            assert _rel(n.weights, r.weights) < 1e-5
    with pytest.raises(ValueError, match="layer_sums"):
        fn(net, x, targets, layer, layer_sums=sums * 2, **kw)


def test_ensemble_members_fast_equals_legacy(legacy_switch):
    """A two-fold ensemble with mirroring (folds share nothing, mirrorings share a fold's
    network): the same maps on both paths, for SmoothGrad and Grad-CAM++ with recorded sums."""
    from instance_saliency.inference import sliding_window_logits
    from instance_saliency.models.base import SegmentationModel, ensemble_members

    net, x, targets, grid = _tiny_case()
    net2 = _bn_stats(copy.deepcopy(net), seed=7)
    with torch.no_grad():
        for prm in net2.parameters():
            prm.mul_(0.9)
    model = SegmentationModel(ensemble_members([("f0", net), ("f1", net2)], mirror_axes=(0, 2)),
                              ["FLAIR", "MPRAGE"])
    members = model.members
    layer = "model.1.submodule.2"
    with torch.inference_mode(), record_layer_sums(model, layer) as rec:
        sliding_window_logits(model.network, x[None], grid, 4)
    sums = rec.per_member(grid.n_windows, 4)
    assert sums is not None and len(sums) == len(members)
    legacy_switch(True)
    ref_sg = smoothgrad(model, x, targets[:2], grid=grid, n_samples=2, sw_batch_size=4)
    ref_cam = gradcampp(model, x, targets[:2], layer, grid=grid, sw_batch_size=4)
    legacy_switch(False)
    new_sg = smoothgrad(model, x, targets[:2], grid=grid, n_samples=2, sw_batch_size=4)
    new_cam = gradcampp(model, x, targets[:2], layer, grid=grid, sw_batch_size=4,
                        layer_sums=sums)
    for r, n in zip(ref_sg, new_sg):
        assert _rel(n.maps["mean"].data, r.maps["mean"].data) < 1e-5
    for r, n in zip(ref_cam, new_cam):
        assert _rel(n.maps["raw"].data, r.maps["raw"].data) < 1e-5


@needs_data
def test_fast_path_equals_legacy_on_real_crop(legacy_switch):
    """The shipped model on a real 64³ crop of the demo scan (one 96³ window, 3 lesions):
    SmoothGrad (N = 1) and Grad-CAM++ (sums recorded during the prediction) equal the
    previous path within 1e-5 relative (measured: about 2e-7 and 5e-7)."""
    import cc3d

    from instance_saliency import datasets
    from instance_saliency.inference import sliding_window_logits
    from instance_saliency.instances import find_instances
    from instance_saliency.io import load_images
    from instance_saliency.models import load_model
    from instance_saliency.targets import InstanceTarget

    p = datasets.fetch_subject("patient07", DATA)
    model = load_model(None)
    subj = load_images([p["flair"], p["mprage"]], model.channels, p["mask"])
    lab = cc3d.connected_components(subj.mask.astype(np.uint8), connectivity=26)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    c = np.argwhere(lab == sizes.argmax()).mean(0).astype(int)
    sl = tuple(slice(int(a) - 32, int(a) + 32) for a in c)
    prep = model.prepare(subj.image[(slice(None),) + sl], subj.spacing)
    x = torch.from_numpy(prep.x)
    grid = model.grid(x.shape[1:])
    with torch.inference_mode(), record_layer_sums(model, model.cam_layer) as rec:
        logits = sliding_window_logits(model.network, x[None], grid, 2)
    sums = rec.per_member(grid.n_windows, 2)
    iset = find_instances(model.segment(prep.probabilities(logits[0].numpy())),
                          subj.mask[sl], np.eye(4), subj.spacing)
    insts = sorted(iset.instances, key=lambda i: -i.voxels)[:3]
    targets = [InstanceTarget(iset.mask(i), model.lesion_class) for i in insts]
    out = {}
    for legacy in (True, False):
        legacy_switch(legacy)
        out[legacy] = (smoothgrad(model, x, targets, grid=grid, n_samples=1, sw_batch_size=2),
                       gradcampp(model, x, targets, model.cam_layer, grid=grid,
                                 sw_batch_size=2, layer_sums=sums))
    for k in range(len(targets)):
        assert _rel(out[False][0][k].maps["mean"].data, out[True][0][k].maps["mean"].data) < 1e-5
        assert _rel(out[False][1][k].maps["raw"].data, out[True][1][k].maps["raw"].data) < 1e-5


# --------------------------------------------------------------------------------- precision


def test_precision_checks_and_bf16_close():
    """Unknown precisions and unsupported devices are one-line errors; bf16 autocast on the
    CPU (when oneDNN supports it) gives maps close to fp32 but not equal."""
    net, x, targets, grid = _tiny_case()
    with pytest.raises(ValueError, match="precision must be one of"):
        smoothgrad(net, x, targets, grid=grid, n_samples=1, precision="fp8")
    with pytest.raises(ValueError, match="only available on cpu and cuda"):
        _speed.check_precision("bf16", "meta")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support")
    a = smoothgrad(net, x, targets[:1], grid=grid, n_samples=1)[0].maps["mean"].data
    b = smoothgrad(net, x, targets[:1], grid=grid, n_samples=1,
                   precision="bf16")[0].maps["mean"].data
    assert 0 < _rel(b, a) < 0.2


def test_explain_refuses_unsupported_precision(monkeypatch, tmp_path, capsys):
    """`explain --precision bf16` on a device that cannot run it: a one-line error, no run."""
    from instance_saliency import cli

    def no(precision, device):
        raise ValueError(f"precision {precision} is not supported on this CPU (test)")

    monkeypatch.setattr(_speed, "check_precision", no)
    rc = cli.main(["explain", "--flair", str(tmp_path / "f.nii.gz"), "--mprage",
                   str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "run"),
                   "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and "--precision bf16" in err[0] and "not supported" in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- helpers


def test_prefetch_keeps_order_and_raises():
    src = [torch.full((3,), float(i)) for i in range(5)]
    got = list(prefetch(iter(src), "cpu"))
    assert [float(t[0]) for t in got] == [0, 1, 2, 3, 4]

    def bad():
        yield torch.zeros(1)
        raise RuntimeError("boom")

    it = prefetch(bad(), "cpu")
    next(it)
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_instance_figure_png_unchanged_by_single_draw(tmp_path):
    """The lesion figure is drawn once (the canvas of the last layout draw is encoded): the
    PNG bytes equal those of savefig's own render."""
    import matplotlib

    from instance_saliency.report import figures

    rng = np.random.default_rng(0)
    flair = rng.normal(size=(30, 34, 28)).astype(np.float32)
    mask = np.zeros(flair.shape, bool)
    mask[12:17, 15:20, 12:15] = True
    sal = rng.normal(size=(2,) + flair.shape).astype(np.float32)
    figures.instance_figure(flair, mask, sal, (14, 17, 13), (1, 1, 1.2),
                            out_png=tmp_path / "a.png", signed=True, title="lesion 1")
    orig = figures._save

    def savefig_always(fig, out_png, dpi=figures._DPI, rendered=False):
        return orig(fig, out_png, dpi, rendered=False)

    figures._save = savefig_always
    try:
        figures.instance_figure(flair, mask, sal, (14, 17, 13), (1, 1, 1.2),
                                out_png=tmp_path / "b.png", signed=True, title="lesion 1")
    finally:
        figures._save = orig
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert matplotlib.get_backend()  # imported


# ------------------------------------------------------------------------ GPU check dry run


@needs_data
def test_gpu_check_dry_run():
    """benchmarks/gpu_check.sh --dry-run (CPU, 48³ crop, N = 2, 3 lesions): prints the wall
    time, the goal, the peak-memory column and the difference to the CPU maps; fp32 ≈ 0."""
    env = dict(os.environ, PYTHON=sys.executable, INSTANCE_SALIENCY_DATA=str(DATA))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                        "--precisions", "fp32"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert "goal < 60 s" in out and "peak GPU memory" in out
    assert re.search(r"fp32: prediction [\d.]+ s \+ smoothgrad [\d.]+ s \+ gradcampp [\d.]+ s "
                     r"= [\d.]+ s", out)
    res = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    assert float(res["fp32_total_s"]) > 0
    assert res["fp32_peak_gb"] == "nan"  # no GPU in a dry run
    assert float(res["fp32_max_rel_diff"]) < 1e-5


def test_window_plan_from_crops_equals_from_masks():
    """Planning from MaskTargets' crops finds the same windows as from full masks (sliding),
    and patch mode still works from targets."""
    from instance_saliency.inference import WindowGrid
    from instance_saliency.saliency.engine import WindowPlan

    rng = np.random.default_rng(0)
    shape = (70, 60, 50)
    grid = WindowGrid.create(shape, (32, 32, 32), 0.25)
    targets = []
    for _ in range(12):
        c = rng.integers(0, shape)
        m = np.zeros(shape, bool)
        m[tuple(slice(max(0, a - int(r)), a + int(r)) for a, r in zip(c, rng.integers(1, 6, 3)))] = True
        m &= rng.random(shape) < 0.7
        if m.any():
            targets.append(MaskTarget(m))
    a = WindowPlan.create((t.mask for t in targets), shape, grid=grid)
    b = WindowPlan.create(targets, shape, grid=grid)
    assert a.target_windows == b.target_windows
    p1 = WindowPlan.create((t.mask for t in targets), shape, "patch", (32, 32, 32))
    p2 = WindowPlan.create(targets, shape, "patch", (32, 32, 32))
    assert p1.windows == p2.windows and p1.target_windows == p2.target_windows
