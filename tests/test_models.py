"""Architectures, checkpoints and sliding-window inference (instance_saliency.models,
instance_saliency.inference). Tiny models and volumes only."""

from __future__ import annotations

import json
import os
import pickle
import shlex

import numpy as np
import pytest
import torch

from instance_saliency.errors import ModelError
from instance_saliency.inference import WindowGrid, predict_probability, sliding_window_logits
from instance_saliency.models import (
    ARCHITECTURES,
    CONFIG_NAME,
    DEFAULT_CAM_LAYER,
    WEIGHTS_NAME,
    ModelConfig,
    build_model,
    load_checkpoint,
    load_legacy_state_dict,
    save_checkpoint,
)

# small arguments and the smallest useful input of each architecture
SMALL = {
    "unet3d": ({"channels": (4, 8, 16), "strides": (2, 2)}, (16, 16, 16)),
    "nnunet": ({"filters": (4, 8, 16, 32, 32)}, (32, 32, 32)),
    # SwinUNETR needs sides divisible by 32 and more than one voxel at the 1/32 bottleneck
    # (instance norm): 32 x 32 x 64 is the smallest input; 64^3 took > 15 s on 2 busy cores
    "swin_unetr": ({"feature_size": 12}, (32, 32, 64)),
}


def _one_line(e: pytest.ExceptionInfo, *parts) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, msg
    return msg


def _tiny_unet():
    torch.manual_seed(0)
    return build_model("unet3d", channels=(4, 8, 16), strides=(2, 2))


# ------------------------------------------------------------------ architectures


