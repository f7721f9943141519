"""Ensembles and test-time mirroring: exact instance gradients of the averaged model.

The reference differentiates, with autograd, the float32 sliding-window logits built window by
window from the grid's positions and Gaussian: in every window the members' outputs
``flip(net(flip(x_w)))`` are averaged, blended with ``imp / Σ imp`` and summed over the
instance. The engine must match it without ever building that graph."""

import numpy as np
import pytest
import torch

from instance_saliency.inference import WindowGrid, sliding_window_logits
from instance_saliency.models import from_module, mirror_combinations
from instance_saliency.saliency import gradcampp, smoothgrad
from instance_saliency.targets import InstanceTarget


def _net(seed: int, c_in: int = 2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(c_in, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return net.eval()


def _reference_logits(nets, axes, x, grid):
    """Per window: mean over nets and flip combinations of flip(net(flip(x_w))); blended."""
    combos = mirror_combinations(axes)
    xp = grid.pad(x)
    acc = torch.zeros((1, 2) + grid.padded_shape)
    for w in range(grid.n_windows):
        sl = (slice(None), slice(None)) + grid.window_slices(w)
        xw = xp[sl]
        outs = []
        for net in nets:
            for c in combos:
                d = [a + 2 for a in c]
                outs.append(torch.flip(net(torch.flip(xw, d)), d) if c else net(xw))
        acc[sl] = acc[sl] + torch.stack(outs).mean(0) * grid.importance
    return grid.crop(acc / grid.norm)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    shape = (30, 26, 34)  # non-cubic: a swapped axis or flip shows
    x = torch.randn((2,) + shape)
    nets = [_net(1), _net(2)]
    axes = (0, 2)
    grid = WindowGrid.create(shape, (16, 16, 16), 0.5)
    masks = []
    m = np.zeros(shape, bool)
    m[6:11, 7:10, 14:19] = True  # straddles window borders (starts 0, 8, 16, ...)
    masks.append(m)
    m = np.zeros(shape, bool)
    m[20:24, 15:18, 2:5] = True
    m[22, 18, 5] = True
    masks.append(m)
    return x, nets, axes, grid, masks


def test_members_are_folds_times_mirrorings(setup):
    x, nets, axes, grid, masks = setup
    model = from_module(nets, mirror_axes=axes, roi_size=(16, 16, 16), overlap=0.5)
    assert len(model.members) == 2 * 4
    assert abs(sum(m.weight for m in model.members) - 1) < 1e-12
    assert [m.flip for m in model.members[:4]] == [(), (0,), (2,), (0, 2)]


def test_prediction_equals_window_by_window_average(setup):
    x, nets, axes, grid, masks = setup
    model = from_module(nets, mirror_axes=axes, roi_size=(16, 16, 16), overlap=0.5)
    with torch.no_grad():
        ours = sliding_window_logits(model.network, x[None], grid)
        ref = _reference_logits(nets, axes, x[None], grid)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_ensemble_gradient_equals_autograd_through_the_average(setup):
    x, nets, axes, grid, masks = setup
    model = from_module(nets, mirror_axes=axes, roi_size=(16, 16, 16), overlap=0.5)
    targets = [InstanceTarget(m) for m in masks]
    res = smoothgrad(model, x, targets, grid=grid, n_samples=1, noise_level=0.0)
    for t, r in zip(targets, res):
        xr = x[None].clone().requires_grad_(True)
        logits = _reference_logits(nets, axes, xr, grid)
        score = logits[0, 1][torch.from_numpy(t.mask)].sum()
        (g,) = torch.autograd.grad(score, xr)
        ours = torch.from_numpy(r.maps["mean"].to_dense())
        rel = (ours - g[0]).abs().max() / g[0].abs().max()
        assert rel <= 1e-5, float(rel)
        assert r.n_windows == len(grid.windows_touching(t.mask))


def test_single_member_model_equals_plain_module(setup):
    """Wrapping a module changes nothing: same maps as the module itself."""
    x, nets, axes, grid, masks = setup
    t = [InstanceTarget(masks[0])]
    a = smoothgrad(nets[0], x, t, grid=grid, n_samples=2, noise_level=0.05, seed=3)
    b = smoothgrad(from_module(nets[0]), x, t, grid=grid, n_samples=2, noise_level=0.05, seed=3)
    assert np.array_equal(a[0].maps["mean"].data, b[0].maps["mean"].data)


def test_gradcampp_of_mirrored_member_is_flipped_back(setup):
    """A member that mirrors every axis of a flip-equivariant net gives the same CAM as the
    plain net (the map is flipped back into the input's orientation)."""
    x, nets, axes, grid, masks = setup

    class Sym(torch.nn.Module):  # 1x1x1 convolutions: flip-equivariant
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv3d(2, 3, 1)
            self.b = torch.nn.Conv3d(3, 2, 1)

        def forward(self, z):
            return self.b(torch.relu(self.a(z)))

    torch.manual_seed(4)
    net = Sym().eval()
    t = [InstanceTarget(masks[0])]
    plain = gradcampp(net, x, t, "a", grid=grid)[0].maps["raw"].to_dense()
    mirrored = gradcampp(from_module(net, mirror_axes=(0, 1, 2)), x, t, "a",
                         grid=grid)[0].maps["raw"].to_dense()
    assert np.allclose(plain, mirrored, atol=1e-5 * np.abs(plain).max())
    assert np.abs(plain).max() > 0


# --- ensembles of folds with different histogram standards ----------------------------------

def _landmarks(rng, n_ch=2):
    """Increasing (C, 11) standards, as folds learn them on different training scans."""
    return [sorted((np.cumsum(rng.uniform(0.1, 0.6, 11)) - 2.5).round(4).tolist())
            for _ in range(n_ch)]


def _raw_image(rng, shape=(20, 18, 22)):
    """Two channels, skewed intensities, zero background outside an ellipsoid."""
    g = np.indices(shape).astype(float)
    inside = sum(((g[i] - s / 2) / (s / 2.3)) ** 2 for i, s in enumerate(shape)) < 1
    img = np.stack([rng.gamma(2.0 + c, 50.0, shape) for c in range(2)]).astype(np.float32)
    img[:, ~inside] = 0
    return img


def test_histogram_remap_reproduces_each_members_own_standardisation():
    """standardise(img, t) == remap_{s->t}(standardise(img, s)), background kept at zero,
    including intensities beyond the end landmarks (extended end segments)."""
    from instance_saliency.io import standardise_histogram
    from instance_saliency.models import HistogramRemap

    rng = np.random.default_rng(0)
    s, t = _landmarks(rng), _landmarks(rng)
    img = _raw_image(rng)
    img[0, 10, 9, 11] = 5000.0  # far above the 99th percentile
    a = torch.from_numpy(standardise_histogram(img, s))[None]
    b = standardise_histogram(img, t)
    out = HistogramRemap(s, t)(a)[0].numpy()
    assert np.abs(out - b).max() <= 1e-5 * np.abs(b).max()
    assert np.array_equal(out == 0, b == 0) and (b == 0).any()
    # identity remap is the identity; the gradient is the segment's slope
    x = a.clone().requires_grad_(True)
    HistogramRemap(s, s)(x).sum().backward()
    assert torch.allclose(HistogramRemap(s, s)(a), a)
    assert torch.allclose(x.grad[a != 0], torch.ones(()).expand(int((a != 0).sum())))
    with pytest.raises(ValueError):
        HistogramRemap(s, [row[::-1] for row in t])


def _hist_folder(root, name, net, landmarks, trained_on):
    from instance_saliency.models.checkpoint import ModelConfig, save_checkpoint

    cfg = ModelConfig("unet3d", {"channels": [4, 8, 16], "strides": [2, 2]},
                      normalisation="histogram", landmarks=landmarks, roi_size=[16, 16, 16],
                      overlap=0.5, trained_on=trained_on)
    save_checkpoint(root / name, net, cfg)
    return cfg


def test_checkpoint_ensemble_with_different_standards(tmp_path):
    """An ensemble folder whose folds learnt different histogram standards: its prediction is
    the mean of each fold's own pipeline (own standardisation), its instance gradient equals
    autograd through that average, and leaving folds out restores the kept fold's standard."""
    import json

    from instance_saliency.io import standardise_histogram
    from instance_saliency.models import load_model
    from instance_saliency.models.registry import build_model

    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    nets = [build_model("unet3d", channels=(4, 8, 16), strides=(2, 2)).eval()
            for _ in range(2)]
    lms = [_landmarks(rng), _landmarks(rng)]
    root = tmp_path / "ens"
    _hist_folder(root, "fold_a", nets[0], lms[0], ["s1"])
    _hist_folder(root, "fold_b", nets[1], lms[1], ["s2"])
    common = np.mean(lms, 0).round(6).tolist()
    cfg = json.loads((root / "fold_a" / "config.json").read_text())
    cfg.update(members=["fold_a", "fold_b"], landmarks=common, trained_on=["s1", "s2"])
    (root / "config.json").write_text(json.dumps(cfg))
    img = _raw_image(rng)
    model = load_model(root)
    prep = model.prepare(img, (1.0, 1.0, 1.0))
    assert np.allclose(prep.x, standardise_histogram(img, common))
    grid = model.grid(prep.x.shape[1:])
    x = torch.from_numpy(prep.x)
    with torch.no_grad():
        ours = sliding_window_logits(model.network, x[None], grid)
        own = [sliding_window_logits(n, torch.from_numpy(standardise_histogram(img, lm))[None],
                                     grid) for n, lm in zip(nets, lms)]
    ref = (own[0] + own[1]) / 2
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    # exact gradient of an instance target through the remapped average
    mask = np.zeros(prep.x.shape[1:], bool)
    mask[8:12, 7:10, 9:13] = True
    res = smoothgrad(model, x, [InstanceTarget(mask)], grid=grid, n_samples=1, noise_level=0.0)
    xr = x[None].clone().requires_grad_(True)
    score = sliding_window_logits(model.network, xr, grid)[0, 1][torch.from_numpy(mask)].sum()
    (g,) = torch.autograd.grad(score, xr)
    rel = (torch.from_numpy(res[0].maps["mean"].to_dense()) - g[0]).abs().max() / g.abs().max()
    assert rel <= 1e-5, float(rel)
    # the demo rule: folds trained on the scan are left out; the one left uses its own standard
    alone = load_model(root, exclude_subjects=["s1"])
    assert [m.name for m in alone.members] == ["fold_b"] and alone.members[0].input_map is None
    assert np.allclose(alone.prepare(img, (1.0, 1.0, 1.0)).x, standardise_histogram(img, lms[1]))
