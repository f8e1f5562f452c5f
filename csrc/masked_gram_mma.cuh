// The warp-level primitives of masked_gram_cuda.cu: TF32 rounding, the mma.sync tensor-core
// products, ldmatrix and cp.async copies. They are the only inline PTX of the kernels and live
// apart so that the kernels' CPU emulation (tests/test_cuda_sources.py) can put a
// warp-collective copy of each in their place; everything else in the .cu runs there unchanged.
//
// Fragments as the PTX ISA lays them out for mma.sync ("Matrix Fragments for mma.m16n8k8" and
// "...m16n8k16"), with g = lane / 4 and t = lane % 4, A row-major (M x K), B column-major
// (K x N), C and D row-major (16 x 8, float):
//   m16n8k8, TF32:       a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4);
//                        b0 (t, g)  b1 (t+4, g)
//   m16n8k16, f16/bf16:  a[0] (g, 2t..2t+1)  a[1] (g+8, 2t..)  a[2] (g, 2t+8..)
//                        a[3] (g+8, 2t+8..),
//                        each 32-bit register a pair of consecutive k, the lower k in its low half;
//                        b[0] (2t..2t+1, g)  b[1] (2t+8..2t+9, g)
//   C, D:                c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// Round to the nearest TF32 value (ties away from zero), as cvt.rna.tf32.f32: the tensor cores
// ignore the 13 low mantissa bits, so an unrounded operand would be truncated, biased low on
// non-negative data such as ReLU features.
__device__ __forceinline__ uint32_t round_to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return bits;
}

// d += a b, m16n8k8, TF32 operands, float accumulators.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the plan picks tensor cores only from sm_80 on
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += a b, m16n8k16, bfloat16 (T = __nv_bfloat16) or float16 (T = __half) operands, float
// accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  if constexpr (sizeof(T) == 2 && __is_same(T, __nv_bfloat16)) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// A warp's grid of products: d[i][n] += a[i] b[n] for the first `rows` A fragments and the
// first `cols` B fragments (both warp-uniform), i.e. a column of A fragments (masks, rows of
// tiles) against a row of B fragments, on the MMA of the input type T: m16n8k8 TF32 for float,
// m16n8k16 for __nv_bfloat16 and __half. One call per step keeps the emulation's warp-wide
// meetings few.
template <typename T, int kM, int kN>
__device__ __forceinline__ void mma_grid(float (&d)[kM][kN][4], const uint32_t (&a)[kM][4],
                                         const uint32_t (&b)[kN][2], int rows, int cols = kN) {
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    if (i >= rows) break;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      if (n >= cols) break;
      if constexpr (__is_same(T, float)) mma_m16n8k8_tf32(d[i][n], a[i], b[n]);
      else mma_m16n8k16<T>(d[i][n], a[i], b[n]);
    }
  }
}

// An A fragment from shared memory in one instruction (ldmatrix.x4, warp-collective): m16n8k8
// TF32, or m16n8k16 16-bit pairs (b16 pairs are 32-bit words, moved as they are): lane l gives the
// 16-byte aligned address of row l % 8 of matrix l / 8, and register i gets word l % 4 of row
// l / 4 of matrix i. Matrices 0 .. 3 = (rows 0-7, words 0-3), (rows 8-15, words 0-3), (rows
// 0-7, words 4-7), (rows 8-15, words 4-7) give a0 .. a3 in the order mma.sync takes them.
__device__ __forceinline__ void load_matrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // only the tensor-core kernels load this way
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

// wgmma, Hopper's warpgroup MMA (sm_90a only: compute_90 has no wgmma, so CAST_WGMMA is set
// where nvcc compiles for sm_90a and the kernels take mma.sync everywhere else). Four warps (a
// warpgroup, threads 128 q ..) issue it together; it runs asynchronously, its groups committed
// and waited for by wgmma_commit / wgmma_wait, and reads B from shared memory through a
// descriptor (masked_gram_cuda_kernels.cuh's wgmma_descriptor), which the async proxy reads:
// shared-memory stores must be fenced (fence_async_shared) before the barrier that publishes
// them. Fragments (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts" of wgmma),
// m64n32k8 TF32 / m64n32k16 16-bit: warp w % 4 of the group holds rows 16 (w % 4) .. of A and
// D in mma.sync's m16n8k8 / m16n8k16 A layout and m16n8 C layout (above), D's 32 columns as
// four n-tiles of 8.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CAST_WGMMA 1
#endif

// The shared-memory window address of a pointer into shared memory.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a b for the warpgroup: T = float (A TF32 bit patterns, k = 8) or a 16-bit type (k = 16,
// two k a register, the lower in the low half); b a descriptor of B (k x 32, K-major).
template <typename T>
__device__ __forceinline__ void wgmma_m64n32(float (&d)[4][4], const uint32_t (&a)[4],
                                             uint64_t b) {
#if defined(CAST_WGMMA)
#define CAST_WGMMA_D                                                                             \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
// scale-d is a predicate: true, so D accumulates.
#define CAST_WGMMA_REGISTERS                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, " \
  "%19}, %20, accumulate"
#define CAST_WGMMA_PREDICATE "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %21, 0;\n"
  if constexpr (sizeof(T) == 4) {
    asm volatile(CAST_WGMMA_PREDICATE
                 "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 " CAST_WGMMA_REGISTERS
                 ", 1, 1;\n}"
                 : CAST_WGMMA_D
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else if constexpr (__is_same(T, __nv_bfloat16)) {
    asm volatile(CAST_WGMMA_PREDICATE
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " CAST_WGMMA_REGISTERS
                 ", 1, 1, 0;\n}"
                 : CAST_WGMMA_D
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else {
    asm volatile(CAST_WGMMA_PREDICATE
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " CAST_WGMMA_REGISTERS
                 ", 1, 1, 0;\n}"
                 : CAST_WGMMA_D
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  }
#undef CAST_WGMMA_D
#undef CAST_WGMMA_REGISTERS
#undef CAST_WGMMA_PREDICATE
#else
  __trap();  // the kernels call it only where CAST_WGMMA is set
#endif
}

// Before a wgmma whose A or accumulator registers other instructions wrote.
__device__ __forceinline__ void wgmma_fence() {
#if defined(CAST_WGMMA)
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
// The wgmmas issued since the last commit become one group.
__device__ __forceinline__ void wgmma_commit() {
#if defined(CAST_WGMMA)
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
// Until at most kPending of this warpgroup's committed groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(CAST_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#endif
}
// Accumulators read after a wgmma_wait: the empty asm keeps the compiler from moving their
// reads above the wait, which it does not know writes them.
template <int kM, int kN>
__device__ __forceinline__ void wgmma_settled(float (&d)[kM][kN][4]) {
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][n][e])::"memory");
}
// A registers that a wgmma read, kept unchanged up to here (after the wait for its group).
__device__ __forceinline__ void wgmma_hold(const uint32_t (&a)[4]) {
  asm volatile("" ::"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]) : "memory");
}
// This thread's shared-memory stores, ordered before the async proxy's (wgmma's) reads.
__device__ __forceinline__ void fence_async_shared() {
#if defined(CAST_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// 16 bytes from global to shared memory without holding a register (cp.async, sm_80 on): the
// first `bytes` (16 or 0) from `global`, zeros for the rest. Both addresses 16-byte aligned.
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // only the tensor-core kernels copy this way
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(global),
               "r"(bytes)
               : "memory");
#endif
}

// Until every copy this thread issued has landed (other threads' copies: a barrier after).
__device__ __forceinline__ void copy_async_wait_all() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
