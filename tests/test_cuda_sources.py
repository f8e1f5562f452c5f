"""The CUDA C++ sources, checked without a GPU.

1. Every ``csrc/*.cu`` compiles with ``nvcc`` for Hopper and Ampere, warnings as errors, so a
   syntax or template error cannot land (skipped where nvcc is absent).
2. The kernels of ``csrc/masked_gram_cuda.cu`` run on the CPU, unchanged, under a small CUDA
   emulation (``CUDA_EMULATION`` below): one block at a time, one ``std::thread`` per CUDA thread,
   ``__syncthreads`` a barrier, shared memory poisoned with NaN; their forward and backward are
   compared with the float64 reference on the op tests' labelled shapes. This checks the index
   arithmetic, halos, tiling, splits and barriers' placement; it cannot check timing, warp-level
   behaviour or the ATen glue in ``csrc/masked_gram_cuda.cpp`` (tests/test_gpu.py does, on a GPU).
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest
import torch
from test_masked_gram import CASES, relative_error

from cast.reference import (
    gram_dtype,
    inverse_mass,
    masked_gram_backward_reference,
    masked_gram_reference,
)

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
ARCHS = ["sm_90", "sm_80"]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=[p.name for p in CU_SOURCES])
def test_nvcc_compiles_warning_free(source, arch, tmp_path):
    command = [
        NVCC, "-std=c++17", f"-arch={arch}", "-O3", "--use_fast_math",
        "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
        "-c", str(source), "-o", str(tmp_path / "out.o"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


CUDA_EMULATION = r"""
// The CUDA names the kernels use, on the host: blocks run one after another, each with one
// std::thread per CUDA thread; __syncthreads is a barrier; shared memory starts as NaN.
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emulated_barrier;
inline unsigned char* emulated_shared;
inline void __syncthreads() { emulated_barrier->arrive_and_wait(); }
using std::max;
using std::min;

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0, cudaErrorInvalidValue = 1;
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct __half { _Float16 v; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return {static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)};
}

