"""Instance SmoothGrad and instance Grad-CAM++ (instance_saliency.saliency): values, not shapes.

References used below: hand-computed gradients of a linear convolution, a hand/numpy Grad-CAM++
(Chattopadhay et al. 2018, eqs. 19-20, without the exp(T) factor), Captum's
``NoiseTunnel(Saliency)``, dense autograd through full sliding-window inference, and a forward-hook
Grad-CAM++ written here. Tolerances "relative" are relative to the largest magnitude of the
reference map (element-wise relative error is meaningless where gradients vanish).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instance_saliency.inference import WindowGrid, sliding_window_logits
from instance_saliency.models import DEFAULT_CAM_LAYER, build_model
from instance_saliency.saliency import gradcampp, gradcampp_weights, smoothgrad
from instance_saliency.targets import MaskTarget

ROI = (16, 16, 16)


# ----------------------------------------------------------------------------------- helpers


def _mask(shape, *boxes):
    """Bool mask with the union of boxes ``((x0, x1), (y0, y1), (z0, z1))`` (half-open)."""
    m = np.zeros(shape, bool)
    for b in boxes:
        m[tuple(slice(a, c) for a, c in b)] = True
    return m


def _input(shape, seed=0, C=2):
    return torch.randn((C,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def tiny_unet(seed=0):
    """MONAI UNet (4, 8, 16), eval mode, with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    m = build_model("unet3d", channels=(4, 8, 16), strides=(2, 2))
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm3d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return m.eval()


class TinyCamNet(nn.Module):
    """Conv net with a half-resolution layer ``act2`` (so CAMs need upsampling) and a skip."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Conv3d(2, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.down = nn.Conv3d(4, 6, 3, stride=2, padding=1)
        self.act2 = nn.LeakyReLU(0.1)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.head = nn.Conv3d(10, 2, 1)

    def forward(self, x):
        a = self.act1(self.enc(x))
        b = self.act2(self.down(a))
        return self.head(torch.cat([self.up(b), a], 1))


def dense(res, variant="mean"):
    return res.maps[variant].to_dense()


def assert_rel(actual, ref, rtol=1e-5):
    """``|actual - ref| <= rtol * max|ref|`` everywhere (and the reference is not all zero)."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 0, "reference is identically zero: the test would be vacuous"
    err = np.abs(actual - ref).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x {scale:.3g}"


def dense_grad(model, x, target, grid, sw_batch_size=4):
    """Input gradient of ``target`` through full sliding-window inference (autograd)."""
    xx = x.clone()[None].requires_grad_(True)
    logits = sliding_window_logits(model, xx, grid, sw_batch_size)
    (g,) = torch.autograd.grad(target(logits).sum(), xx)
    return g[0].numpy()


def gradcampp_weights_numpy(A, g):
    """Chattopadhay et al. 2018 eqs. 19-20 without exp(T), with explicit loops over channels.

    ``A``, ``g``: (N, K, *spatial); the N pieces are pooled as one map.
    """
    A = np.asarray(A, np.float64)
    g = np.asarray(g, np.float64)
    K = A.shape[1]
    w = np.zeros(K)
    for k in range(K):
        a_k = A[:, k].ravel()
        g_k = g[:, k].ravel()
        s = a_k.sum()
        for gi in g_k:
            if gi == 0:
                continue  # alpha = 0
            alpha = gi ** 2 / (2 * gi ** 2 + s * gi ** 3)
            w[k] += alpha * max(gi, 0.0)
    return w


# ------------------------------------------------ 1. analytic model: a single linear conv


