"""The CUDA C++ sources, checked without a GPU.

1. Every ``csrc/*.cu`` compiles with ``nvcc`` for Hopper and Ampere, warnings as errors, so a
   syntax or template error cannot land (skipped where nvcc is absent); the ATen glue
   ``csrc/masked_gram_cuda_ops.cpp`` parses against torch's and CUDA's headers.
2. The kernels of ``csrc/masked_gram_cuda.cu`` run on the CPU, unchanged, under a small CUDA
   emulation (``CUDA_EMULATION`` below): one block at a time, one ``std::thread`` per CUDA thread,
   ``__syncthreads`` a barrier, shared memory poisoned with NaN; their forward and backward are
   compared with the float64 reference on the op tests' labelled shapes. This checks the index
   arithmetic, halos, tiling, splits and barriers' placement; it cannot check timing, warp-level
   behaviour or the ATen glue at run time (tests/test_gpu.py does, on a GPU).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from cases import CASES, Case, relative_error

from cast.ops import canonical_inverse_mass
from cast.reference import (
    gram_dtype,
    masked_gram_backward_reference,
    masked_gram_reference,
    symmetric_grad,
)

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
ARCHS = ["sm_90", "sm_80"]


def ptxas_report(stderr: str) -> dict[str, dict[str, int]]:
    """Per kernel, what ``-Xptxas -v`` says: stack frame, spill stores and loads, registers,
    static shared memory (bytes)."""
    kernels, name = {}, None
    for line in stderr.splitlines():
        if found := re.search(r"Compiling entry function '(\w+)'", line):
            name = found[1]
            kernels[name] = dict(stack=0, spill_stores=0, spill_loads=0, registers=0, smem=0)
        elif name and (found := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill st", line)):
            kernels[name].update(stack=int(found[1]), spill_stores=int(found[2]))
            kernels[name]["spill_loads"] = int(re.search(r"(\d+) bytes spill loads", line)[1])
        elif name and (found := re.search(r"Used (\d+) registers", line)):
            kernels[name]["registers"] = int(found[1])
            if smem := re.search(r"(\d+) bytes smem", line):
                kernels[name]["smem"] = int(smem[1])
    return kernels


def cuobjdump() -> str | None:
    """The cuobjdump Triton ships (this machine's CUDA toolkit has only the compiler)."""
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.is_file() else shutil.which("cuobjdump")


def sass_opcodes(sass: str) -> dict[str, collections.Counter]:
    """Per kernel of a ``cuobjdump -sass`` listing, how often each opcode occurs."""
    kernels = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        kernels[name] = collections.Counter(re.findall(OPCODE, block, re.M))
    return kernels


OPCODE = r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Za-z0-9_.]*)"


def hmma_runs(sass: str) -> dict[str, list[int]]:
    """Per kernel of a ``cuobjdump -sass`` listing, the lengths of its runs of HMMAs that no
    branch (BRA, or a convergence barrier BSSY / BSYNC) interrupts, in program order."""
    kernels = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        runs, run = [], 0
        for op in re.findall(OPCODE, block, re.M):
            if op.startswith("HMMA"):
                run += 1
            elif op.split(".")[0] in ("BRA", "BSSY", "BSYNC") and run:
                runs, run = [*runs, run], 0
        kernels[block.split("\n", 1)[0].strip()] = runs + ([run] if run else [])
    return kernels


# Address, guard predicate, opcode, operands.
INSTRUCTION = re.compile(
    r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?(U?P[T\d]+)\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);", re.M
)


def registers(operand: str, width: int) -> set[str]:
    """The registers an operand names: ``R10`` of a 4-register operand is R10 .. R13; ``P4``."""
    if found := re.match(r"\s*-?\|?R(\d+)", operand):
        return {f"R{i}" for i in range(int(found[1]), int(found[1]) + width)}
    return {f"P{p}" for p in re.findall(r"^\s*!?P(\d)\b", operand)}


def innermost_loops(sass: str) -> dict[str, list[list[tuple[int, str, list[str]]]]]:
    """Per kernel of a ``cuobjdump -sass`` listing, the bodies of its innermost loops (a
    backward branch's, holding no other), each a list of (address, opcode, operands): the
    operands as written, then the guard predicate, read like an operand."""
    kernels = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        code = [
            (int(a, 16), op, [*ops.split(","), guard])
            for a, guard, op, ops in INSTRUCTION.findall(block)
        ]

        def back_to(address, op, ops):
            target = re.search(r"0x([0-9a-f]+)", ops[0]) if op.startswith("BRA") else None
            return int(target[1], 16) if target and int(target[1], 16) < address else None

        index = {x[0]: i for i, x in enumerate(code)}
        loops = []
        for end, (address, op, ops) in enumerate(code):
            head = back_to(address, op, ops)
            body = code[index[head] : end + 1] if head in index else []
            if body and not any(back_to(*x) is not None for x in body[:-1]):
                loops.append(body)
        kernels[block.split("\n", 1)[0].strip()] = loops
    return kernels


