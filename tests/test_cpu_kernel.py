"""What tests/test_masked_gram.py cannot see of the fused CPU kernel (csrc/masked_gram_cpu.cpp).

Its shapes are too small to reach the kernel's vectorised row paths (W >= 16 + r - 1), several
row tiles per band (~1024 positions each), several bands (one per thread) or several channel
blocks (64 channels each) of the forward's upper triangle. Nor does it check memory.
"""

from __future__ import annotations

from pathlib import Path

import launch
import pytest
import torch
from cases import relative_error

import cast
from cast import backends
from cast.reference import masked_gram_backward_reference, masked_gram_reference

pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason="CPU kernel not built")

# (label, C, H, W, J, K, r, batched masks): every one spans several row tiles per band.
SHAPES = [
    ("3 channel blocks, 1 vector per row", 150, 100, 32, 2, 2, 3, False),
    ("r=5, 4-vector rows, batched masks", 70, 40, 200, 2, 3, 5, True),
    ("rows narrower than a vector", 9, 600, 5, 1, 2, 3, False),
    ("r=7, one tile row per band", 20, 9, 1100, 1, 1, 7, False),
]


def inputs(C, H, W, J, K, r, batched, B=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    masks = torch.rand(*((B, K) if batched else (1, K)), H, W, generator=gen, dtype=torch.float64)
    kernels = torch.randn(J, r, r, generator=gen, dtype=torch.float64)
    return features, masks, kernels


def assert_matches_reference(features, masks, kernels, expected, grad):
    """The CPU op in float32 and float64, forward and backward (given ``grad``), against the
    float64 reference's ``expected`` Gram and its gradient; the mirrored triangle exact."""
    expected_grad = masked_gram_backward_reference(grad, features, masks, kernels)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        x = features.to(dtype).requires_grad_(True)
        gram = cast.masked_gram(x, masks.to(dtype), kernels.to(dtype), backend="cpu")
        (d_features,) = torch.autograd.grad(gram, x, grad.to(gram.dtype))
        assert relative_error(gram, expected) <= tol, dtype
        assert relative_error(d_features, expected_grad) <= tol, dtype
        assert torch.equal(gram, gram.transpose(-1, -2)), "the mirrored triangle must be exact"


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_large_shapes_match_reference(shape, threads):
    features, masks, kernels = inputs(*shape[1:], B=1 if threads == 3 else 2)
    expected = masked_gram_reference(features, masks, kernels)
    grad = torch.randn(
        expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    assert_matches_reference(features, masks, kernels, expected, grad)


def region_masks(B: int, K: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Soft masks with exact zeros in every pattern the kernel tells apart per row tile: zero on
    whole tiles (the top rows), on columns (reaching part of every tile), at all but a few
    positions, nowhere (dense) — and, batched, a different pattern per image."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(B, K, H, W, generator=gen, dtype=torch.float64) + 0.1
    masks[:, 0, : H // 2] = 0  # whole tiles empty, the others dense
    masks[:, 1, :, W // 3 :] = 0  # a vertical region: part of every tile
    masks[:, 2] *= torch.rand(B, H, W, generator=gen, dtype=torch.float64) < 0.01  # a few
    if B > 1:
        masks[1] = masks[1].flip(-2)  # another image, other tiles empty
    return masks


@pytest.mark.parametrize("batched", [False, True], ids=["shared masks", "batched masks"])
def test_region_masks_match_reference(batched, threads):
    """Masks zero on part of a tile take the kernel's mask-by-mask path (positions gathered,
    backward scattered back): forward and backward against the float64 reference."""
    C, H, W, J, K, r = 70, 41, 50, 2, 4, 3  # 2 channel blocks, 3 row tiles of 20 rows
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, C, H, W, generator=gen, dtype=torch.float64)
    masks = region_masks(2 if batched else 1, K, H, W)
    kernels = torch.randn(J, r, r, generator=gen, dtype=torch.float64)
    expected = masked_gram_reference(features, masks, kernels)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    assert_matches_reference(features, masks, kernels, expected, grad)


def test_thread_count_changes_rounding_only():
    """Bands follow the thread count: the sums change order, so results change in rounding only."""
    features, masks, kernels = inputs(64, 70, 40, 2, 2, 3, False, B=1)
    f, m, p = features.float(), masks.float(), kernels.float()
    grad = torch.randn(1, 2, 2, 64, 64)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            gram = launch.forward(torch.ops.cast._masked_gram_fused, f, m, p, True)
            d_features = launch.backward(backends.load("cpu").backward, grad, f, m, p, True)
            results.append((gram, d_features))
    finally:
        torch.set_num_threads(threads)
    for gram, d_features in results[1:]:
        assert relative_error(gram, results[0][0].double()) <= 1e-6
        assert relative_error(d_features, results[0][1].double()) <= 1e-6


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_no_intermediate_proportional_to_jknc():
    """Peak memory of forward + backward stays far below one J*K*N*C float32 intermediate."""
    C, H, W, J, K = 64, 192, 192, 3, 3
    features, masks, kernels = (t.float() for t in inputs(C, H, W, J, K, 3, False, B=1))
    grad = torch.randn(1, J, K, C, C)
    blowup = J * K * H * W * C * 4  # 85 MiB, an mmap-sized block glibc returns at free
    launch.backward(backends.load("cpu").backward, grad, features, masks, kernels, True)  # warm up

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    launch.forward(torch.ops.cast._masked_gram_fused, features, masks, kernels, True)
    launch.backward(backends.load("cpu").backward, grad, features, masks, kernels, True)
    extra = _status_bytes("VmHWM") - before
    assert extra < blowup / 4, f"{extra / 2**20:.1f} MiB extra, J*K*N*C is {blowup / 2**20:.0f}"