def _conv_model(bias):
    conv = nn.Conv3d(2, 2, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.zero_()
        # output channel 1 (the lesion logit): a few asymmetric taps of both signs
        conv.weight[1, 0, 0, 1, 2] = 2.0
        conv.weight[1, 0, 1, 1, 1] = 0.5
        conv.weight[1, 1, 2, 0, 0] = -1.5
        conv.weight[1, 1, 1, 2, 1] = 0.25
        # output channel 0 must not matter
        conv.weight[0].fill_(7.0)
        if bias:
            conv.bias.copy_(torch.tensor([0.3, -0.7]))
    return conv


def _conv_gradient_by_hand(weight, mask, reduction):
    """d/dx of sum_{v in mask} out_1(v) for out_1(v) = sum_{c,k} W[1,c,k] x[c, v + k - 1]
    (zero padding): each mask voxel v sends W[1, c, k] to input voxel u = v + k - 1."""
    W = weight.detach().numpy()
    C = W.shape[1]
    shape = mask.shape
    g = np.zeros((C,) + shape)
    for v in np.argwhere(mask):
        for c in range(C):
            for k in np.argwhere(W[1, c] != 0):
                u = v + k - 1
                if np.all(u >= 0) and np.all(u < shape):
                    g[(c,) + tuple(u)] += W[(1, c) + tuple(k)]
    return g / mask.sum() if reduction == "mean" else g


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_smoothgrad_linear_conv_equals_hand_gradient(bias, reduction):
    shape = (6, 5, 4)
    conv = _conv_model(bias)
    # a corner voxel, an edge voxel and an interior pair: kernel taps fall off the scan
    mask = _mask(shape, ((0, 1), (0, 1), (0, 1)), ((5, 6), (2, 3), (3, 4)), ((2, 4), (2, 3), (1, 2)))
    hand = _conv_gradient_by_hand(conv.weight, mask, reduction)
    # spot checks written out by hand (mask voxels (0,0,0), (5,2,3), (2,2,1), (3,2,1); a mask
    # voxel v sends tap W[1, c, k] to input voxel v + k - 1):
    n = 1.0 if reduction == "sum" else 4.0
    expected = {
        (0, 0, 0, 0): 0.5,  # v = (0,0,0), k = (1,1,1); tap (0,1,2) falls off the scan
        (0, 1, 2, 2): 2.0,  # v = (2,2,1), k = (0,1,2)
        (0, 2, 2, 2): 2.0,  # v = (3,2,1), k = (0,1,2)
        (0, 2, 2, 1): 0.5,  # v = (2,2,1), k = (1,1,1)
        (1, 3, 1, 0): -1.5,  # v = (2,2,1), k = (2,0,0)
        (1, 0, 1, 0): 0.25,  # v = (0,0,0), k = (1,2,1)
        (1, 5, 3, 3): 0.25,  # v = (5,2,3), k = (1,2,1)
        (1, 1, 1, 1): 0.0,  # reached by no tap
    }
    for idx, val in expected.items():
        assert hand[idx] == pytest.approx(val / n), idx
    x = _input(shape, seed=3)
    (res,) = smoothgrad(conv, x, [MaskTarget(mask, reduction=reduction)], mode="whole",
                        n_samples=1, noise_level=0.0)
    np.testing.assert_allclose(dense(res), hand, rtol=1e-6, atol=1e-7)
    # the map lives on the input grid, one channel per input channel
    assert res.maps["mean"].shape == shape and res.n_windows == 1


def test_smoothgrad_linear_conv_is_noise_independent():
    """A linear model's gradient does not depend on the input: SmoothGrad = plain gradient."""
    shape = (6, 5, 4)
    conv = _conv_model(True)
    mask = _mask(shape, ((1, 4), (1, 3), (1, 3)))
    (res,) = smoothgrad(conv, _input(shape), [MaskTarget(mask)], mode="whole", n_samples=5,
                        noise_level=0.3, variants=("mean", "squared", "vargrad"))
    hand = _conv_gradient_by_hand(conv.weight, mask, "sum")
    np.testing.assert_allclose(dense(res), hand, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dense(res, "squared"), hand ** 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense(res, "vargrad"), 0.0, atol=1e-5)


# ---------------------------------------------------------------- 2. Grad-CAM++ weights


def test_gradcampp_weights_tiny_hand_numbers():
    # one channel, A = [[1, 2], [3, 4]] (sum 10), g = [[1, 0], [-1, 0.5]]:
    # g = 1   -> alpha = 1 / (2 + 10) = 1/12,          relu(g) = 1   -> 1/12
    # g = 0   -> alpha = 0
    # g = -1  -> relu(g) = 0
    # g = 0.5 -> alpha = 0.25 / (0.5 + 10 / 8) = 1/7, relu(g) = 0.5 -> 1/14
    A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    g = torch.tensor([[[[1.0, 0.0], [-1.0, 0.5]]]])
    w = gradcampp_weights(A, g)
    np.testing.assert_allclose(w.numpy(), [1 / 12 + 1 / 14], rtol=1e-6)


@pytest.mark.parametrize("spatial", [(3, 4), (3, 2, 4)], ids=["2d", "3d"])
def test_gradcampp_weights_match_numpy(spatial):
    gen = torch.Generator().manual_seed(1)
    N, K = 2, 3
    A = torch.randn((N, K) + spatial, generator=gen)
    A[:, 1] -= 2.0  # channel 1 has a negative activation sum: negative denominators occur
    g = torch.randn((N, K) + spatial, generator=gen)
    g[torch.rand(g.shape, generator=gen) < 0.3] = 0.0  # exact zeros -> alpha = 0
    g[:, 2] = -g[:, 2].abs()  # channel 2: no positive gradient -> weight exactly 0
    ref = gradcampp_weights_numpy(A, g)
    w = gradcampp_weights(A, g)
    assert w.shape == (K,)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert w[2].item() == 0.0
    # pooling: the N pieces form one map, not N separate ones
    flat = A.transpose(0, 1).reshape(1, K, -1)
    np.testing.assert_allclose(gradcampp_weights(flat, g.transpose(0, 1).reshape(1, K, -1)),
                               w.numpy(), rtol=1e-6)


def _hook_gradcampp(model, x, target, layer, logits_fn):
    """Reference Grad-CAM++: forward hook records the layer output of each forward call,
    autograd.grad of the target w.r.t. the recorded activations."""
    acts = []
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        logits = logits_fn(model, x[None])
    finally:
        h.remove()
    grads = torch.autograd.grad(target(logits).sum(), acts)
    return [a.detach() for a in acts], [gg.detach() for gg in grads]


def test_gradcampp_whole_mode_equals_hook_reference():
    model = TinyCamNet().eval()
    shape = (10, 12, 8)
    x = _input(shape, seed=5)
    mask = _mask(shape, ((3, 6), (4, 8), (2, 5)))
    tg = MaskTarget(mask)
    acts, grads = _hook_gradcampp(model, x, tg, "act2", lambda m, xb: m(xb))
    A, g = acts[0], grads[0]  # (1, 6, 5, 6, 4)
    assert A.shape[2:] == (5, 6, 4)
    w = gradcampp_weights_numpy(A, g)
    lin = torch.einsum("k,bk...->b...", torch.from_numpy(w).float(), A)[:, None]
    up = dict(size=shape, mode="trilinear", align_corners=False)
    cam = F.interpolate(F.relu(lin), **up)[0, 0]  # ReLU(sum_k w_k A_k), then upsample
    cam_signed = F.interpolate(lin, **up)[0, 0]
    (res,) = gradcampp(model, x, [tg], "act2", mode="whole", signed=True)
    np.testing.assert_allclose(res.weights, w, rtol=1e-5, atol=1e-8)
    raw, signed = dense(res, "raw")[0], dense(res, "signed")[0]
    assert_rel(raw, cam.numpy(), 1e-5)
    assert_rel(signed, cam_signed.numpy(), 1e-5)
    # the ReLU acts before upsampling: raw >= ReLU(signed), strictly where a zero crossing is
    # interpolated (the case must occur here, or the order would not be tested)
    assert (signed < 0).any()
    assert np.all(raw >= np.maximum(signed, 0) - 1e-6)
    assert np.abs(raw - np.maximum(signed, 0)).max() > 1e-3 * raw.max()


def test_gradcampp_sliding_mode_equals_hook_reference():
    """Sliding mode: the windows touching the instance are pooled for the weights and their
    maps are blended with the Gaussian importance of those windows only."""
    from monai.data.utils import compute_importance_map

    model = TinyCamNet(seed=2).eval()
    shape = (20, 18, 16)  # windows start at x in {0, 4}, y in {0, 2}
    x = _input(shape, seed=6)
    # touches only the windows with x start 4 (x >= 16), all y starts
    mask = _mask(shape, ((17, 19), (5, 9), (6, 9)))
    tg = MaskTarget(mask)
    grid = WindowGrid.create(shape, ROI, 0.25)
    starts = [tuple(int(a) for a in s) for s in grid.starts]
    acts, grads = _hook_gradcampp(model, x, tg, "act2",
                                  lambda m, xb: sliding_window_logits(m, xb, grid, 1))
    touching = [i for i, st in enumerate(starts)
                if mask[tuple(slice(a, a + r) for a, r in zip(st, ROI))].any()]
    assert sorted(starts[i] for i in touching) == [(4, 0, 0), (4, 2, 0)]
    w = gradcampp_weights_numpy(torch.cat([acts[i] for i in touching]),
                                torch.cat([grads[i] for i in touching]))
    imp = compute_importance_map(ROI, mode="gaussian", sigma_scale=0.125).double()
    num = torch.zeros(shape, dtype=torch.float64)
    den = torch.zeros(shape, dtype=torch.float64)
    for i in touching:
        cam = F.relu(torch.einsum("k,k...->...", torch.from_numpy(w).float(), acts[i][0]))
        cam = F.interpolate(cam[None, None], size=ROI, mode="trilinear", align_corners=False)[0, 0]
        sl = tuple(slice(a, a + r) for a, r in zip(starts[i], ROI))
        num[sl] += imp * cam.double()
        den[sl] += imp
    ref = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).numpy()
    (res,) = gradcampp(model, x, [tg], "act2", roi_size=ROI, sw_batch_size=3)
    assert res.n_windows == 2
    np.testing.assert_allclose(res.weights, w, rtol=1e-5, atol=1e-8)
    assert_rel(dense(res, "raw")[0], ref, 1e-5)