def test_registry_and_cam_layers_cover_the_same_names():
    assert set(ARCHITECTURES) == {"unet3d", "nnunet", "swin_unetr"}
    assert set(DEFAULT_CAM_LAYER) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_backward_small(name):
    """Output (B, 2, *spatial), finite non-zero input gradients, CAM layer at 1/2 resolution."""
    kwargs, spatial = SMALL[name]
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    assert model.training  # returned as built, in train mode
    if name == "swin_unetr":  # only input gradients are needed: saves a third of the time
        for p in model.parameters():
            p.requires_grad_(False)
    layer = dict(model.named_modules())[DEFAULT_CAM_LAYER[name]]
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        b = 1 if name == "swin_unetr" else 2
        x = torch.randn(b, 2, *spatial, requires_grad=True)
        y = model(x)
        assert isinstance(y, torch.Tensor)
        assert tuple(y.shape) == (b, 2, *spatial)
        assert torch.isfinite(y).all()
        y[:, 1].sum().backward()
    finally:
        handle.remove()
    g = x.grad
    assert g is not None and g.shape == x.shape
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # the default Grad-CAM++ layer is the decoder level at half resolution
    assert len(seen) == 1
    assert seen[0][0] == x.shape[0] and seen[0][2:] == tuple(s // 2 for s in spatial)


@pytest.mark.parametrize("name, kwargs, spatial", [
    ("unet3d", {"channels": (3, 4, 5), "strides": (2, 2)}, (8, 8, 8)),
    ("nnunet", {"filters": (3, 4, 5), "strides": (1, 2, 2)}, (8, 8, 8)),
])
def test_input_gradient_matches_finite_differences(name, kwargs, spatial):
    """Train-mode (batch statistics) gradient w.r.t. the input equals a central difference."""
    torch.manual_seed(1)
    model = build_model(name, **kwargs).double()
    x = torch.randn(2, 2, *spatial, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, *spatial, dtype=torch.float64)

    def f(inp):
        return (model(inp) * w).sum()

    f(x).backward()
    v = torch.randn_like(x)
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    analytic = (x.grad * v).sum()
    assert float(analytic) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def test_unet3d_defaults():
    from monai.networks.blocks import ResidualUnit

    m = build_model("unet3d")
    assert tuple(m.channels) == (32, 64, 128, 256, 512)
    assert tuple(m.strides) == (2, 2, 2, 2)
    assert m.num_res_units == 0 and m.in_channels == 2 and m.out_channels == 2
    mods = list(m.modules())
    assert not any(isinstance(x, ResidualUnit) for x in mods)
    bn = [x for x in mods if isinstance(x, torch.nn.BatchNorm3d)]
    assert len(bn) > 0
    assert not any(isinstance(x, (torch.nn.InstanceNorm3d, torch.nn.GroupNorm)) for x in mods)
    # encoder widths, in order of the strided convolutions
    convs = [x for x in mods if isinstance(x, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs if c.stride == (2, 2, 2)] == [32, 64, 128, 256]
    assert sum(p.numel() for p in m.parameters()) > 4_000_000
    assert DEFAULT_CAM_LAYER["unet3d"] in dict(m.named_modules())


def test_nnunet_defaults():
    m = build_model("nnunet")
    mods = list(m.modules())
    norms = [x for x in mods if isinstance(x, torch.nn.InstanceNorm3d)]
    assert norms and all(n.affine for n in norms)
    assert not any(isinstance(x, torch.nn.BatchNorm3d) for x in mods)
    acts = [x for x in mods if isinstance(x, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 for a in acts)
    assert not any(isinstance(x, torch.nn.ReLU) for x in mods)
    assert list(m.strides) == [1, 2, 2, 2, 2]
    assert [c.stride for c in mods if isinstance(c, torch.nn.Conv3d) and c.stride != (1, 1, 1)
            ][:4] == [(2, 2, 2)] * 4
    assert m.filters == [32, 64, 128, 256, 320]
    assert m.deep_supervision is False
    assert DEFAULT_CAM_LAYER["nnunet"] in dict(m.named_modules())


def test_swin_unetr_defaults():
    m = build_model("swin_unetr")
    names = dict(m.named_modules())
    assert DEFAULT_CAM_LAYER["swin_unetr"] in names
    assert names["out"].conv.out_channels == 2
    assert m.swinViT.patch_embed.proj.in_channels == 2
    assert names["encoder1"].layer.conv1.conv.out_channels == 24  # feature_size 24


# ------------------------------------------------------------------ checkpoints


def _cfg(arch="unet3d", **args):
    return ModelConfig(architecture=arch, arguments=args, roi_size=[8, 8, 8], overlap=0.5,
                       threshold=0.4, training={"steps": 3, "note": "test"})


def _train_a_bit(model, spatial):
    """One gradient step and a train-mode forward: weights and running stats move.

    (Plain SGD by hand: constructing a torch.optim optimiser costs seconds of imports.)"""
    x = torch.randn(2, 2, *spatial)
    model.train()
    model(x)[:, 1].mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("arch, args", [
    ("unet3d", {"channels": [4, 8, 16], "strides": [2, 2]}),
    ("nnunet", {"filters": [3, 4, 5], "strides": [1, 2, 2]}),
])
def test_checkpoint_round_trip_exact(tmp_path, arch, args):
    torch.manual_seed(0)
    model = _train_a_bit(build_model(arch, **args), (8, 8, 8))
    cfg = _cfg(arch, **args)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, cfg)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded, cfg2 = load_checkpoint(folder)
    assert cfg2 == cfg
    assert not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    if arch == "unet3d":  # batch-norm running statistics travel too
        assert any("running_mean" in k and sd[k].abs().sum() > 0 for k in sd)
    else:  # DynUNet names each tensor twice (skip_layers): stored once, shared after loading
        from safetensors.torch import load_file

        stored = load_file(str(folder / WEIGHTS_NAME))
        assert len(stored) < len(sd)
        assert "skip_layers.downsample.conv1.conv.weight" in sd
        assert "skip_layers.downsample.conv1.conv.weight" not in stored
        assert (loaded.skip_layers.downsample.conv1.conv.weight
                is loaded.input_block.conv1.conv.weight)
    model.eval()
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # the config is plain JSON
    d = json.loads((folder / CONFIG_NAME).read_text())
    assert d["architecture"] == arch and d["arguments"] == args and d["threshold"] == 0.4


def test_save_checkpoint_overwrites_in_place(tmp_path):
    folder = tmp_path / "ckpt"
    a = _tiny_unet()
    save_checkpoint(folder, a, _cfg(channels=[4, 8, 16], strides=[2, 2]))
    torch.manual_seed(5)
    b = build_model("unet3d", channels=(4, 8, 16), strides=(2, 2))
    save_checkpoint(folder, b, _cfg(channels=[4, 8, 16], strides=[2, 2]))
    loaded, _ = load_checkpoint(folder)
    for k, v in b.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, _tiny_unet(), _cfg(channels=[4, 8, 16], strides=[2, 2]))
    return folder


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS_NAME))


