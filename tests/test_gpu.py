"""The GPU backends ("triton", "cuda") on a CUDA device; skipped without one.

tests/test_masked_gram.py already runs every labelled case, gradcheck, opcheck and
torch.compile(fullgraph=True) on every backend present for "cuda" tensors. This file adds what
only a GPU shows: CUDA graphs (mode="reduce-overhead", which catches launches on the wrong
stream), low precision, full-precision float32 and a shape large enough to use many tiles,
channel blocks and splits.
"""

from __future__ import annotations

import launch
import pytest
import torch

import cast
from cast import backends
from cast.reference import masked_gram_backward_reference, masked_gram_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = ["triton", "cuda"]


def need(name, dtype=torch.float32):
    if not backends.available(name):
        pytest.skip(f"backend {name!r} is not available here")
    if dtype not in backends.load(name).dtypes:
        pytest.skip(f"backend {name!r} has no {dtype}")


def relative_error(out, ref):
    out, ref = out.double(), ref.double().to(out.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def random_inputs(B, C, H, W, J, K, r, dtype, seed=0, batched_masks=False):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    masks = torch.rand(B if batched_masks else 1, K, H, W, generator=gen, dtype=torch.float64)
    kernels = torch.randn(J, r, r, generator=gen, dtype=torch.float64)
    return [t.to("cuda", dtype) for t in (features, masks, kernels)]


def check(name, features, masks, kernels, tol, **kw):
    """Forward and backward of ``backend=name`` against the float64 reference."""
    f64, m64, p64 = features.double(), masks.double(), kernels.double()
    features = features.clone().requires_grad_(True)
    gram = cast.masked_gram(features, masks, kernels, backend=name, **kw)
    expected = masked_gram_reference(f64, m64, p64)
    assert torch.isfinite(gram).all()
    assert relative_error(gram, expected) <= tol

    grad = torch.randn(gram.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.cuda()
    (d_features,) = torch.autograd.grad(gram, features, grad.to(gram.dtype))
    expected_grad = masked_gram_backward_reference(grad, f64, m64, p64)
    assert d_features.dtype == features.dtype
    assert torch.isfinite(d_features).all()
    assert relative_error(d_features, expected_grad) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_low_precision(name, dtype):
    need(name, dtype)
    check(name, *random_inputs(2, 48, 19, 23, 2, 3, 3, dtype, batched_masks=True), 2e-2)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_full_precision_float32(name):
    need(name)
    check(name, *random_inputs(2, 40, 17, 21, 2, 2, 3, torch.float32), 1e-5, allow_tf32=False)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_large_shape(name):
    need(name)
    inputs = random_inputs(2, 256, 96, 80, 3, 3, 3, torch.float32, seed=2)
    check(name, *inputs, 3e-3)
    check(name, *inputs, 1e-5, allow_tf32=False)
    if torch.float64 in backends.load(name).dtypes:
        check(name, *[t.double() for t in inputs], 1e-10)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_graphs_under_reduce_overhead(name):
    """Replayed CUDA graphs of forward and backward give the eager result for fresh inputs."""
    need(name)
    features, masks, kernels = random_inputs(1, 64, 24, 20, 2, 2, 3, torch.float32, seed=3)
    target = torch.randn(1, 2, 2, 64, 64, device="cuda")

    def loss(x):
        return (cast.masked_gram(x, masks, kernels, backend=name) - target).square().sum()

    compiled = torch.compile(loss, mode="reduce-overhead")
    for i in range(4):  # warm-up, recording, then replays
        x_eager = (features + 0.1 * i).requires_grad_(True)
        x_graph = x_eager.detach().clone().requires_grad_(True)
        expected = loss(x_eager)
        expected.backward()
        value = compiled(x_graph)
        value.backward()
        torch.cuda.synchronize()
        assert relative_error(value.detach(), expected.detach()) <= 3e-3, i
        assert relative_error(x_graph.grad, x_eager.grad) <= 3e-3, i


@pytest.mark.parametrize("K", [1, 3])
def test_every_shipped_triton_config(K):
    """The autotuner may launch any shipped config: each one against the reference (the op
    tests run CAST_TRITON_AUTOTUNE=0, which takes only the first config that fits)."""
    need("triton")
    from cast.kernels import masked_gram as triton_gram

    features, masks, kernels = random_inputs(1, 160, 21, 19, 2, K, 3, torch.float32, seed=4)
    f64, m64, p64 = features.double(), masks.double(), kernels.double()
    expected = masked_gram_reference(f64, m64, p64)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5)).cuda()
    expected_grad = masked_gram_backward_reference(grad.double(), f64, m64, p64)
    for config in triton_gram.FWD_CONFIGS:
        chosen = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        gram = launch.forward(triton_gram.forward, features, masks, kernels, True, config=chosen)
        assert relative_error(gram, expected) <= 3e-3, config
    for config in triton_gram.BWD_CONFIGS:
        chosen = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        d_features = launch.backward(
            triton_gram.backward, grad, features, masks, kernels, True, config=chosen
        )
        assert relative_error(d_features, expected_grad) <= 3e-3, config