def test_hirescam_equals_hook_reference_whole_and_sliding():
    """Instance HiResCAM (Draelos & Carin 2020): ReLU(Σ_k g_k ⊙ A_k) per window, upsampled and
    blended like Grad-CAM++; in whole mode one window, in sliding mode the touching windows."""
    from monai.data.utils import compute_importance_map

    from instance_saliency.saliency import hirescam

    model = TinyCamNet(seed=3).eval()
    shape = (10, 12, 8)
    x = _input(shape, seed=7)
    tg = MaskTarget(_mask(shape, ((3, 6), (4, 8), (2, 5))))
    acts, grads = _hook_gradcampp(model, x, tg, "act2", lambda m, xb: m(xb))
    prod = (grads[0] * acts[0])[0].sum(0)
    up = dict(size=shape, mode="trilinear", align_corners=False)
    ref = F.interpolate(F.relu(prod)[None, None], **up)[0, 0].numpy()
    (res,) = hirescam(model, x, [tg], "act2", mode="whole", signed=True)
    assert res.method == "hirescam"
    assert_rel(dense(res, "raw")[0], ref, 1e-5)
    assert_rel(dense(res, "signed")[0], F.interpolate(prod[None, None], **up)[0, 0].numpy(), 1e-5)
    np.testing.assert_allclose(res.weights, (grads[0] * acts[0])[0].sum((1, 2, 3)).numpy(),
                               rtol=1e-5, atol=1e-8)
    # HiResCAM differs from Grad-CAM++ on the same target (no spatial averaging of g)
    (cpp,) = gradcampp(model, x, [tg], "act2", mode="whole")
    assert np.abs(dense(cpp, "raw") - dense(res, "raw")).max() > 1e-3 * dense(res, "raw").max()

    shape = (20, 18, 16)
    x = _input(shape, seed=8)
    model = TinyCamNet(seed=2).eval()
    tg = MaskTarget(_mask(shape, ((17, 19), (5, 9), (6, 9))))
    grid = WindowGrid.create(shape, ROI, 0.25)
    starts = [tuple(int(a) for a in s) for s in grid.starts]
    acts, grads = _hook_gradcampp(model, x, tg, "act2",
                                  lambda m, xb: sliding_window_logits(m, xb, grid, 1))
    touching = [i for i, st in enumerate(starts)
                if tg.mask[tuple(slice(a, a + r) for a, r in zip(st, ROI))].any()]
    imp = compute_importance_map(ROI, mode="gaussian", sigma_scale=0.125).double()
    (res,) = hirescam(model, x, [tg], "act2", roi_size=ROI, sw_batch_size=3, signed=True)
    assert res.n_windows == len(touching) == 2
    for variant, act in (("raw", F.relu), ("signed", lambda t: t)):
        num = torch.zeros(shape, dtype=torch.float64)
        den = torch.zeros(shape, dtype=torch.float64)
        for i in touching:
            cam = act((grads[i] * acts[i])[0].sum(0))
            cam = F.interpolate(cam[None, None], size=ROI, mode="trilinear",
                                align_corners=False)[0, 0]
            sl = tuple(slice(a, a + r) for a, r in zip(starts[i], ROI))
            num[sl] += imp * cam.double()
            den[sl] += imp
        ref = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).numpy()
        assert_rel(dense(res, variant)[0], ref, 1e-5)