def hmmas_fed_early(sass: str) -> dict[str, list[tuple[int, int]]]:
    """Per kernel, for each innermost loop holding HMMAs: its HMMAs, and how many of them take
    operands that no shared-memory load of the same trip feeds (traced through the
    instructions between, predicates included), i.e. operands loaded a trip ahead."""
    return {
        name: [fed_early(body) for body in loops if any(op[1].startswith("HMMA") for op in body)]
        for name, loops in innermost_loops(sass).items()
    }


def fed_early(body) -> tuple[int, int]:
    fed, hmmas, early = set(), 0, 0  # fed: registers this trip's loads reach
    for _, op, ops in body:
        # HMMA's operands: D, A (4 registers), B (2), C (the accumulator: not an operand here).
        read = [*ops[1:3], ops[-1]] if op.startswith("HMMA") else ops[1:]
        widths = (4, 2, 1) if op.startswith("HMMA") else (1,) * len(read)
        sources = set().union(set(), *map(registers, read, widths))
        if op.startswith("HMMA"):
            hmmas, early = hmmas + 1, early + (not sources & fed)
            continue
        written = registers(ops[0], {"64": 2, "128": 4}.get(op.split(".")[-1], 1))
        fed = fed | written if op.startswith("LDS") or sources & fed else fed - written
    return hmmas, early