# The CUDA backward's three ways with dG's mirrors on a 227 KiB card (H100, H200) at C = 72,
# J = 3, r = 3. Where S whole is more than a tenth of the op's inputs + outputs (16 rows of 128
# at B = 9) S is formed a block at a time, the mirrors in a region of their own at K = 3 and in
# U_j's at K = 4 (float32) or 5 (bfloat16): plan 204140 / 195692 B and 177516 / 189804 B; on 72
# rows at B = 2 S comes whole from a scratch (plan.symmetric_scratch), no mirrors. 288 items
# either way (2 x 8 or 9 x 8 tiles, 2 output blocks, 9 or 2 batch items). tests/
# test_cuda_sources.py checks that the plan takes each case's way.
EVERY_ELEMENT_CASES = {  # id: (dtype, K, B, H)
    "tf32 own mirrors": (torch.float32, 3, 9, 16),
    "tf32 mirrors in U": (torch.float32, 4, 9, 16),
    "bfloat16 F kept, mirrors in U": (torch.bfloat16, 3, 9, 16),
    "bfloat16 mirrors in U": (torch.bfloat16, 5, 9, 16),
    "tf32 S from a scratch": (torch.float32, 3, 2, 72),
    "bfloat16 S from a scratch": (torch.bfloat16, 5, 2, 72),
}


@pytest.mark.parametrize(
    "dtype,K,B,H", EVERY_ELEMENT_CASES.values(), ids=EVERY_ELEMENT_CASES.keys()
)
def test_cuda_backward_every_element(dtype, K, B, H):
    """The CUDA backward's copies (issued a step ahead, landing whenever the card lands them)
    against the reference element by element, and the same bits twice. C = 72: three input
    blocks a kernel, so the mirrors also come during a kernel's steps; J = 3; 288 items, so
    every block of an H100 or H200 walks two or three. A copy read before it lands, or issued
    into shared memory still read, gives wrong dF at scattered positions, which the norm's
    tolerance may not see and which change from run to run. The bound: 5x the emulation's
    worst element (0.0020 float32, 0.015 bfloat16)."""
    need("cuda", dtype)
    W = 128
    features, masks, kernels = random_inputs(B, 72, H, W, 3, K, 3, dtype, 6, True)
    grad = torch.randn(B, 3, K, 72, 72, generator=torch.Generator().manual_seed(7))
    f64, m64, p64 = (t.double().cpu() for t in (features, masks, kernels))
    expected = masked_gram_backward_reference(grad.double(), f64, m64, p64)
    grad = grad.cuda()
    first, second = (
        cast.ops.masked_gram_grad(features, grad, masks, kernels, backend="cuda") for _ in range(2)
    )
    assert torch.equal(first, second), "the CUDA backward is deterministic"
    scale = expected.square().mean().sqrt() + expected.abs()
    worst = ((first.double().cpu() - expected).abs() / scale).flatten()
    bound = 0.01 if dtype == torch.float32 else 0.08
    where = [divmod(int(i), H * W) for i in worst.topk(3).indices]  # (b * C + c, y * W + x)
    assert worst.max() <= bound, (worst.max().item(), where)


@pytest.mark.parametrize("dtype", backends.FLOAT_DTYPES, ids=lambda d: str(d)[6:])
def test_inverse_mask_mass_on_the_card_is_the_cpu_ops_bits(dtype):
    """csrc/mask_mass_cuda.cu on the card gives the CPU op's bits (csrc/mask_mass.h's order;
    tests/test_masked_gram.py holds those to the float64 sum) at relu1_1's size, on odd
    shapes and for an empty mask; and a forward with ``mass=None`` launches its two kernels
    and the forward's, nothing else (were 10-22 kernels of float64 bands: gpu-notes)."""
    need("cuda", dtype)
    if not backends.compiled_op("_inverse_mask_mass", "cuda"):
        pytest.skip("the extension has no CUDA kernel for n_k")
    gen = torch.Generator().manual_seed(9)
    for shape in ((1, 3, 1024, 1024), (2, 2, 97, 101), (1, 1, 1, 1)):
        masks = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
        masks[:, -1, : (shape[2] + 1) // 2] = 0
        found = torch.ops.cast._inverse_mask_mass(masks.cuda())
        assert torch.equal(found.cpu(), torch.ops.cast._inverse_mask_mass(masks)), shape
    features, masks, kernels = random_inputs(1, 8, 40, 24, 3, 3, 3, dtype)
    cast.masked_gram(features, masks, kernels, backend="cuda")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cast.masked_gram(features, masks, kernels, backend="cuda")
        torch.cuda.synchronize()
    launched = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("mask_mass" in name for name in launched) == 2, launched
    assert all("mask_mass" in name or "masked_gram" in name for name in launched), launched