# ------------------------------------------------------------- 3. agreement with Captum


@pytest.mark.parametrize("reduction,space", [("sum", "logit"), ("mean", "prob")])
def test_smoothgrad_equals_captum_noise_tunnel(monkeypatch, reduction, space):
    from captum.attr import NoiseTunnel, Saliency

    model = tiny_unet(seed=1)
    shape = (20, 18, 16)
    x = _input(shape, seed=7)
    grid = WindowGrid.create(shape, ROI, 0.25)
    mask = _mask(shape, ((8, 13), (6, 11), (4, 7)))  # spans all four windows
    tg = MaskTarget(mask, reduction=reduction, space=space)
    N, stdev, seed = 4, 0.3, 1234

    def wrapper(xb):
        return tg(sliding_window_logits(model, xb, grid))

    # Captum draws its noise with torch.normal(0, stdev tensor of the expanded input shape)
    # from the global RNG (captum/attr/_core/noise_tunnel.py, _add_noise_to_input).
    torch.manual_seed(seed)
    noise = torch.normal(0, torch.tensor(stdev).repeat((N, 2) + shape))
    seen = []
    original = NoiseTunnel._add_noise_to_input

    def spy(inp, sd, n):
        out = original(inp, sd, n)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(NoiseTunnel, "_add_noise_to_input", staticmethod(spy))
    torch.manual_seed(seed)
    ref = NoiseTunnel(Saliency(wrapper)).attribute(
        x[None], nt_type="smoothgrad", nt_samples=N, stdevs=stdev, abs=False)[0]
    # the reproduction of Captum's noise is checked, not assumed
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], x[None] + noise, rtol=0, atol=0)

    (res,) = smoothgrad(model, x, [tg], roi_size=ROI, noise=noise, batch_size=3)
    assert_rel(dense(res), ref.detach().numpy(), 1e-5)

    # second reference: Captum's plain Saliency on each noisy input, averaged
    sal = Saliency(wrapper)
    avg = sum(sal.attribute((x + noise[i])[None].requires_grad_(), abs=False)[0]
              for i in range(N)) / N
    assert_rel(dense(res), avg.detach().numpy(), 1e-5)


# ------------------------------------- 4. window-sparse exact mode = dense sliding gradient

