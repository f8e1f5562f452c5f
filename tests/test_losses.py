"""The objective's terms: gradients through the op, statistics that add, kernel presets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cast import backends
from cast.errors import CastError
from cast.losses import (
    HIGH_ORDER_PRESETS,
    ContentLoss,
    GramStats,
    StyleLoss,
    TVLoss,
    high_order_kernels,
)
from cast.reference import masked_gram_reference

# Triton's interpreter is too slow for losses; the op's own tests cover that backend.
BACKENDS = [name for name in ("reference", "cpu") if backends.available(name)]


def _random(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _style_loss_by_autograd(features, target, masks, kernels):
    """The style term written out on the reference op, differentiated by autograd."""
    gram = masked_gram_reference(features, masks[None], kernels)[0]  # (J, K, C, C)
    mass = masks.flatten(1).square().sum(1)
    weights = mass / mass.sum()
    error = (gram - target).square().sum((-1, -2))
    return (error * weights / target.square().sum((-1, -2))).sum() / len(kernels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_style_loss_gradient_matches_autograd_on_reference(backend, dtype):
    C, H, W, K = 5, 9, 11, 3
    kernels = HIGH_ORDER_PRESETS["neighbours"].double()
    masks = _random(K, H, W, seed=1)
    target = _random(len(kernels), K, C, C, seed=2)
    target = target + target.transpose(-1, -2)
    features = _random(1, C, H, W, seed=3).requires_grad_()

    expected = _style_loss_by_autograd(features, target, masks, kernels)
    (expected_grad,) = torch.autograd.grad(expected, features)

    loss_fn = StyleLoss(target.to(dtype), masks.to(dtype), kernels.to(dtype), backend=backend)
    x = features.detach().to(dtype).requires_grad_()
    loss = loss_fn(x)
    loss.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - expected.item()) <= tol * abs(expected.item())
    assert (x.grad.double() - expected_grad).norm() <= tol * expected_grad.norm()


def test_targets_taken_through_the_network_being_trained_are_constants():
    """Your own pipeline: a small network trained for a few steps on a batch, its targets
    taken through it (a graph attached). A second backward failed ("through the graph a
    second time") and deepcopy refused the losses; the loss is the batch mean of the term."""
    torch.manual_seed(0)
    conv = lambda c_in: torch.nn.Conv2d(c_in, 4, 3, padding=1, dtype=torch.float64)  # noqa: E731
    net = torch.nn.Sequential(conv(3), torch.nn.ReLU(), conv(4))
    masks, kernels = _random(2, 8, 8, seed=1), HIGH_ORDER_PRESETS["neighbours"].double()
    style, content = _random(1, 3, 8, 8, seed=2), _random(3, 3, 8, 8, seed=3)
    style_loss = StyleLoss(GramStats.of(net(style), masks, kernels).mean(), masks, kernels)
    content_loss = ContentLoss(net(content))
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        features = net(content)
        (style_loss(features) + content_loss(features)).backward()
        optimiser.step()
    target = style_loss.target
    items = [_style_loss_by_autograd(f[None], target, masks, kernels) for f in features]
    assert style_loss(features).item() == pytest.approx(torch.stack(items).mean().item(), 1e-10)
    copy.deepcopy(style_loss), copy.deepcopy(content_loss)


def test_stats_of_two_images_are_the_stats_of_their_union():
    """Sums + mass add: two style images side by side (a zero gap wider than the kernels'
    halo) have the pooled statistics, and each region's Gram is the mass-weighted blend."""
    C, H, K = 4, 8, 2
    kernels = HIGH_ORDER_PRESETS["neighbours"].double()
    a, b = _random(1, C, H, 10, seed=1), _random(1, C, H, 7, seed=2)
    masks_a, masks_b = _random(K, H, 10, seed=3), _random(K, H, 7, seed=4)
    masks_b[0] = 0  # region 0 only in a: its pooled Gram is a's alone

    stats_a = GramStats.of(a, masks_a, kernels, backend="reference")
    stats_b = GramStats.of(b, masks_b, kernels, backend="reference")
    pooled = stats_a + stats_b

    gap = torch.zeros(1, C, H, 1, dtype=torch.float64)
    union = GramStats.of(
        torch.cat([a, gap, b], -1),
        torch.cat([masks_a, gap[0, :K], masks_b], -1),
        kernels,
        backend="reference",
    )
    torch.testing.assert_close(pooled.sums, union.sums)
    torch.testing.assert_close(pooled.mass, union.mass)

    gram_a, gram_b = stats_a.mean(), stats_b.mean()
    n_a, n_b = stats_a.mass[1], stats_b.mass[1]
    torch.testing.assert_close(
        pooled.mean()[:, 1], (n_a * gram_a[:, 1] + n_b * gram_b[:, 1]) / (n_a + n_b)
    )
    torch.testing.assert_close(pooled.mean()[:, 0], gram_a[:, 0])


def test_stats_of_a_batch_are_the_stats_of_its_images_pooled():
    """A batch of two images counts both images' positions: sums and mass of each, added."""
    C, H, W, K = 3, 7, 9, 2
    kernels = HIGH_ORDER_PRESETS["neighbours"].double()
    batch, masks = _random(2, C, H, W, seed=1), _random(K, H, W, seed=2)
    masks[1, :, : W // 2] = 0  # regions of different mass, so a mass factor cannot cancel out
    of = lambda features: GramStats.of(features, masks, kernels, backend="reference")  # noqa: E731
    both, first, second = of(batch), of(batch[:1]), of(batch[1:])
    torch.testing.assert_close(both.sums, first.sums + second.sums)
    torch.testing.assert_close(both.mass, first.mass + second.mass)
    torch.testing.assert_close(both.mean(), (first + second).mean())


def test_stats_of_a_batch_with_masks_per_item_are_its_items_pooled():
    features, masks = _random(2, 3, 6, 6), _random(2, 2, 6, 6, seed=1)
    kernels = HIGH_ORDER_PRESETS["neighbours"].double()
    both = GramStats.of(features, masks, kernels)
    first, second = (GramStats.of(features[i : i + 1], masks[i], kernels) for i in range(2))
    torch.testing.assert_close(both.mass, first.mass + second.mass)
    torch.testing.assert_close(both.mean(), (first + second).mean())


def test_style_loss_refuses_what_it_cannot_take_in_one_line():
    """Not an AttributeError or a broadcasting error from inside the loss."""
    masks, kernels = _random(2, 6, 6), HIGH_ORDER_PRESETS["neighbours"].double()
    target = GramStats.of(_random(1, 3, 6, 6), masks, kernels).mean()
    with pytest.raises(ValueError, match=r"without masks, give region_weights"):
        StyleLoss(target, None, kernels)
    with pytest.raises(ValueError, match=r"without masks takes Grams already formed"):
        StyleLoss(target, None, kernels, region_weights=torch.ones(2))(_random(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"needs \(K, H, W\) masks shared by the batch"):
        StyleLoss(target, masks[None].expand(2, -1, -1, -1), kernels)  # per item, B = K
    with pytest.raises(ValueError, match=r"StyleLoss: target \(J, K, C, C\) \(3,\)"):
        StyleLoss(target[0, 0, 0], masks, kernels)  # was "not enough values to unpack"
    with pytest.raises(ValueError, match=r"Grams \(1, 3, 2, 4, 4\) do not match the target"):
        StyleLoss(target, masks, kernels)(_random(1, 4, 6, 6))


def test_a_region_without_mass_takes_the_fallback_not_nan():
    features = _random(1, 3, 6, 6)
    masks = torch.stack([torch.ones(6, 6), torch.zeros(6, 6)]).double()
    stats = GramStats.of(features, masks, HIGH_ORDER_PRESETS["none"].double(), backend="reference")
    fallback = torch.full_like(stats.sums, 7.0)
    assert stats.present.tolist() == [True, False]
    assert torch.equal(stats.mean()[:, 1], torch.zeros_like(stats.sums[:, 1]))
    assert torch.equal(stats.mean(fallback)[:, 1], fallback[:, 1])
    torch.testing.assert_close(stats.mean(fallback)[:, 0], stats.mean()[:, 0])


def test_style_loss_is_zero_at_its_target_and_ignores_zero_targets():
    features = _random(1, 3, 6, 6)
    masks = _random(2, 6, 6, seed=1)
    kernels = HIGH_ORDER_PRESETS["neighbours"].double()
    target = GramStats.of(features, masks, kernels, backend="reference").mean()
    assert StyleLoss(target, masks, kernels, backend="reference")(features).item() < 1e-20
    target[:, 1] = 0  # nothing to match in region 1: it drops out instead of dividing by 0
    assert torch.isfinite(StyleLoss(target, masks, kernels, backend="reference")(features * 2))


def test_content_and_tv_losses():
    target = _random(1, 4, 5, 5)
    assert ContentLoss(target)(target).item() == 0
    assert ContentLoss(target)(2 * target).item() == pytest.approx(1.0)
    # a batch of targets: each item's error relative to its own target (it was relative to the
    # whole batch's, so the loss shrank with the batch's size)
    targets = torch.cat([target, 3 * _random(2, 4, 5, 5, seed=1)])
    features = targets * torch.tensor([2.0, 1.5, 1.0]).view(3, 1, 1, 1)
    assert ContentLoss(targets)(features).item() == pytest.approx((1 + 0.25 + 0) / 3)
    ramp = torch.arange(4.0).expand(1, 3, 4, 4)  # steps of 1 along x, none along y
    assert TVLoss()(ramp).item() == pytest.approx(1.0)
    # one row or one column: no neighbours that way, a term of 0 (it was 0 / 0, NaN)
    assert TVLoss()(ramp[..., :1, :]).item() == pytest.approx(1.0)
    assert TVLoss()(ramp[..., :1, :].transpose(-1, -2)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(HIGH_ORDER_PRESETS))
def test_presets_are_valid_kernels(name):
    kernels = high_order_kernels(name)
    J, r, r2 = kernels.shape
    assert r == r2 and r % 2 == 1 and kernels.dtype == torch.float32
    assert kernels[0, r // 2, r // 2] == 1  # the first kernel is always the identity


# any case, as image files' suffixes: KERNELS.TXT was "not .npy, .pt or .txt"
@pytest.mark.parametrize("suffix", [".npy", ".pt", ".txt", ".NPY", ".Pt", ".TXT"])
def test_kernel_files_round_trip(tmp_path, suffix):
    kernels = _random(2, 3, 3, dtype=torch.float32)
    path = tmp_path / f"k{suffix}"
    if suffix.lower() == ".npy":
        with open(path, "wb") as file:  # np.save would add ".npy" to another case
            np.save(file, kernels.numpy())
    elif suffix.lower() == ".pt":
        torch.save(kernels, path)
    else:
        np.savetxt(path, kernels.reshape(-1, 3).numpy())
    torch.testing.assert_close(high_order_kernels(path), kernels)


@pytest.mark.parametrize(
    "content, message",
    [
        (np.ones((2, 2, 2)), "r odd"),
        (np.ones((3, 3)), r"holds shape \(3, 3\); expected \(J, r, r\)"),
        (np.full((1, 3, 3), np.nan), "NaN"),
        (np.zeros((1, 3, 3)), "all-zero"),
        (np.ones((2, 3, 5)), "r odd"),
    ],
)
def test_bad_kernel_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "k.npy"
    np.save(path, content)
    with pytest.raises(CastError, match=message):
        high_order_kernels(path)


def test_unreadable_kernel_files_and_unknown_presets(tmp_path):
    with pytest.raises(CastError, match="unknown high-order preset 'fancy'; choose none"):
        high_order_kernels("fancy")
    (tmp_path / "k.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(CastError, match="cannot read kernel file"):
        high_order_kernels(tmp_path / "k.txt")
    (tmp_path / "k.csv").write_text("1\n")
    with pytest.raises(CastError, match="not .npy, .pt or .txt"):
        high_order_kernels(tmp_path / "k.csv")


def test_half_precision_masks_have_their_mass_summed_in_float32():
    """float16 sums overflow at 65504: a 256 x 256 region's mass was inf, its Gram zero and the
    style loss NaN."""
    features, masks = _random(1, 2, 256, 256, dtype=torch.float32), torch.ones(1, 256, 256)
    kernels = HIGH_ORDER_PRESETS["none"]
    expected = GramStats.of(features, masks, kernels).mean()
    half = GramStats.of(features.half(), masks.half(), kernels.half())
    assert half.mass.tolist() == [256 * 256]
    torch.testing.assert_close(half.mean(), expected, rtol=2e-2, atol=0)
    assert torch.isfinite(StyleLoss(expected, masks.half(), kernels)(features.half()))