def _write_state(folder, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))


def test_error_missing_folder(tmp_path):
    with pytest.raises(ModelError) as e:
        load_checkpoint(tmp_path / "nope")
    _one_line(e, tmp_path / "nope", "not found")


def test_error_missing_config(ckpt):
    (ckpt / CONFIG_NAME).unlink()
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt, CONFIG_NAME)


def test_error_missing_weights(ckpt):
    (ckpt / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt, WEIGHTS_NAME)


@pytest.mark.parametrize("text", ['{"architecture": "unet3d",', "", "not json", "{'a': 1}"])
def test_error_invalid_json(ckpt, text):
    (ckpt / CONFIG_NAME).write_text(text)
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / CONFIG_NAME, "not valid JSON")


@pytest.mark.parametrize("cfg, part", [
    ([1, 2], "expected a JSON object"),
    ({"arguments": {}}, "missing key 'architecture'"),
    ({"architecture": "unet3d", "colour": "red"}, "unknown keys ['colour']"),
])
def test_error_bad_config_object(ckpt, cfg, part):
    (ckpt / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / CONFIG_NAME, part)


def test_error_unknown_architecture(ckpt):
    d = json.loads((ckpt / CONFIG_NAME).read_text())
    d["architecture"] = "resnet50"
    (ckpt / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, "'resnet50'", "unet3d, nnunet, swin_unetr")
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("resnet50")


@pytest.mark.parametrize("arch, args, part", [
    ("unet3d", {"channels": [4, 8, 16], "strides": [2, 2], "colour": 1}, "colour"),
    ("unet3d", {"channels": [4, 8, 16], "strides": [2]}, "strides"),
    ("unet3d", {"channels": [4, 8, 16], "strides": [2, 2], "norm": "nonsense"}, "norm"),
    ("unet3d", {"channels": [4, 8, 16], "strides": [2, 2], "dropout": "x"}, "dropout"),
    ("nnunet", {"filters": [4]}, "filters"),
    ("swin_unetr", {"feature_size": 10}, "feature_size"),
    ("unet3d", [4, 8], "arguments"),  # not a JSON object
    ("unet3d", None, "arguments"),
    ("nnunet", {"strides": []}, "strides"),
    (["unet3d"], {}, "architecture"),  # not a string
])
def test_error_wrong_arguments(ckpt, arch, args, part):
    d = json.loads((ckpt / CONFIG_NAME).read_text())
    d["architecture"], d["arguments"] = arch, args
    (ckpt / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, part)


@pytest.mark.parametrize("content", [
    b"",
    b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
    b"\xff" * 64,
    bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
])
def test_error_corrupted_weights(ckpt, content):
    (ckpt / WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / WEIGHTS_NAME)


def test_error_truncated_weights(ckpt):
    raw = (ckpt / WEIGHTS_NAME).read_bytes()
    (ckpt / WEIGHTS_NAME).write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / WEIGHTS_NAME, "is truncated or damaged (an incomplete safetensors file)")


def test_error_missing_and_unexpected_key(ckpt):
    state = _state(ckpt)
    key = sorted(state)[0]
    del state[key]
    _write_state(ckpt, state)
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / WEIGHTS_NAME, "1 missing keys", key, "0 unexpected")
    state[key + "_renamed"] = torch.zeros(1)
    _write_state(ckpt, state)
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, "1 missing keys", "1 unexpected", key + "_renamed")