GEOMETRIES = {
    # (30, 24, 12): window starts x in {0, 12, 14}, y in {0, 8}; z padded 12 -> 16 (2 before)
    "padded_z": ((30, 24, 12), (0, 0, 2), {(0, 0, 0), (0, 8, 0), (12, 0, 0), (12, 8, 0),
                                           (14, 0, 0), (14, 8, 0)}, [
        ((0, 2), (0, 2), (0, 2)),  # scan corner
        ((28, 30), (22, 24), (10, 12)),  # opposite corner (next to the z padding)
        ((15, 17), (7, 9), (5, 7)),  # straddles window borders in x and y
        ((4, 27), (10, 12), (5, 6)),  # thin, spans every x window
        ((11, 12), (15, 16), (0, 1)),  # single voxel on a border, z edge
    ]),
    # (13, 20, 16): x padded 13 -> 16 (1 before, 2 after); y windows {0, 4}
    "padded_x": ((13, 20, 16), (1, 0, 0), {(0, 0, 0), (0, 4, 0)}, [
        ((12, 13), (19, 20), (15, 16)),  # last corner
        ((0, 13), (3, 5), (7, 9)),  # the whole x extent
    ]),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_sliding_mode_equals_dense_sliding_window_gradient(geometry):
    shape, pad_before, starts, boxes = GEOMETRIES[geometry]
    grid = WindowGrid.create(shape, ROI, 0.25)
    # the geometry the instances were placed against (padded coordinates)
    assert tuple(grid.pad_before) == pad_before
    assert {tuple(int(a) for a in s) for s in grid.starts} == starts
    model = tiny_unet(seed=2)
    x = _input(shape, seed=8)
    targets = []
    for i, b in enumerate(boxes):
        m = _mask(shape, b)
        targets += [MaskTarget(m, reduction="sum", name=f"{i}s"),
                    MaskTarget(m, reduction="mean", name=f"{i}m"),
                    MaskTarget(m, reduction="sum", space="prob", name=f"{i}ps")]
    targets.append(MaskTarget(_mask(shape, *boxes[:2]), reduction="mean", space="prob",
                              name="pm"))
    res = smoothgrad(model, x, targets, roi_size=ROI, n_samples=1, noise_level=0.0,
                     sw_batch_size=2)
    assert [r.name for r in res] == [t.name for t in targets]
    for tg, r in zip(targets, res):
        ref = dense_grad(model, x, tg, grid)
        assert_rel(dense(r), ref, 1e-5)
        # the map is zero outside the region stored, as the dense gradient is
        region = r.maps["mean"].region
        outside = np.ones(shape, bool)
        outside[region] = False
        assert np.all(ref[:, outside] == 0)


def test_sliding_window_logits_equals_monai():
    """The dense reference above differentiates this function: it must be MONAI's inference."""
    from monai.inferers import sliding_window_inference

    model = tiny_unet(seed=2)
    shape = (30, 24, 12)
    x = _input(shape, seed=9)[None]
    with torch.no_grad():
        ours = sliding_window_logits(model, x, WindowGrid.create(shape, ROI, 0.25), 3)
        ref = sliding_window_inference(x, ROI, 3, model, overlap=0.25, mode="gaussian")
    assert_rel(ours.numpy(), ref.numpy(), 1e-5)


# ----------------------------------------------------------------------- 5. invariances


@pytest.fixture(scope="module")
def inv_setup():
    shape = (20, 18, 16)
    model = tiny_unet(seed=3)
    x = _input(shape, seed=10)
    masks = [_mask(shape, ((2, 5), (2, 4), (3, 6))), _mask(shape, ((14, 19), (10, 16), (9, 12))),
             _mask(shape, ((8, 12), (7, 10), (0, 2)))]
    targets = [MaskTarget(masks[0], name="a"), MaskTarget(masks[1], reduction="mean", name="b"),
               MaskTarget(masks[2], name="c")]
    return model, x, targets


VARIANTS = ("mean", "squared", "vargrad")


def test_chunked_equals_unchunked(inv_setup):
    model, x, targets = inv_setup
    kw = dict(roi_size=ROI, n_samples=4, noise_level=0.1, seed=5, variants=VARIANTS)
    r1 = smoothgrad(model, x, targets, batch_size=1, **kw)
    r3 = smoothgrad(model, x, targets, batch_size=3, **kw)
    r4 = smoothgrad(model, x, targets, batch_size=4, sw_batch_size=1, **kw)
    for a, b, c in zip(r1, r3, r4):
        for v in VARIANTS:
            assert a.maps[v].region == b.maps[v].region
            assert_rel(b.maps[v].data, a.maps[v].data, 1e-6)
            assert_rel(c.maps[v].data, a.maps[v].data, 1e-6)


def test_batched_targets_equal_one_at_a_time_and_order_free(inv_setup):
    model, x, targets = inv_setup
    kw = dict(roi_size=ROI, n_samples=2, noise_level=0.1, seed=1, variants=("mean", "squared"))
    together = smoothgrad(model, x, targets, **kw)
    unpacked = smoothgrad(model, x, targets, pack=False, sw_batch_size=2, **kw)
    alone = [smoothgrad(model, x, [t], **kw)[0] for t in targets]
    rev = smoothgrad(model, x, targets[::-1], **kw)[::-1]
    for a, b, c, d in zip(together, alone, rev, unpacked):
        assert a.name == b.name == c.name == d.name
        for v in ("mean", "squared"):
            assert_rel(a.maps[v].to_dense(), b.maps[v].to_dense(), 1e-6)
            assert_rel(c.maps[v].to_dense(), b.maps[v].to_dense(), 1e-6)
            assert_rel(d.maps[v].to_dense(), b.maps[v].to_dense(), 1e-6)
    # Grad-CAM++ likewise
    layer = DEFAULT_CAM_LAYER["unet3d"]
    together = gradcampp(model, x, targets, layer, roi_size=ROI)
    alone = [gradcampp(model, x, [t], layer, roi_size=ROI)[0] for t in targets]
    rev = gradcampp(model, x, targets[::-1], layer, roi_size=ROI)[::-1]
    for a, b, c in zip(together, alone, rev):
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(c.weights, b.weights, rtol=1e-6, atol=1e-9)
        assert_rel(dense(a, "raw"), dense(b, "raw"), 1e-6)
        assert_rel(dense(c, "raw"), dense(b, "raw"), 1e-6)


def test_patch_equals_sliding_when_roi_covers_the_scan():
    shape = ROI  # a single window, no padding
    model = tiny_unet(seed=4)
    x = _input(shape, seed=11)
    targets = [MaskTarget(_mask(shape, ((1, 4), (5, 9), (10, 15)))),
               MaskTarget(_mask(shape, ((12, 16), (0, 2), (7, 8))), reduction="mean"),
               MaskTarget(_mask(shape, ((6, 8), (6, 8), (6, 8))), space="prob")]
    kw = dict(roi_size=ROI, n_samples=2, noise_level=0.1, variants=VARIANTS)
    sl = smoothgrad(model, x, targets, mode="sliding", **kw)
    pa = smoothgrad(model, x, targets, mode="patch", **kw)
    wh = smoothgrad(model, x, targets, mode="whole", **kw)
    for a, b, c in zip(sl, pa, wh):
        for v in VARIANTS:
            assert_rel(b.maps[v].to_dense(), a.maps[v].to_dense(), 1e-6)
            assert_rel(c.maps[v].to_dense(), a.maps[v].to_dense(), 1e-6)
    layer = DEFAULT_CAM_LAYER["unet3d"]
    lin = targets[:2]
    sl = gradcampp(model, x, lin, layer, mode="sliding", roi_size=ROI)
    pa = gradcampp(model, x, lin, layer, mode="patch", roi_size=ROI)
    for a, b in zip(sl, pa):
        np.testing.assert_allclose(b.weights, a.weights, rtol=1e-6, atol=1e-9)
        assert_rel(dense(b, "raw"), dense(a, "raw"), 1e-6)


def test_seed_determinism_and_variant_identities(inv_setup):
    model, x, targets = inv_setup
    kw = dict(roi_size=ROI, n_samples=3, noise_level=0.2, variants=VARIANTS)
    a = smoothgrad(model, x, targets[:2], seed=7, **kw)
    b = smoothgrad(model, x, targets[:2], seed=7, **kw)
    c = smoothgrad(model, x, targets[:2], seed=8, **kw)
    for ra, rb, rc in zip(a, b, c):
        for v in VARIANTS:
            np.testing.assert_array_equal(ra.maps[v].data, rb.maps[v].data)  # bitwise
        assert not np.allclose(ra.maps["mean"].data, rc.maps["mean"].data, rtol=1e-3, atol=0)
        mean, sq, var = (ra.maps[v].data.astype(np.float64) for v in VARIANTS)
        assert np.all(sq >= 0) and np.all(var >= 0)
        np.testing.assert_allclose(var, np.maximum(sq - mean ** 2, 0), rtol=0,
                                   atol=1e-6 * sq.max())
        assert np.all(sq >= mean ** 2 - 1e-6 * sq.max())  # Jensen
        assert var.max() > 0  # noise does change a non-linear model's gradient
    # one noise sample: squared = mean^2 and vargrad = 0 exactly (up to float32 rounding)
    (one,) = smoothgrad(model, x, targets[:1], roi_size=ROI, n_samples=1, noise_level=0.2,
                        variants=VARIANTS)
    m = one.maps["mean"].data.astype(np.float64)
    np.testing.assert_allclose(one.maps["squared"].data, m ** 2, rtol=1e-6, atol=1e-12)
    assert np.abs(one.maps["vargrad"].data).max() <= 1e-6 * (m ** 2).max()


def test_explicit_noise_matches_seeded_noise(inv_setup):
    """``noise=`` and the seeded generator give the same maps for the same noise tensor."""
    from instance_saliency.saliency.base import draw_noise, noise_sigma

    model, x, targets = inv_setup
    sig = noise_sigma(x, 0.1)
    assert torch.allclose(sig, 0.1 * (x[0].max() - x[0].min()).repeat(2))
    noise = torch.stack(list(draw_noise(tuple(x.shape), sig, 3, seed=4)))
    kw = dict(roi_size=ROI, variants=("mean", "squared"))
    a = smoothgrad(model, x, targets[:1], n_samples=3, noise_level=0.1, seed=4, **kw)[0]
    b = smoothgrad(model, x, targets[:1], noise=noise, **kw)[0]
    for v in ("mean", "squared"):
        np.testing.assert_array_equal(a.maps[v].data, b.maps[v].data)


# --------------------------------------------------------------------- 6. maxabs aggregation


def test_maxabs_equals_brute_force():
    shape = (20, 18, 12)
    model = tiny_unet(seed=5)
    x = _input(shape, seed=12)
    grid = WindowGrid.create(shape, ROI, 0.25)
    mask = _mask(shape, ((9, 11), (7, 9), (5, 6)))  # 4 voxels, straddling window borders
    tg = MaskTarget(mask)
    (res,) = smoothgrad(model, x, [tg], roi_size=ROI, n_samples=1, noise_level=0.0,
                        aggregation="maxabs")
    assert res.n_windows == 4
    xx = x.clone()[None].requires_grad_(True)
    logits = sliding_window_logits(model, xx, grid)
    per_voxel = []
    for v in np.argwhere(mask):
        (g,) = torch.autograd.grad(logits[(0, 1) + tuple(v)], xx, retain_graph=True)
        per_voxel.append(g[0].numpy().astype(np.float64))
    G = np.stack(per_voxel)  # (V, C, X, Y, Z)
    idx = np.abs(G).argmax(0)
    ref = np.take_along_axis(G, idx[None], 0)[0]
    out = dense(res).astype(np.float64)
    tol = 1e-5 * np.abs(G).max()
    # |map| is the largest |gradient| over lesion voxels, and the map takes one of their values
    # (robust to near-ties between gradients of opposite sign)
    np.testing.assert_allclose(np.abs(out), np.abs(G).max(0), rtol=0, atol=tol)
    assert np.all(np.abs(G - out[None]).min(0) <= tol)
    assert np.mean(np.abs(out - ref) <= tol) > 0.999
    # and it is not the target gradient (sum over voxels), which mixes signs
    assert np.abs(out - G.sum(0)).max() > 100 * tol


def test_maxabs_rejects_nonlinear_targets():
    shape = ROI
    with pytest.raises(ValueError, match="maxabs"):
        smoothgrad(tiny_unet(), _input(shape), [MaskTarget(_mask(shape, ((1, 2),) * 3),
                                                           space="prob")],
                   roi_size=ROI, n_samples=1, aggregation="maxabs")


# ------------------------------------------------------------ 7. hook and state leakage


class RaiseOnCall(nn.Module):
    """Wraps a model; raises on the ``n``-th forward call (``n`` = 0: never)."""

    def __init__(self, inner, n=0):
        super().__init__()
        self.inner = inner
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("boom")
        return self.inner(x)


def _stateful_model(train, raise_on=0):
    inner = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                          nn.Dropout3d(0.5), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(4, 2, 1))
    torch.manual_seed(0)
    model = RaiseOnCall(inner, raise_on)
    model.train(train)
    if train:
        inner[3].eval()  # a mixed train/eval state must come back exactly
    else:
        inner[1].train()
    inner[0].weight.requires_grad_(False)  # a mix of requires_grad flags
    inner[4].bias.requires_grad_(False)
    inner[0].bias.grad = torch.full_like(inner[0].bias, 3.0)  # pre-set gradients
    inner[4].weight.grad = torch.ones_like(inner[4].weight)
    return model