@functools.cache
def compiled(source: pathlib.Path, arch: str, folder: str) -> subprocess.CompletedProcess:
    """nvcc's verdict on ``source`` for ``arch``, warnings as errors, with ptxas' report; the
    object lands in ``folder`` for cuobjdump."""
    command = [
        NVCC, "-std=c++20", f"-arch={arch}", "-O3", "--use_fast_math",
        "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", "-Xptxas", "-v",
        "-c", str(source), "-o", str(pathlib.Path(folder) / f"{source.stem}-{arch}.o"),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def build_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nvcc"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=[p.name for p in CU_SOURCES])
def test_nvcc_compiles_warning_free(source, arch, build_folder):
    """Warning-free for Hopper and Ampere, and what ptxas reports per kernel: at most 255
    registers, 227 KiB of static shared memory and no spills (no stack frame) in any kernel,
    float64's included."""
    result = compiled(source, arch, build_folder)
    assert result.returncode == 0, result.stderr
    report = [line for line in result.stderr.splitlines() if line.startswith("ptxas info")]
    warnings = [line for line in result.stderr.splitlines() if line not in report]
    assert [line for line in warnings if "bytes stack frame" not in line] == [], result.stderr
    kernels = ptxas_report(result.stderr)
    assert any("fwd" in name for name in kernels) and any("bwd" in name for name in kernels)
    for name, used in kernels.items():
        assert used["registers"] <= 255 and used["smem"] <= 227 * 1024, (name, used)
        spilled = used["stack"] + used["spill_stores"] + used["spill_loads"]
        assert spilled == 0, f"{name} on {arch}: {used}"


# The kernels' template arguments (input type, tensor cores) as the mangled names spell them.
# The last template argument: 0 for the kernels the op runs, 1-4 for bench/gpu_probe.py's variants.
FORWARD_KERNEL = re.compile(
    r"_masked_gram_fwd_kernelI(f|d|13__nv_bfloat16|6__half)Lb([01])ELi\dELi0E"
)
MMA_BACKWARD_KERNEL = re.compile(
    r"_masked_gram_bwd_mma_kernelI(f|13__nv_bfloat16|6__half)Li(\d)ELi0E"
)
# The tensor-core backward's n-tiles of 8 positions per warp (MmaBackwardTile::n_tiles) at
# r = 1, 3, 5 (and 7), by tile rows: an (input step, mask) iteration is 2 x n HMMAs.
BACKWARD_N_TILES = {8: (4, 6, 8), 4: (2, 4, 5, 7)}
PROBE_KERNEL = re.compile(r"_masked_gram_(fwd|bwd_mma)_kernelI(f|13__nv_bfloat16)\w*ELi[1-4]EE")
SIMT_BACKWARD_KERNEL = re.compile(r"_masked_gram_bwd_simt_kernelI(f|d|13__nv_bfloat16|6__half)E")
# The tensor-core instruction each input type's kernels must use, and the only one.
KERNEL_MMA = {"f": "HMMA.1688.F32.TF32", "13__nv_bfloat16": "HMMA.16816.F32.BF16",
               "6__half": "HMMA.16816.F32"}  # fmt: skip


@pytest.mark.skipif(NVCC is None or cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_cuda_machine_code(build_folder):
    """What the sm_90 machine code of every kernel shows, as the design promises: tensor-core
    kernels, forward and backward, use the MMA of their input type (m16n8k8 TF32 for float32,
    m16n8k16 bf16 / f16 for 16-bit input, never TF32 there) and the SIMT ones none; F's halo
    comes in 16-byte cp.async copies (LDGSTS) in the tensor-core kernels, forward and backward,
    in 128-bit loads in the SIMT forward. (That TF32 operands are rounded, not truncated, the
    emulation checks.)"""
    source = CSRC / "masked_gram_cuda.cu"
    result = compiled(source, "sm_90", build_folder)
    assert result.returncode == 0, result.stderr
    objdump = [cuobjdump(), "-sass", str(pathlib.Path(build_folder) / f"{source.stem}-sm_90.o")]
    sass = subprocess.run(objdump, capture_output=True, text=True, check=True).stdout
    kernels = sass_opcodes(sass)
    forward = {name: ops for name, ops in kernels.items() if FORWARD_KERNEL.search(name)}
    assert len(forward) == 10, sorted(kernels)  # 3 MMA types x 2 tile heights, 4 SIMT
    for name, ops in forward.items():
        dtype, tensor_cores = FORWARD_KERNEL.search(name).groups()
        mma = {op for op in ops if op.startswith("HMMA")}
        assert mma == ({KERNEL_MMA[dtype]} if tensor_cores == "1" else set()), (name, mma)
        vector = "LDGSTS.E.BYPASS.128" if tensor_cores == "1" else "LDG.E.128"
        assert sum(n for op, n in ops.items() if op.startswith(vector)) > 0, name
    backward = {name: ops for name, ops in kernels.items() if MMA_BACKWARD_KERNEL.search(name)}
    assert len(backward) == 6, sorted(kernels)  # 3 MMA types x 2 tile heights
    runs, fed, loops_of = hmma_runs(sass), hmmas_fed_early(sass), innermost_loops(sass)
    for name, ops in backward.items():
        dtype, rows = MMA_BACKWARD_KERNEL.search(name).groups()
        mma = {op for op in ops if op.startswith("HMMA")}
        assert mma == {KERNEL_MMA[dtype]}, (name, mma)
        assert ops["LDGSTS.E.BYPASS.128"] > 0, name
        # Whole iterations between branches: n-tiles a compile-time count, no test of the
        # bound between the HMMAs (there were 21 an iteration, the probe of effb4cf).
        n_tiles = BACKWARD_N_TILES[int(rows)]
        whole = {run for run in runs[name] for n in n_tiles if run % (2 * n) == 0}
        assert whole == set(runs[name]), (name, sorted(set(runs[name])))
        # The operands (S fragments, mask words) come a (k-step, mask) iteration ahead: in
        # every trip of the MMA loop (two iterations) the first iteration's HMMAs take
        # registers loaded in the trip before (they waited for loads issued just before them).
        loops = fed[name]
        assert loops and all(2 * early >= hmmas for hmmas, early in loops), (name, loops)
        # F's and S's 16-byte copies: no scalar border path inside their loops and a few
        # instructions a copy (were 48-91 with the scalar path inside: gpu-notes).
        copies = [body for body in loops_of[name] if any(x[1].startswith("LDGSTS") for x in body)]
        per_copy = [len(b) / sum(x[1].startswith("LDGSTS") for x in b) for b in copies]
        scalar = [x[1] for b in copies for x in b if x[1].startswith("LDG.")]
        assert copies and max(per_copy) <= 32 and not scalar, (name, per_copy, scalar)
    simt = [ops for name, ops in kernels.items() if SIMT_BACKWARD_KERNEL.search(name)]
    assert len(simt) == 4 and not any(op.startswith("HMMA") for ops in simt for op in ops)
    # 4 variants x 2 dtypes x forward and backward, all spill-free (the nvcc test)
    assert len([name for name in kernels if PROBE_KERNEL.search(name)]) == 16


def cuda_include_dirs() -> list[str]:
    """The directories nvcc itself searches, as it reports them."""
    dry_run = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    lines = [line for line in dry_run.stderr.splitlines() if "INCLUDES=" in line]
    return [d for line in lines for d in re.findall(r'(?:-I|-isystem" ")"?([^" ]+)', line)]


TORCH_INCLUDE = pathlib.Path(torch.__file__).parent / "include"


@pytest.mark.skipif(NVCC is None or GXX is None, reason="needs nvcc and g++")
@pytest.mark.skipif(not (TORCH_INCLUDE / "c10" / "cuda").is_dir(), reason="no c10/cuda headers")
def test_cuda_glue_parses(tmp_path):
    # A CPU build of torch ships c10/cuda's headers but not this one, generated by CUDA builds;
    # its macros only matter when linking.
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n")
    includes = [
        TORCH_INCLUDE, TORCH_INCLUDE / "torch" / "csrc" / "api" / "include", tmp_path,
        *cuda_include_dirs(), sysconfig.get_paths()["include"],
    ]  # fmt: skip
    command = [
        GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
        *(f"-isystem{d}" for d in includes), str(CSRC / "masked_gram_cuda_ops.cpp"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


CUDA_EMULATION = r"""
// The CUDA names the kernels use, on the host: blocks run one after another, each with one
// std::thread per CUDA thread; __syncthreads is a barrier; shared memory starts as NaN.
// mma.sync is warp-collective (masked_gram_mma.cuh's emulation, below); a misaligned 128-bit
// load makes the launch fail as it would on a GPU.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
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
constexpr cudaError_t cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMisalignedAddress = 2;
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) { return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
// Three SMs: the persistent kernels' blocks walk several items each.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 3;
  return cudaSuccess;
}
inline std::atomic<int> emulated_fault{cudaSuccess};
inline cudaError_t cudaGetLastError() { return emulated_fault.exchange(cudaSuccess); }


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

// The warps of the running block: a barrier each, and two turns of fragments for the emulated
// mma.sync (a lane writes the turn its previous call did not read; the barrier between two calls
// keeps a turn from being overwritten while a lane still reads it).
struct EmulatedWarp {
  std::barrier<> barrier{32};
  float a[2][32][32], b[2][32][32];
};
inline std::vector<std::unique_ptr<EmulatedWarp>> emulated_warps;
inline thread_local unsigned emulated_turn = 0;

// One pool of threads runs the blocks one after another; the kernels' own __syncthreads share
// the barrier, which CUDA already requires every thread of a block to reach alike.
template <class Body>
void emulated_launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Body body) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::vector<unsigned char> shared(shared_bytes + 128);
  emulated_shared = shared.data() + (128 - reinterpret_cast<uintptr_t>(shared.data()) % 128);
  std::barrier<> barrier(threads);
  emulated_barrier = &barrier;
  emulated_warps.clear();
  for (unsigned w = 0; w < threads / 32; ++w)
    emulated_warps.push_back(std::make_unique<EmulatedWarp>());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      emulated_turn = 0;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            if (t == 0) std::memset(emulated_shared, 0xFF, shared_bytes);  // NaN, float or double
            barrier.arrive_and_wait();
            blockIdx = dim3(bx, by, bz);
            body();
            barrier.arrive_and_wait();  // the block is done before the next one's NaN
          }
    });
  for (auto& thread : pool) thread.join();
}

// 128-bit loads through the read-only path fault, as on a GPU, unless 16-byte aligned.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 __ldg(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    emulated_fault = cudaErrorMisalignedAddress;
    return uint4{};
  }
  return *p;
}
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
"""

MMA_EMULATION = r"""
// masked_gram_mma.cuh on the host: each warp-level grid of mma.sync is warp-collective, as on a
// GPU. Every lane posts its fragment registers, the warp meets at its barrier, and each lane
// rebuilds every A (16 x depth) and B (depth x 8) fragment of the warp from all 32 lanes by the
// PTX fragment layouts (listed in the real header; this relies on exactly those facts: which
// lane holds which row and column, two 16-bit values per register with the lower k in the low
// half) and computes its own four entries of each D. A wrong layout in the kernel gives wrong
// Grams here too.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include "cuda_emulation.h"

inline float emulated_bits_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t round_to_tf32(float x) {  // cvt.rna.tf32.f32: to nearest, ties away from zero
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u + 0x1000u) & ~0x1FFFu;
}
// Post this lane's values, wait for the warp, return the turn to read.
inline int emulated_post(const float* a, int na, const float* b, int nb) {
  EmulatedWarp& warp = *emulated_warps[threadIdx.x / 32];
  const int turn = emulated_turn++ % 2, lane = threadIdx.x % 32;
  for (int i = 0; i < na; ++i) warp.a[turn][lane][i] = a[i];
  for (int i = 0; i < nb; ++i) warp.b[turn][lane][i] = b[i];
  warp.barrier.arrive_and_wait();
  return turn;
}
// The tensor cores read 19 bits of a TF32 operand: the low 13 are ignored.
inline float emulated_tf32(uint32_t bits) { return emulated_bits_float(bits & ~0x1FFFu); }
template <typename T>
float emulated_half(uint32_t two, int high) {
  const uint16_t bits = static_cast<uint16_t>(high ? two >> 16 : two & 0xFFFFu);
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}
// `a`: per lane 4 registers per A fragment, `b` 2 per B fragment, as floats, `per` values per
// register (1 for TF32 at depth 8, 2 for 16-bit at depth 16).
template <int depth, int kM, int kN>
void emulated_grid(float (&d)[kM][kN][4], const float* a, const float* b, int rows, int cols) {
  constexpr int per = depth / 8;
  const int turn = emulated_post(a, kM * 4 * per, b, kN * 2 * per);
  const EmulatedWarp& warp = *emulated_warps[threadIdx.x / 32];
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  for (int i = 0; i < rows; ++i)
    for (int n = 0; n < cols; ++n) {
      float A[16][16], B[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        const int lg = lane / 4, lt = lane % 4;
        const float* x = warp.a[turn][lane] + i * 4 * per;
        const float* y = warp.b[turn][lane] + n * 2 * per;
        // A's registers: rows g, g+8, g, g+8; columns per*t.. then depth/2 further.
        for (int reg = 0; reg < 4; ++reg)
          for (int e = 0; e < per; ++e)
            A[lg + 8 * (reg % 2)][per * lt + e + depth / 2 * (reg / 2)] = x[reg * per + e];
        // B's registers: rows per*t.. then depth/2 further; column g.
        for (int reg = 0; reg < 2; ++reg)
          for (int e = 0; e < per; ++e) B[per * lt + e + depth / 2 * reg][lg] = y[reg * per + e];
      }
      for (int c = 0; c < 4; ++c) {  // D: rows g, g, g+8, g+8; columns 2t, 2t+1
        const int row = g + 8 * (c / 2), col = 2 * t + c % 2;
        float sum = d[i][n][c];
        for (int k = 0; k < depth; ++k) sum += A[row][k] * B[k][col];
        d[i][n][c] = sum;
      }
    }
}
// Fragments past `rows` / `cols` are not read: they may hold anything (here: NaN, which would
// show if they were).
template <int kM, int kN>
void mma_grid_tf32(float (&d)[kM][kN][4], const uint32_t (&a)[kM][4], const uint32_t (&b)[kN][2],
                   int rows, int cols = kN) {
  float av[kM * 4], bv[kN * 2];
  for (int i = 0; i < kM * 4; ++i) av[i] = i / 4 < rows ? emulated_tf32(a[i / 4][i % 4]) : NAN;
  for (int i = 0; i < kN * 2; ++i) bv[i] = i / 2 < cols ? emulated_tf32(b[i / 2][i % 2]) : NAN;
  emulated_grid<8>(d, av, bv, rows, cols);
}
template <typename T, int kM, int kN>
void mma_grid_16bit(float (&d)[kM][kN][4], const uint32_t (&a)[kM][4], const uint32_t (&b)[kN][2],
                    int rows, int cols = kN) {
  float av[kM * 8], bv[kN * 4];
  for (int i = 0; i < kM * 8; ++i)
    av[i] = i / 8 < rows ? emulated_half<T>(a[i / 8][i % 8 / 2], i % 2) : NAN;
  for (int i = 0; i < kN * 4; ++i)
    bv[i] = i / 4 < cols ? emulated_half<T>(b[i / 4][i % 4 / 2], i % 2) : NAN;
  emulated_grid<16>(d, av, bv, rows, cols);
}
// cp.async: the copy at once (the wait is then a no-op), faulting unless 16-byte aligned.
inline void copy_async_16(void* shared, const void* global, int bytes) {
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 ||
      (bytes > 0 && reinterpret_cast<uintptr_t>(global) % 16 != 0)) {
    emulated_fault = cudaErrorMisalignedAddress;
    return;
  }
  std::memset(shared, 0, 16);
  std::memcpy(shared, global, bytes);
}
inline void copy_async_wait_all() {}
"""

C_ENTRY_POINTS = r"""
extern "C" {
static CastGramShape shape_of(const int64_t* s) {
  return CastGramShape{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]};
}
static CastGramPlan plan_of(int dtype, const int64_t* s, const int64_t* machine) {
  return cast_masked_gram_cuda_plan(CastDtype(dtype), shape_of(s), machine[0], machine[1],
                                    machine[2]);
}
// machine: allow_tf32, compute capability, shared memory per block.
int emulated_plan(int dtype, const int64_t* s, const int64_t* machine, int64_t* cuts) {
  const CastGramPlan plan = plan_of(dtype, s, machine);
  cuts[0] = plan.splits;
  cuts[1] = plan.kernel_group;
  cuts[2] = plan.mask_group;
  cuts[3] = plan.tensor_cores;
  cuts[4] = plan.tile_rows;
  cuts[5] = static_cast<int64_t>(plan.forward_smem);
  cuts[6] = static_cast<int64_t>(plan.backward_smem);
  cuts[7] = plan.backward_rows;
  return plan.unsupported == nullptr;
}
int emulated_forward(int dtype, const int64_t* s, const int64_t* machine, const void* f,
                     const void* m, const void* p, const void* inv, void* scratch, void* g) {
  return cast_masked_gram_cuda_forward(CastDtype(dtype), shape_of(s), plan_of(dtype, s, machine),
                                       f, m, p, inv, scratch, g, nullptr);
}
int emulated_backward(int dtype, const int64_t* s, const int64_t* machine, const void* sym,
                      const void* f, const void* m, const void* p, void* df) {
  return cast_masked_gram_cuda_backward(CastDtype(dtype), shape_of(s),
                                        plan_of(dtype, s, machine), sym, f, m, p, df, nullptr);
}
}
"""

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
H100 = dict(compute_capability=90, max_smem=227 * 1024)
V100 = dict(compute_capability=70, max_smem=96 * 1024)  # no TF32
RTX_4090 = dict(compute_capability=89, max_smem=99 * 1024)


def host_source(cu_text: str) -> str:
    """The .cu text with its launches and dynamic shared memory routed to the emulation."""
    launch = re.compile(r"([\w<>]+)<<<(.*?)>>>\((.*?)\);", re.DOTALL)
    text, launches = launch.subn(
        lambda m: f"emulated_launch({m[2]}, [&] {{ {m[1]}({m[3]}); }});", cu_text
    )
    text, shared = re.subn(
        r"extern __shared__ .*? (\w+)\[\];", r"unsigned char* \1 = emulated_shared;", text
    )
    assert launches == 3 and shared == 3, "the emulation no longer matches the kernels' source"
    return text + C_ENTRY_POINTS


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not installed")
    build = tmp_path_factory.mktemp("cuda_emulation")
    for header in ("cuda_runtime_api.h", "cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (build / header).write_text('#include "cuda_emulation.h"\n')
    (build / "cuda_emulation.h").write_text(CUDA_EMULATION)
    (build / "masked_gram_mma.cuh").write_text(MMA_EMULATION)
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


def run_emulated(lib, features, masks, kernels, grad, allow_tf32, machine):
    """What cast/ops.py and csrc/masked_gram_cuda_ops.cpp do around the launchers, on host
    tensors: ``1 / n_k`` and ``(dG + dG^T) / n_k`` as the op's entry forms them."""
    B, C, H, W = features.shape
    (J, r, _), (Bm, K) = kernels.shape, masks.shape[:2]
    shape = (ctypes.c_int64 * 8)(B, C, H, W, Bm, K, J, r)
    code, acc = DTYPE_CODES[features.dtype], gram_dtype(features.dtype)
    machine = (ctypes.c_int64 * 3)(allow_tf32, machine["compute_capability"], machine["max_smem"])
    cuts = (ctypes.c_int64 * 8)()
    assert lib.emulated_plan(code, shape, machine, cuts), "the plan says unsupported"
    splits = cuts[0]
    inv = canonical_inverse_mass(features, masks, None)
    scratch = torch.full((splits, B, J, K, C, C), float("nan"), dtype=acc)
    gram = torch.full((B, J, K, C, C), float("nan"), dtype=acc)
    ptr = [t.data_ptr() for t in (features, masks, kernels, inv, scratch, gram)]
    assert lib.emulated_forward(code, shape, machine, *map(ctypes.c_void_p, ptr)) == 0

    sym = symmetric_grad(grad.to(acc), inv).contiguous()
    d_features = torch.full_like(features, float("nan"))
    ptr = [t.data_ptr() for t in (sym, features, masks, kernels, d_features)]
    assert lib.emulated_backward(code, shape, machine, *map(ctypes.c_void_p, ptr)) == 0
    return gram, d_features, tuple(cuts)


def canonical_case(case, dtype):
    features, masks, kernels = case.inputs(dtype, "cpu", seed=CASES.index(case))
    if masks is None:
        masks = torch.ones(1, 1, case.H, case.W, dtype=dtype)
    return features, (masks if masks.dim() == 4 else masks[None]).contiguous(), kernels


def check_against_reference(lib, inputs, tol, allow_tf32=False, machine=H100):
    """Forward and backward against the reference; returns G and the plan's cuts."""
    features, masks, kernels = inputs
    f64, m64, p64 = features.double(), masks.double(), kernels.double()
    expected = masked_gram_reference(f64, m64, p64)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected_grad = masked_gram_backward_reference(grad, f64, m64, p64)
    gram, d_features, cuts = run_emulated(lib, *inputs, grad, allow_tf32, machine)
    assert torch.isfinite(gram).all() and torch.isfinite(d_features).all()
    assert relative_error(gram, expected) <= tol
    assert relative_error(d_features, expected_grad) <= tol
    assert torch.equal(gram, gram.transpose(-1, -2)), "G must be mirrored exactly"
    return gram, cuts


# (dtype, allow_tf32, SPEC §3 bound, whether the forward runs on tensor cores on an H100)
PRECISIONS = [
    (torch.float64, False, 1e-10, False),
    (torch.float32, False, 1e-5, False),
    (torch.float32, True, 3e-3, True),
    (torch.bfloat16, True, 2e-2, True),
    (torch.float16, True, 2e-2, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_emulated_kernels_match_reference(emulated, case):
    for dtype, allow_tf32, tol, tensor_cores in PRECISIONS:
        gram, cuts = check_against_reference(emulated, canonical_case(case, dtype), tol, allow_tf32)
        assert cuts[3] == tensor_cores and (cuts[7] > 0) == tensor_cores
        if case.masks == "empty":
            assert (gram[:, :, -1] == 0).all()


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-3)], ids=["simt", "tf32"])
def test_emulated_kernel_size_7(emulated, allow_tf32, tol):
    """r = 7 in float32, within the H100's shared memory (float64 stops at r = 5 there): the
    tensor-core forward drops to 4-row tiles, whose halo fits."""
    features, masks, kernels = Case("r=7", 1, 5, 11, 9, 2, 2, 7).inputs(torch.float32, "cpu", 7)
    inputs = (features, masks[None].contiguous(), kernels)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[4] == (4 if allow_tf32 else 2) and cuts[7] == (4 if allow_tf32 else 0)


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-3)], ids=["simt", "tf32"])
def test_emulated_kernel_size_9(emulated, allow_tf32, tol):
    """r = 9, the forward's widest kernel: its convolution's last case (convolve_odd's default);
    the backward takes it on CUDA cores."""
    features, masks, kernels = Case("r=9", 1, 3, 12, 10, 1, 2, 9).inputs(torch.float32, "cpu", 9)
    inputs = (features, masks[None].contiguous(), kernels)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[4] > 0 and cuts[7] == 0


@pytest.mark.parametrize("machine", [H100, V100], ids=["tensor cores", "no TF32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_emulated_low_precision(emulated, dtype, machine):
    case = next(c for c in CASES if c.label == "C=40 several channel tiles")
    _, cuts = check_against_reference(emulated, canonical_case(case, dtype), 2e-2, True, machine)
    assert cuts[3] == (machine is H100)


def random_inputs(B, C, H, W, J, K, r, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    masks = torch.rand(B, K, H, W, generator=gen, dtype=dtype)
    return features, masks, torch.randn(J, r, r, generator=gen, dtype=dtype)


@pytest.mark.parametrize("allow_tf32,tol", [(False, 1e-5), (True, 3e-3)], ids=["simt", "tf32"])
def test_emulated_splits_of_positions(emulated, allow_tf32, tol):
    """Tiles of 8 x 16 positions on tensor cores, 2 x 16 on SIMT. 9 tiles in 9 splits (SIMT 30)
    at B = 1; at B = 2, 35 tiles one a split (SIMT: 140 in 70 splits of 2). Interior tiles
    use every row of the backward's halo, also those on the last, partial, MMA tile."""
    inputs = random_inputs(1, 40, 19, 37, 2, 2, 3)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[0] == (9 if allow_tf32 else 30)
    inputs = random_inputs(2, 40, 40, 100, 1, 1, 3)
    _, cuts = check_against_reference(emulated, inputs, tol, allow_tf32)
    assert cuts[0] == (35 if allow_tf32 else 70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_mma_backward_blocks(emulated, dtype):
    """The tensor-core backward over several blocks of everything: C = 72 is three blocks of 32
    input channels (the last partial) and two of 64 output channels, W = 40 three tiles across
    (16-byte copies of F in both dtypes, the last tile partial), own masks per batch item."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(2, 72, 11, 40, 2, 3, 3))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    _, cuts = check_against_reference(emulated, (features, masks, kernels), tol, True)
    assert cuts[7] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_forward_tiles_per_split(emulated, dtype):
    """136 tiles of 8 x 16 positions in 68 splits (at most 132): a forward block walks two
    tiles, the second tile's halo arriving while the first's last MMAs run."""
    features, masks, kernels = (t.to(dtype) for t in random_inputs(1, 8, 136, 128, 2, 2, 3))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    _, cuts = check_against_reference(emulated, (features, masks, kernels), tol, True)
    assert cuts[0] == 68 and cuts[4] == 8


def test_emulated_groups_of_kernels_and_masks(emulated):
    """A forward block holds the Grams of at most 3 kernels x 3 masks in registers: J = K = 4
    runs in groups of 2 x 2. Each Gram's sum does not depend on its group: the first 3 kernels
    and masks give the very same bits alone, in one group of 3 x 3. C = 70: two channel blocks,
    so also a pair of different blocks (a < b)."""
    allow_tf32 = True
    features, masks, kernels = random_inputs(2, 70, 5, 9, 4, 4, 3)
    _, cuts = check_against_reference(emulated, (features, masks, kernels), 3e-3, allow_tf32)
    assert cuts[1:3] == (2, 2)
    grad = torch.randn(2, 4, 4, 70, 70, generator=torch.Generator().manual_seed(1))
    grouped, *_ = run_emulated(emulated, features, masks, kernels, grad, allow_tf32, H100)
    first = (features, masks[:, :3].contiguous(), kernels[:3], grad[:, :3, :3])
    alone, _, alone_cuts = run_emulated(emulated, *first, allow_tf32, H100)
    assert alone_cuts[1:3] == (3, 3)
    assert torch.equal(grouped[:, :3, :3], alone)


def test_emulated_small_shared_memory_falls_back_to_simt(emulated):
    """Where the tensor-core forward does not fit even with 4-row tiles (99 KiB at r = 3), the
    SIMT one runs; at r = 1 the 4-row tensor-core tiles fit."""
    inputs = random_inputs(1, 40, 11, 19, 3, 3, 3)
    _, cuts = check_against_reference(emulated, inputs, 1e-5, True, RTX_4090)
    assert cuts[3] == 0 and cuts[4] == 2
    _, cuts = check_against_reference(
        emulated, random_inputs(1, 40, 11, 19, 1, 1, 1), 3e-3, True, RTX_4090
    )
    assert cuts[3] == 1 and cuts[4] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tf32", "bfloat16"])
def test_emulated_narrow_tiles(emulated, dtype):
    """With less shared memory the tensor-core forward takes 4-row tiles: still the reference."""
    K = 3 if dtype == torch.float32 else 1  # the backward's tiles must fit too
    inputs = tuple(t.to(dtype) for t in random_inputs(1, 70, 13, 21, 2, K, 3))
    small = H100 | dict(max_smem=(160 if dtype == torch.float32 else 110) * 1024)
    _, cuts = check_against_reference(emulated, inputs, 3e-3 if dtype == torch.float32 else 2e-2,
                                      True, small)  # fmt: skip
    assert cuts[3] == 1 and cuts[4] == 4 and cuts[7] == 4


def test_emulated_tf32_rounds_to_nearest(emulated):
    """Non-negative features, as after a ReLU: TF32 operands truncated (what the tensor cores do
    with unrounded float32) would make every product low, about 5e-4 of G; rounded to nearest
    the errors cancel, well under 1e-4."""
    features, masks, kernels = random_inputs(1, 64, 16, 16, 1, 1, 1)
    inputs = (features.abs(), masks, kernels.abs())
    expected = masked_gram_reference(*(t.double() for t in inputs))
    grad = torch.zeros(expected.shape, dtype=torch.float64)
    gram, *_ = run_emulated(emulated, *inputs, grad, True, H100)
    assert relative_error(gram, expected) < 1e-4


def test_emulated_tf32_backward_rounds_to_nearest(emulated):
    """The backward's TF32 operands on non-negative data (S rounded once where it lands in
    shared memory, m_k^2 Z_j per fragment): S left truncated, dF came 3.5e-4 off; rounded to
    nearest the errors cancel, under 5e-5."""
    features, masks, kernels = random_inputs(1, 64, 16, 16, 1, 1, 3)
    inputs = (features.abs(), masks, kernels.abs())
    grad = torch.rand(1, 1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = masked_gram_backward_reference(grad, *(t.double() for t in inputs))
    _, d_features, _ = run_emulated(emulated, *inputs, grad.double(), True, H100)
    assert relative_error(d_features, expected) < 5e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [64, 128, 256, 512])
def test_forward_plan_for_vgg_layers(emulated, dtype, C):
    """On an H100, every VGG style layer at r = 3, J = K = 3 gets the tensor-core forward with
    8-row tiles (128 positions per tile), all 9 Grams in one block, within 227 KiB."""
    shape = (ctypes.c_int64 * 8)(1, C, 64, 64, 1, 3, 3, 3)
    machine = (ctypes.c_int64 * 3)(True, H100["compute_capability"], H100["max_smem"])
    cuts = (ctypes.c_int64 * 8)()
    assert emulated.emulated_plan(DTYPE_CODES[dtype], shape, machine, cuts)
    assert cuts[1:5] == [3, 3, 1, 8] and cuts[7] == 8
    assert cuts[5] <= 227 * 1024 and cuts[6] <= 227 * 1024
