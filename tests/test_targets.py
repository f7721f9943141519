"""Instance targets (instance_saliency.targets): values on hand examples, linear weights, crop."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instance_saliency.targets import ClassTarget, InstanceTarget, MaskTarget


def _logits():
    """(B=2, K=2, 3, 3, 2) logits with distinct, hand-readable values."""
    b0 = torch.arange(2 * 3 * 3 * 2, dtype=torch.float32).reshape(2, 3, 3, 2) / 10.0
    return torch.stack([b0, -b0])


MASK_VOXELS = [(0, 0, 0), (1, 2, 1), (2, 1, 0)]


def _mask():
    m = np.zeros((3, 3, 2), bool)
    for v in MASK_VOXELS:
        m[v] = True
    return m


def test_sum_and_mean_hand_values():
    lg = _logits()
    # channel-1 value at (i, j, k) of batch 0 is (18 + 6 i + 2 j + k) / 10; batch 1 is its negative
    hand0 = sum((18 + 6 * i + 2 * j + k) / 10.0 for i, j, k in MASK_VOXELS)
    assert hand0 == pytest.approx(1.8 + 2.9 + 3.2)
    s = MaskTarget(_mask())(lg)
    m = MaskTarget(_mask(), reduction="mean")(lg)
    assert s.shape == (2,)
    np.testing.assert_allclose(s.numpy(), [hand0, -hand0], rtol=1e-6)
    np.testing.assert_allclose(m.numpy(), [hand0 / 3, -hand0 / 3], rtol=1e-6)
    # class 0 instead of class 1
    hand_c0 = sum((6 * i + 2 * j + k) / 10.0 for i, j, k in MASK_VOXELS)
    np.testing.assert_allclose(MaskTarget(_mask(), class_index=0)(lg).numpy(),
                               [hand_c0, -hand_c0], rtol=1e-6)


def test_mask_given_as_tensor_and_instance_alias():
    lg = _logits()
    a = MaskTarget(_mask())(lg)
    b = MaskTarget(torch.from_numpy(_mask()))(lg)
    c = InstanceTarget(_mask().astype(np.uint8))(lg)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_prob_space_hand_values():
    lg = _logits()
    # two channels: softmax probability of class 1 = sigmoid of the logit difference
    diff = (lg[:, 1].double() - lg[:, 0].double()).numpy()
    hand = np.array([sum(1 / (1 + np.exp(-diff[b][v])) for v in MASK_VOXELS) for b in range(2)])
    tg = MaskTarget(_mask(), space="prob")
    np.testing.assert_allclose(tg(lg).numpy(), hand, rtol=1e-6)
    np.testing.assert_allclose(MaskTarget(_mask(), reduction="mean", space="prob")(lg).numpy(),
                               hand / 3, rtol=1e-6)
    assert not tg.is_linear and tg.linear_weights() is None
    assert tg.linear_weights_at((slice(0, 2),) * 3) is None


def test_whole_class_target():
    lg = _logits()
    np.testing.assert_allclose(ClassTarget((3, 3, 2))(lg).numpy(),
                               lg[:, 1].reshape(2, -1).mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ClassTarget((3, 3, 2), reduction="sum")(lg).numpy(),
                               lg[:, 1].reshape(2, -1).sum(1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(reduction="max"), dict(space="softmax")])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MaskTarget(_mask(), **kwargs)


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        MaskTarget(np.zeros((3, 3, 2), bool))
    with pytest.raises(ValueError, match="empty"):
        InstanceTarget(torch.zeros(4, 4, 4, dtype=torch.bool))


def test_wrong_logit_shape_raises():
    with pytest.raises(ValueError, match="does not match"):
        MaskTarget(_mask())(torch.zeros(1, 2, 3, 3, 3))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_weights_reproduce_the_score(reduction):
    lg = _logits()
    tg = MaskTarget(_mask(), reduction=reduction)
    w = tg.linear_weights()
    assert w.dtype == np.float32 and w.shape == (3, 3, 2)
    expected = _mask() / (3.0 if reduction == "mean" else 1.0)
    np.testing.assert_array_equal(w, expected.astype(np.float32))
    lin = (lg[:, 1].numpy() * w).reshape(2, -1).sum(1)
    np.testing.assert_allclose(lin, tg(lg).numpy(), rtol=1e-6)
    # the same weights on any sub-box, including one that cuts the mask
    for sl in [(slice(0, 2), slice(1, 3), slice(0, 2)), (slice(2, 3), slice(0, 3), slice(0, 1)),
               (slice(0, 3), slice(0, 3), slice(1, 2))]:
        np.testing.assert_array_equal(tg.linear_weights_at(sl), w[sl])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("space", ["logit", "prob"])
def test_bbox_and_crop(reduction, space):
    m = np.zeros((6, 5, 4), bool)
    m[1, 2, 1] = m[3, 2, 2] = m[2, 3, 1] = True
    tg = MaskTarget(m, class_index=1, reduction=reduction, space=space, name="L1")
    assert tg.bbox() == (slice(1, 4), slice(2, 4), slice(1, 3))
    lg = torch.randn(2, 2, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    for sl in [tg.bbox(), (slice(0, 5), slice(1, 5), slice(0, 4))]:
        c = tg.crop(sl)
        assert (c.reduction, c.space, c.name, c.class_index, c.n_voxels) == \
            (reduction, space, "L1", 1, 3)
        assert c.mask.shape == tuple(s.stop - s.start for s in sl)
        np.testing.assert_allclose(c(lg[(slice(None), slice(None)) + sl]).numpy(), tg(lg).numpy(),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="whole target"):
        tg.crop((slice(2, 6), slice(0, 5), slice(0, 4)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(["sum", "mean"]),
       k=st.integers(0, 2))
def test_score_matches_numpy_on_random_masks(seed, reduction, k):
    rng = np.random.default_rng(seed)
    m = rng.random((4, 5, 3)) < 0.3
    m[rng.integers(4), rng.integers(5), rng.integers(3)] = True
    lg = rng.normal(size=(3, 3, 4, 5, 3)).astype(np.float32)
    ref = lg[:, k][:, m].astype(np.float64)
    ref = ref.sum(1) if reduction == "sum" else ref.mean(1)
    out = MaskTarget(m, class_index=k, reduction=reduction)(torch.from_numpy(lg))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
