"""The host code of the CUDA backend (``csrc/masked_gram_cuda*.cu``, their kernels in
``csrc/masked_gram_cuda_kernels.cuh``; n_k's in ``csrc/mask_mass_cuda.cu``) built for this CPU
with g++ under a small CUDA emulation (no GPU, no CUDA toolkit): its kernels run one block at a
time, one ``std::thread`` per CUDA thread, ``__syncthreads`` a barrier, shared memory poisoned
with NaN (tests/test_cuda_sources.py compares them with the reference), and its plan says how a
launch on a given card cuts a shape and what it allocates (bench/bench_masked_gram.py's memory
model). Asynchronous work happens as late as a GPU may do it: a wgmma at the wait for its group
(reading its A registers, B in shared memory and its accumulators then), a cp.async copy at its
thread's wait (with ``late_copies``), so a missing or early wait gives wrong results, and work
still in flight when a block ends makes the launch fail.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

import torch

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
GXX = shutil.which("g++")

CUDA_EMULATION = r"""
// The CUDA names the kernels use, on the host: blocks run one after another, each with one
// std::thread per CUDA thread; __syncthreads is a barrier; shared memory starts as NaN, and so
// does a guard past it, which a write makes the launch fail.
// mma.sync and ldmatrix are warp-collective (masked_gram_mma.cuh's emulation, below); a
// misaligned 128-bit load makes the launch fail as it would on a GPU.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
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
// A thread's cp.async copies not yet landed (CAST_EMULATED_LATE_COPIES only).
struct EmulatedCopy {
  void* shared;
  const void* global;
  int bytes;
};
inline thread_local std::vector<EmulatedCopy> emulated_copies;
// A thread's wgmmas not yet performed: its accumulators, its A registers (where they are, read
// when it is performed) and B's descriptor; those issued since the last commit, and the
// committed groups, oldest first.
struct EmulatedWgmma {
  void (*perform)(float (&)[4][4], const uint32_t (&)[4], uint64_t);
  float (*d)[4][4];
  const uint32_t (*a)[4];
  uint64_t b;
};
inline thread_local std::vector<EmulatedWgmma> emulated_wgmma_open;
inline thread_local std::deque<std::vector<EmulatedWgmma>> emulated_wgmma_groups;


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
  const void* rows[2][32];  // ldmatrix's row addresses, by lane
};
inline std::vector<std::unique_ptr<EmulatedWarp>> emulated_warps;
inline thread_local unsigned emulated_turn = 0;
// The warp's lanes meet (and their shared-memory writes before it are seen after it).
inline void __syncwarp() { emulated_warps[threadIdx.x / 32]->barrier.arrive_and_wait(); }

