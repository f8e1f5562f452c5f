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
// tiles) against a row of B fragments. One call per step keeps the emulation's warp-wide
// meetings few.
template <int kM, int kN>
__device__ __forceinline__ void mma_grid_tf32(float (&d)[kM][kN][4], const uint32_t (&a)[kM][4],
                                              const uint32_t (&b)[kN][2], int rows,
                                              int cols = kN) {
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    if (i >= rows) break;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      if (n >= cols) break;
      mma_m16n8k8_tf32(d[i][n], a[i], b[n]);
    }
  }
}

template <typename T, int kM, int kN>
__device__ __forceinline__ void mma_grid_16bit(float (&d)[kM][kN][4], const uint32_t (&a)[kM][4],
                                               const uint32_t (&b)[kN][2], int rows,
                                               int cols = kN) {
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    if (i >= rows) break;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      if (n >= cols) break;
      mma_m16n8k16<T>(d[i][n], a[i], b[n]);
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