def test_error_shape_mismatch(ckpt):
    state = _state(ckpt)
    key = next(k for k, v in state.items() if v.ndim == 5)
    old = tuple(state[key].shape)
    state[key] = torch.zeros(old[0], old[1], 1, 1, 1)
    _write_state(ckpt, state)
    with pytest.raises(ModelError) as e:
        load_checkpoint(ckpt)
    _one_line(e, ckpt / WEIGHTS_NAME, "shape mismatch", key, str((old[0], old[1], 1, 1, 1)),
              str(old))


def test_weights_from_another_size_of_the_same_architecture(ckpt):
    d = json.loads((ckpt / CONFIG_NAME).read_text())
    d["arguments"] = {"channels": [4, 8, 32], "strides": [2, 2]}
    (ckpt / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError, match="shape mismatch"):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------ legacy weights


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_legacy_malicious_pickle_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": _Evil(f"touch {shlex.quote(str(marker))}")}
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, str(path))
    with pytest.raises(ModelError) as e:
        load_legacy_state_dict(path)
    _one_line(e, path, "refused")
    assert not marker.exists()
    if writer == "pickle":
        # the payload is live: plain unpickling would have run the command
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_legacy_plain_state_dict(tmp_path):
    m = _tiny_unet()
    sd = m.state_dict()
    p1, p2, p3 = tmp_path / "a.pt", tmp_path / "b.pth", tmp_path / "c.pt"
    torch.save(sd, str(p1))
    torch.save({"state_dict": sd, "epoch": 3}, str(p2))
    torch.save([1, 2, 3], str(p3))
    for p in (p1, p2):
        out = load_legacy_state_dict(p)
        assert list(out) == list(sd)
        assert all(torch.equal(out[k], sd[k]) for k in sd)
    with pytest.raises(ModelError, match="does not hold a state dict"):
        load_legacy_state_dict(p3)
    with pytest.raises(ModelError) as e:
        load_legacy_state_dict(tmp_path / "missing.pt")
    _one_line(e, tmp_path / "missing.pt")


# ------------------------------------------------------------------ sliding window