def _snapshot(model, x):
    params = list(model.parameters())
    return dict(
        training={n: m.training for n, m in model.named_modules()},
        req=[p.requires_grad for p in params],
        grad_ids=[None if p.grad is None else id(p.grad) for p in params],
        grad_vals=[None if p.grad is None else p.grad.clone() for p in params],
        state={k: v.clone() for k, v in model.state_dict().items()},
        x=x.detach().clone(), x_req=x.requires_grad,
    )


def _assert_unchanged(model, x, snap):
    from torch.nn.modules import module as module_mod

    for name, m in model.named_modules():
        assert not m._forward_hooks, name
        assert not m._forward_pre_hooks, name
        assert not m._backward_hooks, name
        assert not getattr(m, "_backward_pre_hooks", {}), name
    assert not module_mod._global_forward_hooks
    assert not module_mod._global_backward_hooks
    assert {n: m.training for n, m in model.named_modules()} == snap["training"]
    params = list(model.parameters())
    assert [p.requires_grad for p in params] == snap["req"]
    for p, gid, gv in zip(params, snap["grad_ids"], snap["grad_vals"]):
        if gid is None:
            assert p.grad is None
        else:
            assert id(p.grad) == gid and torch.equal(p.grad, gv)
    for k, v in model.state_dict().items():  # incl. batch-norm running statistics
        assert torch.equal(v, snap["state"][k]), k
    assert torch.equal(x, snap["x"]) and x.requires_grad == snap["x_req"]
    assert x.grad is None