// One pool of threads runs the blocks one after another; the kernels' own __syncthreads share
// the barrier, which CUDA already requires every thread of a block to reach alike.
template <class Body>
void emulated_launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, Body body) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  // Past the block's shared memory, a guard: NaN to a read, and a write to it faults.
  constexpr size_t kGuard = 64 * 1024;
  std::vector<unsigned char> shared(shared_bytes + 128 + kGuard);
  emulated_shared = shared.data() + (128 - reinterpret_cast<uintptr_t>(shared.data()) % 128);
  unsigned char* guard = emulated_shared + shared_bytes;
  std::memset(guard, 0xFF, kGuard);
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
            // a copy or wgmma still in flight when its block ends lands nowhere the kernel reads
            if (!emulated_copies.empty() || !emulated_wgmma_open.empty() ||
                !emulated_wgmma_groups.empty())
              emulated_fault = cudaErrorInvalidValue;
            emulated_copies.clear();
            emulated_wgmma_open.clear();
            emulated_wgmma_groups.clear();
            barrier.arrive_and_wait();  // the block is done before the next one's NaN
            if (t == 0 && std::any_of(guard, guard + kGuard, [](unsigned char b) {
                  return b != 0xFF;
                }))
              emulated_fault = cudaErrorInvalidValue;  // written past its shared memory
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
// A float64 product rounded on its own, never contracted (g++ at x86-64's baseline has no FMA).
inline double __dmul_rn(double a, double b) { return a * b; }
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
// An operand register's value `high` as the tensor cores read it: the register as TF32 for
// T = float, else its low (0) or high (1) 16-bit half.
template <typename T>
float emulated_operand(uint32_t reg, int high) {
  if constexpr (std::is_same_v<T, float>) {
    return emulated_tf32(reg);
  } else {
    const uint16_t bits = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xFFFFu);
    T v;
    std::memcpy(&v, &bits, 2);
    if constexpr (std::is_same_v<T, __half>) return __half2float(v);
    else return __bfloat162float(v);
  }
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
// ldmatrix.x4 (b16 pairs as 32-bit words): every lane posts its row's address, the warp meets,
// and each lane takes word l % 4 of row l / 4 of each of the four matrices. A row address
// not 16-byte aligned makes the launch fail, as on a GPU.
inline void load_matrix_x4(uint32_t (&r)[4], const void* row) {
  EmulatedWarp& warp = *emulated_warps[threadIdx.x / 32];
  const int turn = emulated_turn++ % 2, lane = threadIdx.x % 32;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) emulated_fault = cudaErrorMisalignedAddress;
  warp.rows[turn][lane] = row;
  warp.barrier.arrive_and_wait();
  for (int i = 0; i < 4; ++i)
    std::memcpy(&r[i], static_cast<const uint32_t*>(warp.rows[turn][8 * i + lane / 4]) + lane % 4,
                4);
}
// Fragments past `rows` / `cols` are not read: they may hold anything (here: NaN, which would
// show if they were).
template <typename T, int kM, int kN>
void mma_grid(float (&d)[kM][kN][4], const uint32_t (&a)[kM][4], const uint32_t (&b)[kN][2],
              int rows, int cols = kN) {
  constexpr int per = sizeof(T) == 4 ? 1 : 2, na = 4 * per, nb = 2 * per;  // values a fragment
  float av[kM * na], bv[kN * nb];
  for (int i = 0; i < kM * na; ++i)
    av[i] = i / na < rows ? emulated_operand<T>(a[i / na][i % na / per], i % per) : NAN;
  for (int i = 0; i < kN * nb; ++i)
    bv[i] = i / nb < cols ? emulated_operand<T>(b[i / nb][i % nb / per], i % per) : NAN;
  emulated_grid<8 * per>(d, av, bv, rows, cols);
}
// wgmma (built with CAST_WGMMA): each warp computes its own 16 rows of D at once, as mma.sync's
// grids above, from its lanes' A registers and B read through the descriptor by the PTX ISA's
// rules ("Matrix Descriptor Format"; K-major without swizzle: core matrices of 8 rows (n) x 16
// bytes (k), the row 16 bytes apart, the next 8 n at the stride-dimension offset, the next
// 16 bytes of k at the leading-dimension offset). A descriptor with swizzle or a base offset,
// or a start not 16-byte aligned, makes the launch fail. Asynchronous, as late as PTX allows:
// a wgmma only records where its operands are; the wait that its group's completion is
// guaranteed by performs it, reading its A registers, B in shared memory and its accumulators
// then. Every lane of a warp reaches the same waits, so the products stay warp-collective. A
// register set or shared memory rewritten, or accumulators read, before the wait shows as
// wrong results; a wait with wgmmas not committed, a block ending with any not waited for, or
// accumulators settled or an A register set held (below) while a wgmma that accesses them is
// not yet performed, makes the launch fail. The fences do nothing (the emulation has one
// proxy, and no compiler that moves register accesses).
inline uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emulated_shared);
}
template <typename T>
void emulated_wgmma_product(float (&d)[4][4], const uint32_t (&a)[4], uint64_t b) {
  constexpr int per = sizeof(T) == 4 ? 1 : 2, depth = 8 * per, chunk = 16 / sizeof(T);
  float av[8];
  for (int i = 0; i < 4 * per; ++i) av[i] = emulated_operand<T>(a[i / per], i % per);
  const int turn = emulated_post(av, 4 * per, nullptr, 0);
  if ((b >> 49 & 0x7) != 0 || (b >> 62) != 0) emulated_fault = cudaErrorInvalidValue;
  const unsigned char* start = emulated_shared + ((b & 0x3FFF) << 4);
  const size_t k_bytes = (b >> 16 & 0x3FFF) << 4, n_bytes = (b >> 32 & 0x3FFF) << 4;
  auto B = [&](int k, int n) {
    const unsigned char* at =
        start + n / 8 * n_bytes + k / chunk * k_bytes + n % 8 * 16 + k % chunk * sizeof(T);
    uint32_t bits = 0;
    std::memcpy(&bits, at, sizeof(T));
    return emulated_operand<T>(bits, 0);
  };
  const EmulatedWarp& warp = *emulated_warps[threadIdx.x / 32];
  float A[16][16];
  for (int lane = 0; lane < 32; ++lane)  // mma.sync's A layout, as emulated_grid reads it
    for (int reg = 0; reg < 4; ++reg)
      for (int e = 0; e < per; ++e)
        A[lane / 4 + 8 * (reg % 2)][per * (lane % 4) + e + depth / 2 * (reg / 2)] =
            warp.a[turn][lane][reg * per + e];
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  for (int nt = 0; nt < 4; ++nt)
    for (int c = 0; c < 4; ++c) {
      const int row = g + 8 * (c / 2), col = nt * 8 + 2 * t + c % 2;
      float sum = d[nt][c];
      for (int k = 0; k < depth; ++k) sum += A[row][k] * B(k, col);
      d[nt][c] = sum;
    }
}
template <typename T>
void wgmma_m64n32(float (&d)[4][4], const uint32_t (&a)[4], uint64_t b) {
  emulated_wgmma_open.push_back({emulated_wgmma_product<T>, &d, &a, b});
}
inline void wgmma_fence() {}
inline void wgmma_commit() {
  emulated_wgmma_groups.push_back(std::move(emulated_wgmma_open));
  emulated_wgmma_open.clear();
}
template <int kPending>
void wgmma_wait() {
  if (!emulated_wgmma_open.empty()) emulated_fault = cudaErrorInvalidValue;  // never waited for
  for (; emulated_wgmma_groups.size() > size_t{kPending}; emulated_wgmma_groups.pop_front())
    for (const EmulatedWgmma& w : emulated_wgmma_groups.front()) w.perform(*w.d, *w.a, w.b);
}
// Registers the kernel reads or rewrites from here on: a wgmma not yet performed that reads
// or writes them makes the launch fail (its wait should have come before).
inline void emulated_settled(const void* registers, size_t bytes) {
  const auto at = reinterpret_cast<uintptr_t>(registers);
  const auto in = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) - at < bytes; };
  const auto pending = [&](const EmulatedWgmma& w) { return in(w.d) || in(w.a); };
  bool any = std::any_of(emulated_wgmma_open.begin(), emulated_wgmma_open.end(), pending);
  for (const auto& group : emulated_wgmma_groups)
    any = any || std::any_of(group.begin(), group.end(), pending);
  if (any) emulated_fault = cudaErrorInvalidValue;
}
template <int kM, int kN>
void wgmma_settled(float (&d)[kM][kN][4]) { emulated_settled(d, sizeof d); }
inline void wgmma_hold(const uint32_t (&a)[4]) { emulated_settled(a, sizeof a); }
inline void fence_async_shared() {}
// cp.async, faulting unless 16-byte aligned: the copy at once (the wait is then a no-op), or,
// with CAST_EMULATED_LATE_COPIES, as late as a GPU may land it: the destination is NaN from the
// issue until the issuing thread's wait, which lands the copy (then, not before, a write by
// another thread to the destination is lost). Reading a copy before its wait and a barrier, or
// issuing one into shared memory that others still read, then shows as NaN.
inline void land_copy(const EmulatedCopy& copy) {
  std::memset(copy.shared, 0, 16);
  std::memcpy(copy.shared, copy.global, copy.bytes);
}
inline void copy_async_16(void* shared, const void* global, int bytes) {
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 ||
      (bytes > 0 && reinterpret_cast<uintptr_t>(global) % 16 != 0)) {
    emulated_fault = cudaErrorMisalignedAddress;
    return;
  }