class _TinyNet(torch.nn.Module):
    """Position-dependent, non-linear, 2 -> 2 channels: windows and padding matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Conv3d(2, 3, 3, padding=1)
        self.b = torch.nn.Conv3d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("shape, roi, overlap, sw", [
    ((13, 17, 10), (8, 8, 8), 0.25, 1),  # larger than the ROI
    ((13, 17, 10), (8, 6, 8), 0.5, 3),
    ((13, 5, 10), (8, 8, 8), 0.25, 2),  # smaller than the ROI on one axis (padded)
    ((6, 5, 10), (8, 8, 4), 0.25, 4),  # smaller on two axes
])
def test_sliding_window_equals_monai(shape, roi, overlap, sw):
    from monai.inferers import sliding_window_inference

    net = _TinyNet().eval()
    x = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(0))
    grid = WindowGrid.create(shape, roi, overlap)
    with torch.no_grad():
        ours = sliding_window_logits(net, x, grid, sw_batch_size=sw)
        ref = sliding_window_inference(x, roi, sw, net, overlap=overlap, mode="gaussian")
    assert ours.shape == ref.shape == (2, 2, *shape)
    assert torch.allclose(ours, torch.as_tensor(ref), atol=1e-6, rtol=0)
    # window batching does not change the result
    with torch.no_grad():
        one = sliding_window_logits(net, x, grid, sw_batch_size=1)
    assert torch.allclose(ours, one, atol=1e-6, rtol=0)


def test_sliding_window_gradient_equals_monai():
    from monai.inferers import sliding_window_inference

    net = _TinyNet().eval()
    shape, roi = (11, 5, 9), (6, 6, 6)
    grid = WindowGrid.create(shape, roi, 0.25)
    w = torch.randn(1, 2, *shape)
    x1 = torch.randn(1, 2, *shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (sliding_window_logits(net, x1, grid, 2) * w).sum().backward()
    ref = sliding_window_inference(x2, roi, 2, net, overlap=0.25, mode="gaussian")
    (torch.as_tensor(ref) * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=0)


def test_predict_probability_is_softmax_of_logits():
    net = _TinyNet().eval()
    img = np.random.default_rng(0).standard_normal((2, 9, 12, 7)).astype(np.float32)
    p = predict_probability(net, img, (8, 8, 8), overlap=0.25)
    grid = WindowGrid.create(img.shape[1:], (8, 8, 8), 0.25)
    with torch.no_grad():
        logits = sliding_window_logits(net, torch.from_numpy(img)[None], grid)
    expected = torch.sigmoid(logits[0, 1] - logits[0, 0]).numpy()  # 2-class softmax
    assert p.dtype == np.float32 and p.shape == (9, 12, 7)
    np.testing.assert_allclose(p, expected, atol=1e-6)


def test_window_grid_full_scan():
    g = WindowGrid.create((182, 218, 182), (96, 96, 96), 0.25)
    assert g.n_windows == 27
    assert g.padded_shape == (182, 218, 182) and g.pad_before == (0, 0, 0)
    # interval 72 (= 96 * 0.75); the last window is moved back to end at the border
    assert sorted(set(g.starts[:, 0].tolist())) == [0, 72, 86]
    assert sorted(set(g.starts[:, 1].tolist())) == [0, 72, 122]
    assert sorted(set(g.starts[:, 2].tolist())) == [0, 72, 86]
    assert g.importance.shape == (96, 96, 96)
    assert float(g.norm.min()) > 0
    # centre of a window has the peak weight; the norm is the sum of the windows' weights
    assert float(g.importance.max()) == pytest.approx(float(g.importance[48, 48, 48]))
    assert float(g.norm[0, 0, 0]) == pytest.approx(float(g.importance[0, 0, 0]))


def test_window_grid_padding():
    g = WindowGrid.create((13, 5, 10), (8, 8, 8), 0.25)
    assert g.padded_shape == (13, 8, 10) and g.pad_before == (0, 1, 0)
    x = torch.arange(13 * 5 * 10, dtype=torch.float32).reshape(1, 1, 13, 5, 10)
    xp = g.pad(x)
    assert xp.shape == (1, 1, 13, 8, 10)
    assert (xp[:, :, :, 0] == 0).all() and (xp[:, :, :, 6:] == 0).all()
    assert torch.equal(g.crop(xp), x)


def _brute_force_touching(grid: WindowGrid, mask: np.ndarray) -> list:
    padded = np.zeros(grid.padded_shape, bool)
    padded[tuple(slice(b, b + s) for b, s in zip(grid.pad_before, grid.image_shape))] = mask
    return [w for w in range(grid.n_windows) if padded[grid.window_slices(w)].any()]


@pytest.mark.parametrize("shape, roi, overlap", [
    ((20, 13, 17), (8, 8, 8), 0.25),
    ((20, 5, 17), (8, 8, 8), 0.5),  # padded axis
    ((30, 30, 30), (10, 12, 8), 0.0),
])
def test_windows_touching_brute_force(shape, roi, overlap):
    g = WindowGrid.create(shape, roi, overlap)
    assert g.n_windows > 4
    rng = np.random.default_rng(0)
    assert g.windows_touching(np.zeros(shape, bool)) == []
    for trial in range(25):
        mask = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 4))):
            c = [int(rng.integers(s)) for s in shape]
            r = [int(rng.integers(0, 3)) for _ in shape]
            mask[tuple(slice(max(a - b, 0), a + b + 1) for a, b in zip(c, r))] = True
        got = g.windows_touching(mask)
        assert got == _brute_force_touching(g, mask), trial
        assert 1 <= len(got) <= g.n_windows
    # a single voxel in a corner of the image
    corner = np.zeros(shape, bool)
    corner[0, 0, 0] = True
    assert g.windows_touching(corner) == _brute_force_touching(g, corner) == [0]
    # everything
    assert g.windows_touching(np.ones(shape, bool)) == list(range(g.n_windows))