SHAPE7 = (16, 16, 20)  # two sliding windows


def _run_smoothgrad(model, x, target):
    return smoothgrad(model, x, [target], roi_size=ROI, n_samples=2, noise_level=0.1,
                      batch_size=1, sw_batch_size=1, variants=VARIANTS)


def _run_gradcampp(model, x, target, layer="inner.2"):
    return gradcampp(model, x, [target], layer, roi_size=ROI, sw_batch_size=1)


class SharedAct(nn.Module):
    """One ReLU module applied twice per forward: not a valid Grad-CAM++ layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv3d(3, 2, 1)

    def forward(self, x):
        return self.conv2(self.act(self.act(self.conv1(x)) - 0.1))


FAILURES = [(m, f) for m in ("smoothgrad", "gradcampp")
            for f in (None, "forward", "target_shape", "target_kind")]
FAILURES += [("gradcampp", "layer"), ("gradcampp", "layer_reused")]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method,failure", FAILURES)
def test_no_state_leaks(method, train, failure):
    model = _stateful_model(train, raise_on=2 if failure == "forward" else 0)
    x = _input(SHAPE7, seed=13).requires_grad_(train)  # both a leaf that requires grad and not
    mask = _mask(SHAPE7, ((6, 9), (6, 9), (8, 12)))  # in both windows
    target = MaskTarget(mask)
    if failure == "target_shape":
        target = MaskTarget(_mask((16, 16, 16), ((1, 3),) * 3))
    if failure == "target_kind":
        target = MaskTarget(mask, space="prob")
    snap = _snapshot(model, x)
    run = _run_smoothgrad if method == "smoothgrad" else _run_gradcampp
    if failure == "layer":
        with pytest.raises(ValueError, match="no layer"):
            _run_gradcampp(model, x, target, layer="inner.99")
    elif failure == "layer_reused":
        model.inner = SharedAct().train(train)
        model.inner.conv1.bias.grad = torch.ones(3)
        model.inner.conv2.weight.requires_grad_(False)
        snap = _snapshot(model, x)
        with pytest.raises(ValueError, match="2 times"):
            _run_gradcampp(model, x, target, layer="inner.act")
    elif failure == "forward":
        with pytest.raises(RuntimeError, match="boom"):
            run(model, x, target)
        assert model.calls == 2
    elif failure == "target_shape":
        with pytest.raises(ValueError, match="shape"):
            run(model, x, target)
    elif failure == "target_kind":
        if method == "gradcampp":
            with pytest.raises(ValueError, match="linear"):
                run(model, x, target)
        else:  # a non-linear target is valid for SmoothGrad, but not with maxabs
            with pytest.raises(ValueError, match="maxabs"):
                smoothgrad(model, x, [target], roi_size=ROI, n_samples=1,
                           aggregation="maxabs")
    else:
        (res,) = run(model, x, target)
        key = "mean" if method == "smoothgrad" else "raw"
        assert np.abs(res.maps[key].data).max() > 0
        # the model ran in eval mode inside: dropout (p = 0.5) off, batch-norm running stats
        # used, so repeated calls agree exactly
        (res2,) = run(model, x, target)
        np.testing.assert_array_equal(res.maps[key].data, res2.maps[key].data)
    _assert_unchanged(model, x, snap)


def test_input_as_numpy_is_not_modified():
    model = _stateful_model(False)
    x = _input(SHAPE7, seed=14).numpy()
    x0 = x.copy()
    smoothgrad(model, x, [MaskTarget(_mask(SHAPE7, ((2, 4),) * 3))], roi_size=ROI, n_samples=2,
               noise_level=0.5)
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------- 8. in-place activations (nnU-Net style)


@pytest.fixture(scope="module")
def nnunet_setup():
    torch.manual_seed(0)
    model = build_model("nnunet", filters=(4, 8, 16, 32, 32)).eval()
    shape = (32, 32, 32)
    x = _input(shape, seed=15)
    tg = MaskTarget(_mask(shape, ((10, 14), (12, 15), (8, 12)), ((20, 22), (3, 5), (25, 28))))
    return model, x, tg


def _tensor_hook_reference(model, x, tg, layer, inplace=True):
    """Weights and map from gradients captured by a tensor hook registered on the layer output
    inside a forward hook; activation values copied before anything downstream runs.
    ``inplace=False`` runs a copy of the model with out-of-place LeakyReLUs (same function)."""
    acts, grads = [], []

    def fwd_hook(_m, _i, out):
        acts.append(out.detach().clone())
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    model = copy.deepcopy(model)
    if not inplace:
        for m in model.modules():
            if isinstance(m, nn.LeakyReLU):
                m.inplace = False
    for p in model.parameters():
        p.requires_grad_(False)
    xx = x.clone()[None].requires_grad_(True)
    h = dict(model.named_modules())[layer].register_forward_hook(fwd_hook)
    try:
        grid = WindowGrid.create(x.shape[1:], (32, 32, 32), 0.25)
        logits = sliding_window_logits(model, xx, grid)
        torch.autograd.grad(tg(logits).sum(), xx)
    finally:
        h.remove()
    assert len(acts) == 1 and len(grads) == 1
    w = gradcampp_weights_numpy(acts[0], grads[0])
    cam = F.relu(torch.einsum("k,k...->...", torch.from_numpy(w).float(), acts[0][0]))
    cam = F.interpolate(cam[None, None], size=tuple(x.shape[1:]), mode="trilinear",
                        align_corners=False)[0, 0]
    return w, cam.numpy()


@pytest.mark.parametrize("layer", [DEFAULT_CAM_LAYER["nnunet"], "upsamples.2.conv_block.norm2"],
                         ids=["default", "feeds_inplace_lrelu"])
def test_gradcampp_nnunet_inplace_activations(nnunet_setup, layer):
    """Default layer: its output is produced by an in-place LeakyReLU. ``norm2``: its output is
    overwritten by the in-place LeakyReLU that follows, so the reference (a tensor hook cannot
    see the pre-in-place version of an instance-norm output, which is a view) runs an
    out-of-place copy of the net; Grad-CAM++ itself runs the in-place original."""
    model, x, tg = nnunet_setup
    w_ref, cam_ref = _tensor_hook_reference(model, x, tg, layer,
                                            inplace=layer == DEFAULT_CAM_LAYER["nnunet"])
    assert np.abs(w_ref).max() > 0
    (res,) = gradcampp(model, x, [tg], layer, roi_size=(32, 32, 32))
    np.testing.assert_allclose(res.weights, w_ref, rtol=1e-5, atol=1e-7)
    assert_rel(dense(res, "raw")[0], cam_ref, 1e-5)
    # the module's in-place flags are left alone
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.LeakyReLU))


def test_patch_window_phase_matches_dominant_sliding_window():
    """Patch windows keep the stride phase of the sliding window weighing most on the lesion."""
    from instance_saliency.inference import WindowGrid
    from instance_saliency.saliency.engine import WindowPlan, _dominant_window

    shape, roi = (100, 90, 80), (32, 32, 32)
    grid = WindowGrid.create(shape, roi, 0.25)
    rng = np.random.default_rng(3)
    masks = []
    for _ in range(12):
        m = np.zeros(shape, bool)
        c = [int(rng.integers(2, s - 6)) for s in shape]
        m[c[0]:c[0] + 4, c[1]:c[1] + 3, c[2]:c[2] + 5] = True
        masks.append(m)
    plan = WindowPlan.create(masks, shape, "patch", roi, grid=grid, patch_alignment=16)
    for m, (w,) in zip(masks, plan.target_windows):
        start, size = plan.windows[w]
        dom = _dominant_window(grid, m)
        for a in range(3):
            got = (start[a] - plan.pad_before[a]) % 16
            want = (int(grid.starts[dom][a]) - grid.pad_before[a]) % 16
            assert got == want
        img_sl, _ = plan.window_image_part(w)
        assert m[img_sl].sum() == m.sum()  # the lesion lies inside its patch
    # the dominant window carries the largest blend weight (brute force)
    m = masks[0]
    weights = []
    for w in range(grid.n_windows):
        full = torch.zeros(grid.padded_shape)
        full[grid.window_slices(w)] = grid.importance / grid.norm[grid.window_slices(w)]
        weights.append(float(grid.crop(full).numpy()[m].sum()))
    assert _dominant_window(grid, m) == int(np.argmax(weights))