template <class Body>
void emulated_launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Body body) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::vector<unsigned char> shared(shared_bytes);
  emulated_shared = shared.data();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(shared.data(), 0xFF, shared_bytes);  // NaN in float and double
        std::barrier<> barrier(threads);
        emulated_barrier = &barrier;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            blockIdx = dim3(bx, by, bz);
            threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
            body();
          });
        for (auto& thread : pool) thread.join();
      }
}
"""

C_ENTRY_POINTS = r"""
extern "C" {
static CastGramShape shape_of(const int64_t* s) {
  return CastGramShape{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]};
}
int emulated_plan(int dtype, const int64_t* s, int sm_count, size_t max_smem, int64_t* cuts) {
  const CastGramPlan plan =
      cast_masked_gram_cuda_plan(CastDtype(dtype), shape_of(s), sm_count, max_smem);
  cuts[0] = plan.splits;
  cuts[1] = plan.kernel_group;
  cuts[2] = plan.mask_group;
  return plan.unsupported == nullptr;
}
int emulated_forward(int dtype, const int64_t* s, int sm_count, size_t max_smem, const void* f,
                     const void* m, const void* p, const void* inv, void* scratch, void* g) {
  const CastGramPlan plan =
      cast_masked_gram_cuda_plan(CastDtype(dtype), shape_of(s), sm_count, max_smem);
  return cast_masked_gram_cuda_forward(CastDtype(dtype), shape_of(s), plan, f, m, p, inv,
                                       scratch, g, nullptr);
}
int emulated_backward(int dtype, const int64_t* s, int sm_count, size_t max_smem,
                      const void* sym, const void* f, const void* m, const void* p, void* df) {
  const CastGramPlan plan =
      cast_masked_gram_cuda_plan(CastDtype(dtype), shape_of(s), sm_count, max_smem);
  return cast_masked_gram_cuda_backward(CastDtype(dtype), shape_of(s), plan, sym, f, m, p, df,
                                        nullptr);
}
}
"""

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
H100 = dict(sm_count=132, max_smem=227 * 1024)


def host_source(cu_text: str) -> str:
    """The .cu text with its launches and dynamic shared memory routed to the emulation."""
    launch = re.compile(r"([\w<>]+)<<<(.*?)>>>\((.*?)\);", re.DOTALL)
    text, launches = launch.subn(
        lambda m: f"emulated_launch({m[2]}, [&] {{ {m[1]}({m[3]}); }});", cu_text
    )
    text, shared = re.subn(
        r"extern __shared__ .*? (\w+)\[\];", r"unsigned char* \1 = emulated_shared;", text
    )
    assert launches == 3 and shared == 2, "the emulation no longer matches the kernels' source"
    return text + C_ENTRY_POINTS


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    build = tmp_path_factory.mktemp("cuda_emulation")
    for header in ("cuda_runtime_api.h", "cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (build / header).write_text('#include "cuda_emulation.h"\n')
    (build / "cuda_emulation.h").write_text(CUDA_EMULATION)
    source = build / "masked_gram_host.cpp"
    source.write_text(host_source((CSRC / "masked_gram_cuda.cu").read_text()))
    library = build / "masked_gram_host.so"
    command = [
        GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
        f"-I{build}", f"-I{CSRC}", str(source), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def run_emulated(lib, features, masks, kernels, grad, machine=H100):
    """What csrc/masked_gram_cuda.cpp does around the launchers, on host tensors."""
    B, C, H, W = features.shape
    (J, r, _), (Bm, K) = kernels.shape, masks.shape[:2]
    shape = (ctypes.c_int64 * 8)(B, C, H, W, Bm, K, J, r)
    code, acc = DTYPE_CODES[features.dtype], gram_dtype(features.dtype)
    machine = (machine["sm_count"], ctypes.c_size_t(machine["max_smem"]))
    cuts = (ctypes.c_int64 * 3)()
    assert lib.emulated_plan(code, shape, *machine, cuts), "the plan says unsupported"
    splits = cuts[0]
    inv = inverse_mass(masks.double()).to(acc)
    scratch = torch.full((splits, B, J, K, C, C), float("nan"), dtype=acc)
    gram = torch.full((B, J, K, C, C), float("nan"), dtype=acc)
    ptr = [t.data_ptr() for t in (features, masks, kernels, inv, scratch, gram)]
    assert lib.emulated_forward(code, shape, *machine, *map(ctypes.c_void_p, ptr)) == 0

    g = grad.to(acc)
    sym = ((g + g.transpose(-1, -2)) * inv[:, None, :, None, None]).contiguous()
    d_features = torch.full_like(features, float("nan"))
    ptr = [t.data_ptr() for t in (sym, features, masks, kernels, d_features)]
    assert lib.emulated_backward(code, shape, *machine, *map(ctypes.c_void_p, ptr)) == 0
    return gram, d_features, tuple(cuts)


def canonical_case(case, dtype):
    features, masks, kernels = case.inputs(dtype, "cpu", seed=CASES.index(case))
    if masks is None:
        masks = torch.ones(1, 1, case.H, case.W, dtype=dtype)
    return features, (masks if masks.dim() == 4 else masks[None]).contiguous(), kernels


def check_against_reference(lib, features, masks, kernels, tol, machine=H100):
    f64, m64, p64 = features.double(), masks.double(), kernels.double()
    expected = masked_gram_reference(f64, m64, p64)
    grad = torch.randn(
        expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    expected_grad = masked_gram_backward_reference(grad, f64, m64, p64)
    gram, d_features, cuts = run_emulated(lib, features, masks, kernels, grad, machine)
    assert torch.isfinite(gram).all() and torch.isfinite(d_features).all()
    assert relative_error(gram, expected) <= tol
    assert relative_error(d_features, expected_grad) <= tol
    assert torch.equal(gram, gram.transpose(-1, -2)), "G must be mirrored exactly"
    return gram, cuts


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_emulated_kernels_match_reference(emulated, case):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        gram, _ = check_against_reference(emulated, *canonical_case(case, dtype), tol)
        if case.masks == "empty":
            assert (gram[:, :, -1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_emulated_low_precision(emulated, dtype):
    case = next(c for c in CASES if c.label == "C=40 several channel tiles")
    check_against_reference(emulated, *canonical_case(case, dtype), 2e-2)


def random_inputs(B, C, H, W, J, K, r, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    masks = torch.rand(B, K, H, W, generator=gen, dtype=dtype)
    return features, masks, torch.randn(J, r, r, generator=gen, dtype=dtype)


def test_emulated_splits_of_positions(emulated):
    """9 tiles of positions: one split each on an H100; 5 uneven splits on 8 SMs."""
    inputs = random_inputs(1, 40, 19, 37, 2, 2, 5)
    _, cuts = check_against_reference(emulated, *inputs, 1e-5)
    assert cuts[0] == 9
    _, cuts = check_against_reference(
        emulated, *inputs, 1e-5, dict(sm_count=8, max_smem=H100["max_smem"])
    )
    assert cuts[0] == 5


def test_emulated_groups_of_kernels_and_masks(emulated):
    """Too little shared memory for all J * K Grams: one kernel and one mask per block."""
    inputs = random_inputs(2, 40, 5, 9, 4, 4, 1)
    _, cuts = check_against_reference(
        emulated, *inputs, 1e-5, dict(sm_count=132, max_smem=72 * 1024)
    )
    assert cuts[1:] == (1, 1)