#ifdef CAST_EMULATED_LATE_COPIES
  std::memset(shared, 0xFF, 16);  // NaN in every dtype
  emulated_copies.push_back({shared, global, bytes});
#else
  land_copy({shared, global, bytes});
#endif
}
inline void copy_async_wait_all() {
  for (const EmulatedCopy& copy : emulated_copies) land_copy(copy);
  emulated_copies.clear();
}
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
  cuts[8] = plan.scratch_grams;
  cuts[9] = plan.symmetric_scratch;
  cuts[10] = plan.backward_f_resident;
  cuts[11] = plan.backward_own_mirrors;
  return plan.unsupported == nullptr;
}
// kernel_group: the plan's own where 0, else this many kernels a block (a test's variant).
int emulated_forward(int dtype, const int64_t* s, const int64_t* machine, int64_t kernel_group,
                     const void* f, const void* m, const void* p, const void* inv, void* scratch,
                     void* g) {
  CastGramPlan plan = plan_of(dtype, s, machine);
  if (kernel_group > 0) plan.kernel_group = kernel_group;
  return cast_masked_gram_cuda_forward(CastDtype(dtype), shape_of(s), plan, f, m, p, inv,
                                       scratch, g, nullptr);
}
// symmetric: S's scratch (B, J, K, C, C) A where the plan takes one, or `scratch` >= 0 says.
// scratch: the plan's choice where -1, else whether S goes whole into `symmetric` (a test's).
int emulated_backward(int dtype, const int64_t* s, const int64_t* machine, int64_t scratch,
                      const void* grad, const void* inv, const void* f, const void* m,
                      const void* p, void* symmetric, void* df) {
  CastGramPlan plan = plan_of(dtype, s, machine);
  if (scratch >= 0) plan.symmetric_scratch = scratch > 0 && plan.backward_rows > 0;
  return cast_masked_gram_cuda_backward(CastDtype(dtype), shape_of(s), plan, grad, inv, f, m, p,
                                        symmetric, df, nullptr);
}
int emulated_inverse_mask_mass(int dtype, int64_t planes, int64_t positions, const void* m,
                               double* partials, void* inv) {
  return cast_inverse_mask_mass_cuda(CastDtype(dtype), planes, positions, m, partials, inv,
                                     nullptr);
}
int64_t emulated_mass_chunks(int64_t positions) { return cast_mass_chunks(positions); }
}
"""

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
# The plan's fields, in the order emulated_plan writes them.
PLAN_FIELDS = ("splits", "kernel_group", "mask_group", "tensor_cores", "tile_rows", "forward_smem",
               "backward_smem", "backward_rows", "scratch_grams", "symmetric_scratch",
               "backward_f_resident", "backward_own_mirrors")  # fmt: skip


# The kernels' launches and dynamic shared memory arrays, by file (none in the other parts).
KERNEL_SITES = {"masked_gram_cuda_kernels.cuh": (4, 3), "mask_mass_cuda.cu": (2, 1)}


def host_source(cu_text: str, sites: tuple[int, int]) -> str:
    """The kernels' text with their launches and dynamic shared memory routed to the emulation;
    ``sites``: how many of each the text must hold."""
    launch = re.compile(r"([\w<>]+)<<<(.*?)>>>\((.*?)\);", re.DOTALL)
    text, launches = launch.subn(
        lambda m: f"emulated_launch({m[2]}, [&] {{ {m[1]}({m[3]}); }});", cu_text
    )
    text, shared = re.subn(
        r"extern __shared__ .*? (\w+)\[\];", r"unsigned char* \1 = emulated_shared;", text
    )
    assert (launches, shared) == sites, "the emulation no longer matches the kernels' source"
    return text


def write_headers(folder: pathlib.Path) -> None:
    """The emulation's headers, in ``folder``: CUDA's runtime and types, and
    ``masked_gram_mma.cuh``'s primitives."""
    for header in ("cuda_runtime_api.h", "cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (folder / header).write_text('#include "cuda_emulation.h"\n')
    (folder / "cuda_emulation.h").write_text(CUDA_EMULATION)
    (folder / "masked_gram_mma.cuh").write_text(MMA_EMULATION)


def build(
    folder: pathlib.Path,
    optimisation: str = "-O1",
    late_copies: bool = False,
    wgmma: bool = False,
) -> ctypes.CDLL:
    """Compiles the emulated .cu into ``folder`` and loads it (about 3 s at -O0, for the plan
    alone; the kernels run faster at -O1). ``late_copies``: cp.async copies land at their
    thread's wait, their destinations NaN until then (else at once). ``wgmma``: the kernels as
    nvcc builds them for sm_90a (CAST_WGMMA), else as for every other target."""
    if GXX is None:
        raise RuntimeError("the CUDA emulation needs g++, which is not installed")
    write_headers(folder)
    # The parts that the build compiles one by one, here one translation unit: each part's copy
    # includes the emulated kernels' header beside it.
    kernels = "masked_gram_cuda_kernels.cuh"
    (folder / kernels).write_text(host_source((CSRC / kernels).read_text(), KERNEL_SITES[kernels]))
    parts = sorted(CSRC.glob("*.cu"))
    for part in parts:
        sites = KERNEL_SITES.get(part.name, (0, 0))
        (folder / part.name).write_text(host_source(part.read_text(), sites))
    source = folder / "masked_gram_host.cpp"
    source.write_text("".join(f'#include "{part.name}"\n' for part in parts) + C_ENTRY_POINTS)
    library = folder / "masked_gram_host.so"
    command = [
        GXX, "-std=c++20", optimisation, "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
        f"-I{folder}", f"-I{CSRC}", str(source), "-o", str(library),
    ] + (["-DCAST_EMULATED_LATE_COPIES"] if late_copies else [])  # fmt: skip
    command += ["-DCAST_WGMMA"] if wgmma else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the CUDA emulation does not build:\n{result.stderr}")
    lib = ctypes.CDLL(str(library))
    lib.emulated_mass_chunks.restype = ctypes.c_int64
    return lib


def plan(
    lib: ctypes.CDLL,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    allow_tf32: bool,
    *,
    compute_capability: int,
    max_smem: int,
) -> dict[str, int] | None:
    """``cast_masked_gram_cuda_plan`` for ``shape`` = (B, C, H, W, Bm, K, J, r) on a card of
    that compute capability and shared memory per block: its fields by name, or None where
    the shape is unsupported."""
    machine = (ctypes.c_int64 * 3)(allow_tf32, compute_capability, max_smem)
    cuts = (ctypes.c_int64 * len(PLAN_FIELDS))()
    supported = lib.emulated_plan(DTYPE_CODES[dtype], (ctypes.c_int64 * 8)(*shape), machine, cuts)
    return dict(zip(PLAN_FIELDS, cuts, strict=True)) if supported else None
