// CUDA kernels of the fused masked high-order Gram op (SPEC §1-2) and their plain launchers.
//
// Notation as in SPEC: F (B, C, H, W), masks m_k (Bm, K, H, W), kernels p_j (J, r, r) with
// h = r / 2, Z_j = P_j F (cross-correlation, zero padding), n_k = sum m_k^2.
//
// Forward, one block of 8 warps per (channel-block pair a <= b of 64 channels, split s of the
// positions, batch item, group of up to 3 kernels x 3 masks). For every tile of positions of
// its split (kRows x 16) it
//   1. loads F on the tile and its halo for the pair's 128 channels (64 on the diagonal) into
//      shared memory ONCE, in 16-byte global loads: the halo's columns are padded to whole
//      16-byte vectors (4 floats, 8 halves) on each side, which costs no extra DRAM sectors;
//   2. for each kernel j of its group forms Z_j on the tile in shared memory (each thread a
//      column of kRows outputs, two from 32-bit words for 16-bit input, every loaded value used
//      for up to r rows), stored as the MMA's operand in 16-byte chunks of positions
//      (z_offset): TF32 rounded to nearest for float32, the input type for 16-bit input;
//   3. adds (m_k^2 Z_j,a)^T Z_j,b for each mask k of its group to accumulators in registers
//      with mma.sync (m16n8k8 TF32, m16n8k16 bf16/f16; float accumulators), or, built for
//      sm_90a, with wgmma (m64n32, B from Z_j,b in shared memory through a descriptor): each
//      warp owns a 16 x 32 piece of all 3 x 3 (64 x 64) Grams (each warpgroup 64 x 32), m_k^2
//      is applied to the A fragment in registers, so Z_j's fragments are read from shared
//      memory once for all masks.
// 2 J + 1 barriers per tile. Split 0's partial Grams go to G itself, the other splits' to a
// scratch (S - 1, B, J, K, C, C); a second kernel sums the splits in a fixed order
// (deterministic, no atomics), scales by 1 / n_k and mirrors the upper triangle, in place.
// float64, and any input without tensor cores (float32 without allow_tf32, 16-bit below
// sm_80), take the same kernel with a SIMT step in place of mma.sync and 2-row tiles (not a
// speed path: no benchmark runs them).
//
// Backward, from dG and 1 / n_k, with S_jk = (dG_jk + dG_jk^T) / n_k formed a block at a time
// where it is used (or whole in a scratch first, where a tenth of the op's inputs and outputs
// holds it: plan.symmetric_scratch): on tensor cores, one block per SM walks items (tile of
// kRows x 16 outputs, 64 output channels, batch item) and forms, for each kernel j,
// U_j^T = [S_j1 | ... | S_jK] [m_1^2 Z_j; ...; m_K^2 Z_j]^T as one mma.sync chain K * C deep in
// registers (Z_j on the tile's h-halo, formed once per block of 32 input channels from F's
// 2h-halo, which arrives with S's blocks by cp.async, overlapping the previous MMAs), then
// applies the adjoint convolution (p_j rotated by 180 degrees) once into dF's accumulators in
// registers (details above the kernel). On CUDA cores (float64, float32 without TF32, 16-bit
// below sm_80, r > 7) the same sums with 32-channel blocks through shared memory. Nothing of
// size J * N * C is ever written to global memory.
#pragma once

#include "masked_gram_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <utility>

#include "cuda_element_type.cuh"
#include "masked_gram_mma.cuh"

namespace cast_cuda {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

template <typename T>
__device__ __forceinline__ T narrow(acc_t<T> v);
template <>
__device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float narrow<float>(float v) { return v; }
template <>
__device__ __forceinline__ double narrow<double>(double v) { return v; }

// The same bits as another type of the same size (std::bit_cast is not available in device code).
template <typename To, typename From>
__device__ __forceinline__ To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// dst[e] = m^2 for e < count, m = src[at(e)], or 0 where at(e) < 0 (outside the image): kBatch
// loads a thread in flight before their stores, rather than one load waited for at a time.
template <int kBatch, typename A, typename T, typename Index>
__device__ __forceinline__ void load_squares(A* dst, int count, const T* src, Index at) {
  for (int e0 = threadIdx.x; e0 < count; e0 += kBatch * static_cast<int>(blockDim.x)) {
    A m[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int e = e0 + i * static_cast<int>(blockDim.x);
      const int64_t where = e < count ? at(e) : -1;
      m[i] = where >= 0 ? widen(src[where]) : A(0);
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int e = e0 + i * static_cast<int>(blockDim.x);
      if (e < count) dst[e] = m[i] * m[i];
    }
  }
}

// Shapes and cuts, passed by value to every kernel.
struct Dims {
  int B, C, H, W, Bm, K, J, r;
  int channel_blocks;         // nb = ceil(C / channel block)
  int tiles_x, tiles;         // tiles of positions: per row of tiles, in all
  int splits, tiles_per_split;
  int kernel_group, mask_group, mask_groups;  // forward: kernels and masks per block
  bool vector_rows;  // rows of F start on 16 bytes (W a multiple of the vector, F aligned)
  bool own_mirrors;  // the tensor-core backward's dG mirrors in a region of their own
  bool s_formed;     // the tensor-core backward's `grad` is S whole (plan.symmetric_scratch)
  int f_blocks;      // the tensor-core backward's F halos in shared memory: 1, or every input
                     // block's, kept across the kernels j (plan.backward_f_resident)
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Variants of the tensor-core kernels for bench/gpu_probe.py alone (environment variable
// CAST_CUDA_PROBE, read by the launchers): one stage left out or done twice, to see where the
// time goes on a GPU. Their results are wrong; nothing else launches them.
enum Probe : int {
  kFull = 0,      // the kernel
  kLoadOnly = 1,  // the loads of F (and S, the masks) alone
  kNoMma = 2,     // everything but the MMAs
  kNoLoad = 3,    // F loaded for the first tile / step only
  kLoadTwice = 4  // F's loads issued twice
};

// A column of kOut outputs of a convolution on a channel-major tile in shared memory:
// out[o] += sum_{dy,dx} w(dy, dx) src[(o + dy) * stride + dx], the rows read once per dx and
// used for up to r outputs. `rows_in` (<= kOut + kR - 1) rows of src exist; w(dy, dx) is
// taps[dy * r + dx], or taps[(r-1-dy) * r + r-1-dx] for the backward's adjoint (kRotated). r is
// a template argument (convolve_odd or the backward's kernel template picks it): with a runtime
// r the loops kept a branch after every tap and a shared-memory round trip per tap (the probe's
// convolution stage, gpu-notes); unrolled, a column's rows and taps issue together and no row
// past the r taps is read. With the stride a constant too, every row is an immediate offset.
template <int kOut, int kR, bool kRotated, typename A, typename S>
__device__ __forceinline__ void convolve_column(A (&out)[kOut], const S* src, int stride,
                                                int rows_in, const A* taps) {
  // Columns all at once up to r = 3 (one round trip for their loads), else one at a time:
  // unrolled, r = 7 spilled 20-408 B.
#pragma unroll(kR <= 3 ? kR : 1)
  for (int dx = 0; dx < kR; ++dx) {
    A column[kOut + kR - 1];
#pragma unroll
    for (int hy = 0; hy < kOut + kR - 1; ++hy)
      column[hy] = hy < rows_in ? widen(src[hy * stride + dx]) : A(0);
#pragma unroll
    for (int dy = 0; dy < kR; ++dy) {
      const A w = kRotated ? taps[(kR - 1 - dy) * kR + kR - 1 - dx] : taps[dy * kR + dx];
#pragma unroll
      for (int o = 0; o < kOut; ++o) out[o] += w * column[o + dy];
    }
  }
}

// convolve_column for the kernel's odd r <= kMaxR (7 or 9), chosen at run time (warp-uniform).
template <int kOut, int kMaxR, bool kRotated, typename A, typename S>
__device__ __forceinline__ void convolve_odd(int r, A (&out)[kOut], const S* src, int stride,
                                             int rows_in, const A* taps) {
  static_assert(kMaxR == 7 || kMaxR == 9, "one case per odd r up to kMaxR");
  switch (r) {
    case 1: return convolve_column<kOut, 1, kRotated>(out, src, stride, rows_in, taps);
    case 3: return convolve_column<kOut, 3, kRotated>(out, src, stride, rows_in, taps);
    case 5: return convolve_column<kOut, 5, kRotated>(out, src, stride, rows_in, taps);
    case 7: return convolve_column<kOut, 7, kRotated>(out, src, stride, rows_in, taps);
    default: return convolve_column<kOut, kMaxR, kRotated>(out, src, stride, rows_in, taps);
  }
}

// Two floats as one 32-bit register of the 16-bit MMA operands, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  return static_cast<uint32_t>(bits_as<uint16_t>(narrow<T>(low))) |
         static_cast<uint32_t>(bits_as<uint16_t>(narrow<T>(high))) << 16;
}

// Half `half` (0 the low, 1 the high) of a word of two 16-bit values, widened. A bfloat16 is a
// float's high 16 bits: the high half is the word masked, one instruction (shifted down to a
// bfloat16 and widened, it took two), the low half the word shifted up.
template <typename S>
__device__ __forceinline__ float widen_half(uint32_t word, int half) {
  if constexpr (std::is_same_v<S, __nv_bfloat16>)
    return bits_as<float>(half ? word & 0xFFFF0000u : word << 16);
  else
    return widen(bits_as<S>(static_cast<uint16_t>(word >> 16 * half)));
}

// convolve_column for 16-bit input and two adjacent output columns x, x + 1: `src` is column
// x - kLead of the first row (kLead >= kH: at or before x - kH, the first column read), 4-byte
// aligned, and each 32-bit word from there to column x + 1 + kH (two columns) is read
// once, where two convolve_column calls would read each column with a 16-bit load of its own:
// a 16-bit load fills half a shared-memory wavefront, a word a whole one. Each output adds its
// taps in convolve_column's order (dx, then dy), so the sums are the same bits. The forward's
// x is even (kLead: kH rounded up to even), the backward's x - kH is (kLead = kH).
template <int kOut, int kR, int kLead = (kR / 2 + 1) / 2 * 2, typename A, typename S>
__device__ __forceinline__ void convolve_pair(A (&out)[2][kOut], const S* src, int stride,
                                              int rows_in, const A* taps) {
  static_assert(sizeof(S) == 2, "two 16-bit columns a word");
  constexpr int kH = kR / 2, kWords = (kLead + kH + 1) / 2 + 1;
  static_assert(kLead == kH || kLead == kH + 1, "src at x - kH or one column before");
  // One word's taps. Only the first and last words hold a column one of the pair does not
  // read (`edge`: its test folds, the word a constant); the loop between has no test.
  const auto add_word = [&](int word, bool edge) {
    uint32_t packed[kOut + kR - 1];
#pragma unroll
    for (int hy = 0; hy < kOut + kR - 1; ++hy)
      packed[hy] = hy < rows_in ? *reinterpret_cast<const uint32_t*>(src + hy * stride + 2 * word)
                                : 0u;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      A column[kOut + kR - 1];
#pragma unroll
      for (int hy = 0; hy < kOut + kR - 1; ++hy)
        column[hy] = widen_half<S>(packed[hy], half);
#pragma unroll
      for (int side = 0; side < 2; ++side) {
        // Output x + side's tap dx reads column x + side - kH + dx: this one is x - kLead + i.
        const int dx = 2 * word + half - (kLead - kH) - side;
        if (edge && (dx < 0 || dx >= kR)) continue;
#pragma unroll
        for (int dy = 0; dy < kR; ++dy) {
          const A w = taps[dy * kR + dx];
#pragma unroll
          for (int o = 0; o < kOut; ++o) out[side][o] += w * column[o + dy];
        }
      }
    }
  };
  add_word(0, true);
  // Up to r = 3 every word at once (one round trip), else one word at a time (as convolve_column).
#pragma unroll(kR <= 3 ? kWords : 1)
  for (int word = 1; word < kWords - 1; ++word) add_word(word, false);
  if constexpr (kWords > 1) add_word(kWords - 1, true);
}

// convolve_pair for the kernel's odd r <= 9, chosen at run time (warp-uniform); `src` is column
// x - kLead(r) of the first row: x - 4 for r = 5 .. 9, x - 2 for r = 3, x for r = 1.
template <int kOut, typename A, typename S>
__device__ __forceinline__ void convolve_odd_pair(int r, A (&out)[2][kOut], const S* src,
                                                  int stride, int rows_in, const A* taps) {
  switch (r) {
    case 1: return convolve_pair<kOut, 1>(out, src + 4, stride, rows_in, taps);
    case 3: return convolve_pair<kOut, 3>(out, src + 2, stride, rows_in, taps);
    case 5: return convolve_pair<kOut, 5>(out, src + 2, stride, rows_in, taps);
    case 7: return convolve_pair<kOut, 7>(out, src, stride, rows_in, taps);
    default: return convolve_pair<kOut, 9>(out, src, stride, rows_in, taps);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

inline constexpr int kPairBlock = 64;  // channels per channel block of the forward
inline constexpr int kTileCols = 16;   // positions per row of a tile
// Kernels and masks per forward block: 3 x 3 Grams of 64 x 64, accumulated in registers (144
// per thread).
inline constexpr int kMaxKernels = 3, kMaxMasks = 3;
inline constexpr int kMaxHalo = 4;     // h <= 4 (r <= 9): the halo's padding is at least 4 columns
// Tile rows: 8 (128 positions) or, where shared memory is short, 4 on tensor cores; 2 on SIMT.
inline constexpr int kWideRows = 8, kNarrowRows = 4, kSimtRows = 2;

// F's halo in shared memory, (channels, halo rows, kHaloCols) of T: columns x0 - kPad ..
// x0 + 16 + kPad, whole 16-byte vectors, so a row is kChunks aligned vector loads.
template <typename T>
struct Halo {
  static constexpr int vector = 16 / sizeof(T);
  static constexpr int pad = vector > kMaxHalo ? vector : kMaxHalo;
  static constexpr int cols = kTileCols + 2 * pad;
  static constexpr int chunks = cols / vector;
  // Elements per channel: whole rows, padded to 4 (mod 8) 4-byte words, an odd multiple of 4
  // (mod 32), so that the 8 channels x 4 columns a warp reads during the formation fall into
  // distinct banks (16-bit input: distinct words, two lanes a word).
  __host__ __device__ static constexpr int channel_stride(int rows) {
    const int words = rows * cols * static_cast<int>(sizeof(T)) / 4;
    const int padded = words + (12 - words % 8) % 8;
    return padded * 4 / static_cast<int>(sizeof(T));
  }
};

// Z_j of a forward tile in shared memory, in 16-byte chunks of 16 / sizeof(Z) consecutive
// positions of one channel; the chunks of all kZChannels channels for the same positions lie
// one after another: element (c, p) at z_offset<Z>(c, p). That is the layout wgmma reads through
// a shared-memory descriptor (K-major, no swizzle: the 8 channels x 16 bytes of a core matrix
// contiguous, the next 8 channels 128 bytes on, the next positions kZChannels * 16 bytes on),
// and every fragment load of mma.sync reads 32 consecutive words (lanes g * 4 + t). Offsets
// add: z_offset(c, p0) + z_offset(dc, dp) = z_offset(c + dc, p0 + dp) where the chunk divides p0.
inline constexpr int kZChannels = 2 * kPairBlock;
template <typename Z>
__host__ __device__ constexpr int z_offset(int c, int p) {
  constexpr int chunk = 16 / static_cast<int>(sizeof(Z));
  return (p / chunk * kZChannels + c) * chunk + p % chunk;
}

// wgmma's shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format") of a K-major
// operand without swizzle: the start address, the byte offsets between core matrices adjacent
// in K (leading dimension) and in M or N (stride dimension), each >> 4 in 14 bits at bits 0, 16
// and 32; base offset 0 and no swizzle (bits 49-51 and 62-63 zero). Adding bytes >> 4 to it moves
// its start.
__host__ __device__ constexpr uint64_t wgmma_descriptor(uint32_t address, uint32_t k_bytes,
                                                        uint32_t mn_bytes) {
  return (address >> 4 & 0x3FFFu) | static_cast<uint64_t>(k_bytes >> 4 & 0x3FFFu) << 16 |
         static_cast<uint64_t>(mn_bytes >> 4 & 0x3FFFu) << 32;
}
// Z's B operand for a warpgroup's 32 channels from `z` on: core matrices of 8 channels 128 bytes
// apart, and of the next positions kZChannels * 16 bytes on.
template <typename Z>
__device__ __forceinline__ uint64_t z_descriptor(const Z* z) {
  return wgmma_descriptor(shared_address(z), kZChannels * 16, 8 * 16);
}

// How a forward block multiplies: Z's type in shared memory, positions per MMA step, Grams per
// block, and the step itself.
template <typename T, bool kTensorCores>
struct Operands;

// SIMT: each lane computes its accumulators of the MMA layout with scalar multiply-adds.
template <typename T>
struct Operands<T, false> {
  using A = acc_t<T>;
  using Z = A;
  static constexpr int step = 8, max_kernels = sizeof(A) == 8 ? 1 : kMaxKernels;
  __device__ static Z operand(A v) { return v; }
  template <int kMaskStride>
  __device__ static void multiply(A (&acc)[kMaxMasks][4][4], int kn, const Z* za, const Z* zb,
                                  const A* w, int lane) {
    const int g = lane / 4, t = lane % 4;
    for (int p = 0; p < step; ++p) {
      const A a0 = za[z_offset<Z>(g, p)], a1 = za[z_offset<Z>(g + 8, p)];
      A b[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) b[nt][e] = zb[z_offset<Z>(nt * 8 + 2 * t + e, p)];
#pragma unroll
      for (int kl = 0; kl < kMaxMasks; ++kl) {
        if (kl >= kn) break;
        const A wa0 = w[kl * kMaskStride + p] * a0, wa1 = w[kl * kMaskStride + p] * a1;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          acc[kl][nt][0] += wa0 * b[nt][0];
          acc[kl][nt][1] += wa0 * b[nt][1];
          acc[kl][nt][2] += wa1 * b[nt][0];
          acc[kl][nt][3] += wa1 * b[nt][1];
        }
      }
    }
  }
};

// float32 on TF32 tensor cores: Z holds TF32 bit patterns, rounded to nearest when formed;
// m_k^2 Z_a is rounded again after the product. A step is a load of its operands for kK masks
// (the kernel loads the next step's before this one's HMMAs) and the products.
template <>
struct Operands<float, true> {
  using Z = uint32_t;
  static constexpr int step = 8, max_kernels = kMaxKernels;
  __device__ static Z operand(float v) { return round_to_tf32(v); }
  template <int kK>
  struct Fragments {
    float a[4], w[kK][2];
    uint32_t b[4][2];
  };
  template <int kMaskStride, int kK>
  __device__ static void load(Fragments<kK>& f, const Z* za, const Z* zb, const float* w,
                              int lane) {
    const int g = lane / 4, t = lane % 4;
    f.a[0] = bits_as<float>(za[z_offset<Z>(g, t)]);
    f.a[1] = bits_as<float>(za[z_offset<Z>(g + 8, t)]);
    f.a[2] = bits_as<float>(za[z_offset<Z>(g, t + 4)]);
    f.a[3] = bits_as<float>(za[z_offset<Z>(g + 8, t + 4)]);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      f.b[nt][0] = zb[z_offset<Z>(nt * 8 + g, t)];
      f.b[nt][1] = zb[z_offset<Z>(nt * 8 + g, t + 4)];
    }
#pragma unroll
    for (int kl = 0; kl < kK; ++kl)
      f.w[kl][0] = w[kl * kMaskStride + t], f.w[kl][1] = w[kl * kMaskStride + t + 4];
  }
  // The A fragment of mask kl's product, m_k^2 Z_a.
  template <int kK>
  __device__ static void scale(uint32_t (&wa)[4], const Fragments<kK>& f, int kl) {
    const float w0 = f.w[kl][0], w1 = f.w[kl][1];
    wa[0] = round_to_tf32(f.a[0] * w0), wa[1] = round_to_tf32(f.a[1] * w0);
    wa[2] = round_to_tf32(f.a[2] * w1), wa[3] = round_to_tf32(f.a[3] * w1);
  }
  template <int kK>
  __device__ static void multiply(float (&acc)[kMaxMasks][4][4], const Fragments<kK>& f) {
    uint32_t wa[kMaxMasks][4] = {};
#pragma unroll
    for (int kl = 0; kl < kK; ++kl) scale(wa[kl], f, kl);
    mma_grid<float>(acc, wa, f.b, kK);
  }
};

// bfloat16 and float16 on their own tensor cores (m16n8k16): Z in the input type, two
// positions per 32-bit register.
template <typename T>
struct HalfOperands {
  using Z = T;
  static constexpr int step = 16, max_kernels = kMaxKernels;
  __device__ static Z operand(float v) { return narrow<T>(v); }
  __device__ static uint32_t pair(const Z* p) { return *reinterpret_cast<const uint32_t*>(p); }
  __device__ static uint32_t scaled(uint32_t two, float w_low, float w_high) {
    const T low = bits_as<T>(static_cast<uint16_t>(two & 0xFFFFu));
    const T high = bits_as<T>(static_cast<uint16_t>(two >> 16));
    const uint32_t out_low = bits_as<uint16_t>(narrow<T>(widen(low) * w_low));
    const uint32_t out_high = bits_as<uint16_t>(narrow<T>(widen(high) * w_high));
    return out_low | out_high << 16;
  }
  template <int kK>
  struct Fragments {
    uint32_t a[4], b[4][2];
    float w[kK][4];
  };
  template <int kMaskStride, int kK>
  __device__ static void load(Fragments<kK>& f, const Z* za, const Z* zb, const float* w,
                              int lane) {
    const int g = lane / 4, t = lane % 4;
    f.a[0] = pair(za + z_offset<Z>(g, 2 * t)), f.a[1] = pair(za + z_offset<Z>(g + 8, 2 * t));
    f.a[2] = pair(za + z_offset<Z>(g, 2 * t + 8));
    f.a[3] = pair(za + z_offset<Z>(g + 8, 2 * t + 8));
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      f.b[nt][0] = pair(zb + z_offset<Z>(nt * 8 + g, 2 * t));
      f.b[nt][1] = pair(zb + z_offset<Z>(nt * 8 + g, 2 * t + 8));
    }
#pragma unroll
    for (int kl = 0; kl < kK; ++kl) {
      const float* wk = w + kl * kMaskStride + 2 * t;
      f.w[kl][0] = wk[0], f.w[kl][1] = wk[1], f.w[kl][2] = wk[8], f.w[kl][3] = wk[9];
    }
  }
  template <int kK>
  __device__ static void scale(uint32_t (&wa)[4], const Fragments<kK>& f, int kl) {
    const float* wk = f.w[kl];
    wa[0] = scaled(f.a[0], wk[0], wk[1]), wa[1] = scaled(f.a[1], wk[0], wk[1]);
    wa[2] = scaled(f.a[2], wk[2], wk[3]), wa[3] = scaled(f.a[3], wk[2], wk[3]);
  }
  template <int kK>
  __device__ static void multiply(float (&acc)[kMaxMasks][4][4], const Fragments<kK>& f) {
    uint32_t wa[kMaxMasks][4] = {};
#pragma unroll
    for (int kl = 0; kl < kK; ++kl) scale(wa[kl], f, kl);
    mma_grid<T>(acc, wa, f.b, kK);
  }
};
template <>
struct Operands<__nv_bfloat16, true> : HalfOperands<__nv_bfloat16> {};
template <>
struct Operands<__half, true> : HalfOperands<__half> {};

// f(std::integral_constant<int, i>{}) for i = 0 .. kCount - 1, in order: a loop whose index
// the body needs at compile time (which register set, which column offset).
template <int kCount, int kFirst = 0, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (kFirst < kCount) {
    f(std::integral_constant<int, kFirst>{});
    static_for<kCount, kFirst + 1>(f);
  }
}

// f(integral_constant<int, n>) for the forward's mask count n = 1 .. kMaxMasks (warp-uniform):
// with a runtime count, tests of it sat between a step's HMMAs (gpu-notes: the forward's MMA
// iteration).
template <typename F>
__device__ __forceinline__ void with_mask_count(int n, F&& f) {
  static_assert(kMaxMasks == 3, "one case per mask count");
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 3>{});
  }
}

template <typename T, bool kTensorCores, int kRows>
struct ForwardTile {
  using Ops = Operands<T, kTensorCores>;
  using A = acc_t<T>;
  static constexpr int positions = kRows * kTileCols;
  static_assert(positions % Ops::step == 0 && Ops::step % (16 / sizeof(typename Ops::Z)) == 0);

  // Shared memory in bytes, in the order the kernel lays it out (each region 16-byte aligned).
  __host__ __device__ static constexpr int halo_bytes(int r) {
    return 2 * kPairBlock * Halo<T>::channel_stride(kRows + 2 * (r / 2)) * sizeof(T);
  }
  static constexpr int z_bytes = kZChannels * positions * sizeof(typename Ops::Z);
  static constexpr int mask_bytes = kMaxMasks * positions * sizeof(A);
  // The masks as loaded, by cp.async beside F's halo (tensor cores only).
  static constexpr int raw_mask_bytes = kTensorCores ? kMaxMasks * positions * sizeof(T) : 0;
  __host__ __device__ static constexpr int smem_bytes(int r) {
    const int tap_bytes = kMaxKernels * r * r * static_cast<int>(sizeof(A));
    return halo_bytes(r) + z_bytes + mask_bytes + raw_mask_bytes + ceil_div(tap_bytes, 16) * 16;
  }
};

// features (B, C, H, W) T; masks (Bm, K, H, W) T; kernels (J, r, r) T.
// gram (B, J, K, C, C) A for split 0, scratch (S - 1, B, J, K, C, C) A for split s > 0 at s - 1:
// the block for channel blocks (a, b) writes rows of a and columns of b of its split's sum over
// positions of m_k^2 Z_j Z_j^T; lower blocks stay unwritten.
template <typename T, bool kTensorCores, int kRows, int kProbe = kFull>
__global__ void __launch_bounds__(kThreads, 1)
    _masked_gram_fwd_kernel(const T* __restrict__ features, const T* __restrict__ masks,
                            const T* __restrict__ kernels, acc_t<T>* __restrict__ gram,
                            acc_t<T>* __restrict__ scratch, const Dims d) {
  using Tile = ForwardTile<T, kTensorCores, kRows>;
  using Ops = typename Tile::Ops;
  using A = acc_t<T>;
  using Z = typename Ops::Z;
  using HaloT = Halo<T>;
  constexpr int TC = kPairBlock, P = Tile::positions;
  constexpr int kMaxJ = Ops::max_kernels;

  // Which pair of channel blocks (a <= b): pairs are numbered row by row of the upper triangle.
  int a = 0, pair = blockIdx.x;
  while (pair >= d.channel_blocks - a) {
    pair -= d.channel_blocks - a;
    ++a;
  }
  const int b = a + pair;
  const int split = blockIdx.y;
  const int groups = ceil_div(d.J, d.kernel_group) * d.mask_groups;
  const int batch = blockIdx.z / groups, group = blockIdx.z % groups;
  const int j0 = group / d.mask_groups * d.kernel_group;
  const int k0 = group % d.mask_groups * d.mask_group;
  const int jn = min(d.kernel_group, d.J - j0);
  const int kn = min(d.mask_group, d.K - k0);
  // On the diagonal both operands are block a: 64 channels loaded and formed, not 128.
  const int channels = a == b ? TC : 2 * TC;
  const int b_offset = a == b ? 0 : TC;

  const int h = d.r / 2, taps_per_kernel = d.r * d.r;
  const int halo_rows = kRows + 2 * h;
  const int channel_stride = HaloT::channel_stride(halo_rows);

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* halo = reinterpret_cast<T*>(shared_bytes);  // (2 TC, channel_stride)
  Z* z_tile = reinterpret_cast<Z*>(shared_bytes + Tile::halo_bytes(d.r));  // z_offset<Z>
  A* mask_sq = reinterpret_cast<A*>(reinterpret_cast<unsigned char*>(z_tile) + Tile::z_bytes);
  T* raw_masks = reinterpret_cast<T*>(mask_sq + kMaxMasks * P);  // (kn, P) as loaded
  A* taps = reinterpret_cast<A*>(reinterpret_cast<unsigned char*>(raw_masks) +
                                 Tile::raw_mask_bytes);  // (jn, r, r)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < jn * taps_per_kernel; e += kThreads)
    taps[e] = widen(kernels[static_cast<int64_t>(j0) * taps_per_kernel + e]);

  // This warp's 16 x 32 piece of every (TC x TC) Gram: rows m0.. of block a, columns n0.. of b.
  static_assert(kWarps == (TC / 16) * (TC / 32), "a warp for each 16 x 32 piece of a Gram");
  const int m0 = warp % 4 * 16, n0 = warp / 4 * 32;
  A acc[kMaxJ][kMaxMasks][4][4];
#pragma unroll
  for (int jl = 0; jl < kMaxJ; ++jl)
#pragma unroll
    for (int kl = 0; kl < kMaxMasks; ++kl)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[jl][kl][nt][i] = A(0);

  const int64_t N = static_cast<int64_t>(d.H) * d.W;
  const T* f_batch = features + static_cast<int64_t>(batch) * d.C * N;
  const T* m_batch = masks + static_cast<int64_t>(d.Bm == 1 ? 0 : batch) * d.K * N;

  const int tile_begin = split * d.tiles_per_split;
  const int tile_end = min(tile_begin + d.tiles_per_split, d.tiles);
  const bool vector_masks = d.vector_rows && reinterpret_cast<uintptr_t>(masks) % 16 == 0;
  // 1. F on a tile and its halo: rows y0 - h .. y0 + kRows + h, whole 16-byte vectors; on
  // tensor cores by cp.async, all in flight at once (the caller waits), and the tile's masks
  // with it; else by __ldg.
  auto load_halo = [&](int tile) {
    const int y0 = tile / d.tiles_x * kRows, x0 = tile % d.tiles_x * kTileCols;
    if constexpr (kTensorCores) {
      constexpr int kChunks = kTileCols / HaloT::vector;  // 16-byte chunks of a row of a mask
      for (int e = tid; e < kn * kRows * kChunks; e += kThreads) {
        const int chunk = e % kChunks, row = e / kChunks % kRows, kl = e / (kChunks * kRows);
        const int y = y0 + row, x = x0 + chunk * HaloT::vector;
        T* dst = raw_masks + kl * P + row * kTileCols + chunk * HaloT::vector;
        const T* src = m_batch + (k0 + kl) * N + static_cast<int64_t>(min(y, d.H - 1)) * d.W;
        if (y >= d.H || x >= d.W || (vector_masks && x + HaloT::vector <= d.W)) {
          const bool inside = y < d.H && x < d.W;
          copy_async_16(dst, inside ? src + x : m_batch, inside ? 16 : 0);
        } else {
#pragma unroll
          for (int v = 0; v < HaloT::vector; ++v)
            dst[v] = x + v < d.W ? src[x + v] : narrow<T>(A(0));
        }
      }
    }
    const int passes = kProbe == kLoadTwice ? 2 : 1;
    for (int hr = 0; hr < halo_rows * passes; ++hr) {
      const int y = y0 - h + (hr < halo_rows ? hr : hr - halo_rows);
      const bool row_inside = y >= 0 && y < d.H;
      for (int e = tid; e < channels * HaloT::chunks; e += kThreads) {
        const int c = e / HaloT::chunks, chunk = e % HaloT::chunks;
        const int channel = c < TC ? a * TC + c : b * TC + c - TC;
        const int x = x0 - HaloT::pad + chunk * HaloT::vector;
        T* dst = halo + c * channel_stride + (y - y0 + h) * HaloT::cols + chunk * HaloT::vector;
        const bool inside = row_inside && channel < d.C;
        const T* src = f_batch + (inside ? channel * N + static_cast<int64_t>(y) * d.W : 0);
        if (inside && d.vector_rows && x >= 0 && x + HaloT::vector <= d.W) {
          if constexpr (kTensorCores) copy_async_16(dst, src + x, 16);
          else *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src + x));
        } else {
#pragma unroll
          for (int v = 0; v < HaloT::vector; ++v) {
            const bool in = inside && x + v >= 0 && x + v < d.W;
            dst[v] = in ? src[x + v] : narrow<T>(A(0));
          }
        }
      }
    }
  };
  if (tile_begin < tile_end) load_halo(tile_begin);
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int y0 = tile / d.tiles_x * kRows, x0 = tile % d.tiles_x * kTileCols;
    if constexpr (kTensorCores) copy_async_wait_all();
    __syncthreads();  // this tile's halo is in; the previous tile's readers of mask_sq are done
    // m_k^2 on the tile, 0 outside the image: those positions add nothing.
    if constexpr (kTensorCores) {
      for (int e = tid; e < kn * P; e += kThreads) {
        const A m = widen(raw_masks[e]);
        mask_sq[e] = m * m;
      }
    } else {
      load_squares<2>(mask_sq, kn * P, m_batch, [&](int e) -> int64_t {
        const int kl = e / P, n = e % P;
        const int y = y0 + n / kTileCols, x = x0 + n % kTileCols;
        return y < d.H && x < d.W ? (k0 + kl) * N + static_cast<int64_t>(y) * d.W + x : -1;
      });
    }

#pragma unroll
    for (int jl = 0; jl < kMaxJ; ++jl) {
      if (jl >= jn) break;
      __syncthreads();  // halo and mask_sq loaded; the previous kernel's z_tile readers done
      // 2. Z_j on the tile: a thread forms a column of kRows outputs of one channel, reading
      // each of its halo rows once per kernel column dx and using it for up to r outputs. A
      // warp's lanes take 8 channels x 4 columns, so that both the halo's rows (channel stride
      // 4 mod 32 words) and Z's chunks are read and written without bank conflicts.
      const A* tap = taps + jl * taps_per_kernel;
      static_assert(kTileCols == 16 && kPairBlock % 8 == 0, "items of 8 channels x 4 columns");
      if constexpr (sizeof(Z) == 2) {
        // 16-bit Z: an item forms columns x, x + 1 (convolve_pair), its words 8 channels x 4
        // column pairs a warp, again in distinct banks, and stores each row's two as one word.
        for (int item = tid; item < (kProbe == kLoadOnly ? 0 : channels * kTileCols / 2);
             item += kThreads) {
          const int c = item / 64 * 8 + item / 4 % 8, x = (item / 32 % 2 * 4 + item % 4) * 2;
          const T* src = halo + c * channel_stride + HaloT::pad - kMaxHalo + x;
          A z[2][kRows];
#pragma unroll
          for (int oy = 0; oy < kRows; ++oy) z[0][oy] = z[1][oy] = A(0);
          convolve_odd_pair<kRows>(d.r, z, src, HaloT::cols, halo_rows, tap);
#pragma unroll
          for (int oy = 0; oy < kRows; ++oy)
            *reinterpret_cast<uint32_t*>(z_tile + z_offset<Z>(c, oy * kTileCols + x)) =
                pack_pair<T>(z[0][oy], z[1][oy]);
        }
      } else {
        for (int item = tid; item < (kProbe == kLoadOnly ? 0 : channels * kTileCols);
             item += kThreads) {
          const int c = item / 128 * 8 + item / 4 % 8, x = item / 32 % 4 * 4 + item % 4;
          const T* src = halo + c * channel_stride + HaloT::pad - h + x;
          A z[kRows];
#pragma unroll
          for (int oy = 0; oy < kRows; ++oy) z[oy] = A(0);
          convolve_odd<kRows, 2 * kMaxHalo + 1, false>(d.r, z, src, HaloT::cols, halo_rows, tap);
#pragma unroll
          for (int oy = 0; oy < kRows; ++oy)
            z_tile[z_offset<Z>(c, oy * kTileCols + x)] = Ops::operand(z[oy]);
        }
      }
      fence_async_shared();  // Z's stores, before wgmma reads them (with CAST_WGMMA)
      __syncthreads();
      // The halo is free: the next tile's arrives during these MMAs.
      if (jl + 1 == jn && tile + 1 < tile_end && kProbe != kNoLoad) load_halo(tile + 1);
      // 3. The Grams of kernel j and every mask of the group, P positions deep.
      const Z* za = z_tile + z_offset<Z>(m0, 0);
      const Z* zb = z_tile + z_offset<Z>(b_offset + n0, 0);
      constexpr int kDepth = kProbe == kLoadOnly || kProbe == kNoMma ? 0 : P;
      if constexpr (kTensorCores) {
        // The mask count a compile-time value, so no branch sits between a step's HMMAs.
        with_mask_count(kn, [&](auto mask_count) {
          constexpr int kK = decltype(mask_count)::value;
          using Fragments = typename Ops::template Fragments<kK>;
          static_assert(kDepth % (2 * Ops::step) == 0, "whole trips of two steps");
#if defined(CAST_WGMMA)
          // The step's products are wgmma m64n32s, one a mask, this warpgroup's B from Z
          // through a descriptor, A scaled into one of two register sets by the step's parity:
          // a step's group stays in flight while the next loads and scales, and the wait for it
          // comes before its set is written again (the hold keeps the compiler from putting
          // anything else there sooner: ptxas does not guard registers a wgmma in flight reads).
          // The steps unrolled, so that no group crosses a branch; the last waits for all, as Z
          // is rewritten next. No operands loaded a step ahead: their registers are the second
          // set's (with both, every variant spilled, gpu-notes), and the group in flight hides
          // the loads. The B fragments `load` reads go unused, and the compiler drops them.
          const uint64_t b = z_descriptor(zb);
          uint32_t sets[2][kMaxMasks][4] = {};
          static_for<kDepth / Ops::step>([&](auto i) {
            constexpr int p0 = decltype(i)::value * Ops::step, set = decltype(i)::value % 2;
            Fragments f;
            const int z0 = z_offset<Z>(0, p0);
            Ops::template load<P>(f, za + z0, zb + z0, mask_sq + p0, lane);
#pragma unroll
            for (int kl = 0; kl < kK; ++kl) Ops::scale(sets[set][kl], f, kl);
            wgmma_fence();
#pragma unroll
            for (int kl = 0; kl < kK; ++kl)
              wgmma_m64n32<T>(acc[jl][kl], sets[set][kl], b + (z0 * sizeof(Z) >> 4));
            wgmma_commit();
            if constexpr (p0 + Ops::step < kDepth) wgmma_wait<1>();
            else wgmma_wait<0>();
#pragma unroll
            for (int kl = 0; kl < kK; ++kl) wgmma_hold(sets[set ^ 1][kl]);
          });
          wgmma_settled(acc[jl]);  // the epilogue reads them, after the waits above
#else
          // Each step loads the next one's operands before its HMMAs (after the last, the first
          // again: loaded, not used), so that their round trip is not on its path. Two steps a
          // trip: rolled, ptxas sinks such loads below the HMMAs (the backward's lesson,
          // gpu-notes).
          Fragments next;
          if constexpr (kDepth > 0) Ops::template load<P>(next, za, zb, mask_sq, lane);
#pragma unroll 2
          for (int p0 = 0; p0 < kDepth; p0 += Ops::step) {
            const Fragments now = next;
            const int p1 = (p0 + Ops::step) % P, z1 = z_offset<Z>(0, p1);
            Ops::template load<P>(next, za + z1, zb + z1, mask_sq + p1, lane);
            Ops::multiply(acc[jl], now);
          }
#endif
        });
      } else {
#pragma unroll 1
        for (int p0 = 0; p0 < kDepth; p0 += Ops::step)
          Ops::template multiply<P>(acc[jl], kn, za + z_offset<Z>(0, p0), zb + z_offset<Z>(0, p0),
                                    mask_sq + p0, lane);
      }
    }
  }

  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int jl = 0; jl < kMaxJ; ++jl) {
#pragma unroll
    for (int kl = 0; kl < kMaxMasks; ++kl) {
      if (jl >= jn || kl >= kn) continue;
      const int64_t gram_size = static_cast<int64_t>(d.B) * d.J * d.K * d.C * d.C;
      const int64_t slice = (static_cast<int64_t>(batch) * d.J + j0 + jl) * d.K + k0 + kl;
      A* out = (split == 0 ? gram : scratch + (split - 1) * gram_size) + slice * d.C * d.C;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = a * TC + m0 + g + 8 * (i / 2);
          const int col = b * TC + n0 + nt * 8 + 2 * t + i % 2;
          if (row < d.C && col < d.C)
            out[static_cast<int64_t>(row) * d.C + col] = acc[jl][kl][nt][i];
        }
    }
  }
}

// Elements of a (B, J, K, C, C) tensor (G, dG, S), and blocks of kThreads to walk them.
__host__ __device__ inline int64_t gram_elements(const Dims& d) {
  return static_cast<int64_t>(d.B) * d.J * d.K * d.C * d.C;
}
inline unsigned gram_blocks(const Dims& d) {
  return static_cast<unsigned>(std::min<int64_t>((gram_elements(d) + kThreads - 1) / kThreads,
                                                 1 << 20));
}

// An element e of a (B, J, K, C, C) tensor: its row and column in its C x C slice (batch, j,
// k), the offset of its mirror (col, row), and where its slice's 1 / n_k is in inverse_mass
// (Bm, K).
struct GramElement {
  int64_t e, row, col, slice;
  __device__ int64_t mirror(const Dims& d) const {
    return (slice * d.C + col) * d.C + row;
  }
  __device__ int mass(const Dims& d) const {
    const int k = static_cast<int>(slice % d.K);
    const int batch = static_cast<int>(slice / (static_cast<int64_t>(d.J) * d.K));
    return (d.Bm == 1 ? 0 : batch) * d.K + k;
  }
};
// f(element) for every element of a (B, J, K, C, C) tensor, the launch's threads
// gridDim.x * blockDim.x apart.
template <typename F>
__device__ __forceinline__ void for_each_gram_element(const Dims& d, F&& f) {
  const int64_t C = d.C, total = gram_elements(d);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(GramElement{e, e / C % C, e % C, e / (C * C)});
}

// gram (B, J, K, C, C) A and scratch (S - 1, B, J, K, C, C) A as written above; inverse_mass
// (Bm, K) A. In place: the thread of an upper-triangle element (row <= col) adds its splits in
// order (G's, then the scratch's), scales, and writes it and its mirror, so each element of G
// is read and written by one thread alone; both halves get the same value, G is exactly
// symmetric.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    _masked_gram_finish_kernel(const A* __restrict__ scratch, const A* __restrict__ inverse_mass,
                               A* __restrict__ gram, const Dims d) {
  const int64_t total = gram_elements(d);
  for_each_gram_element(d, [=](const GramElement& x) {
    if (x.row > x.col) return;  // the mirror of (col, row): that thread writes it
    A sum = gram[x.e];
    for (int s = 1; s < d.splits; ++s) sum += scratch[(s - 1) * total + x.e];
    const A value = sum * inverse_mass[x.mass(d)];
    gram[x.e] = value;
    gram[x.mirror(d)] = value;
  });
}

// grad (B, J, K, C, C) float: dG; inverse_mass (Bm, K) float: 1 / n_k. symmetric (B, J, K, C, C)
// float: S_jk = (dG_jk + dG_jk^T) / n_k, whole, for the tensor-core backward (input type T):
// the same operands added and scaled in the same order as its form pass (and as
// reference.symmetric_grad), so the same bits; rounded to TF32 for float32 input, as the form
// pass rounds it, and left in float for 16-bit input, which the backward narrows in place.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    _masked_gram_symmetric_kernel(const float* __restrict__ grad,
                                  const float* __restrict__ inverse_mass,
                                  float* __restrict__ symmetric, const Dims d) {
  for_each_gram_element(d, [=](const GramElement& x) {
    const float value = (grad[x.e] + grad[x.mirror(d)]) * inverse_mass[x.mass(d)];
    symmetric[x.e] = sizeof(T) == 4 ? bits_as<float>(round_to_tf32(value)) : value;
  });
}

// ---------------------------------------------------------------------------------------------
// Backward on CUDA cores (float64; float32 without TF32; 16-bit below sm_80; shapes the
// tensor-core tiles do not fit): a block per (tile of positions, 32 output channels, batch
// item); per kernel j and block of 32 input channels F's 2h-halo, Z_j on the h-halo, U_j +=
// sum_k m_k^2 Z_j S_jk in shared memory, then the adjoint once per kernel.

inline constexpr int kSimtChannels = 32;  // channels per channel block of the SIMT backward: TC

// A tile of positions. Double halves the rows so a block's shared memory stays the same size.
template <typename A>
struct PositionTile {
  static constexpr int rows = 8, cols = 16, size = rows * cols;
};
template <>
struct PositionTile<double> {
  static constexpr int rows = 4, cols = 16, size = rows * cols;
};

// Its shared memory: F on the 2h-halo, Z_j and U_j on the h-halo, S_jk for the block's
// (input, output) channel blocks, m_k^2 on the h-halo, the taps; each region 16-byte aligned.
template <typename T>
struct SimtBackwardLayout {
  using A = acc_t<T>;
  using Tile = PositionTile<A>;
  static constexpr int TC = kSimtChannels, u_stride = TC + 1, z_stride = TC + 1;
  __host__ __device__ static constexpr int aligned(int bytes) { return ceil_div(bytes, 16) * 16; }
  __host__ __device__ static constexpr int u_size(int r) {
    return (Tile::rows + r - 1) * (Tile::cols + r - 1);
  }
  __host__ __device__ static constexpr int f_bytes(int r) {
    return aligned(TC * (Tile::rows + 2 * (r - 1)) * (Tile::cols + 2 * (r - 1)) *
                   static_cast<int>(sizeof(A)));
  }
  __host__ __device__ static constexpr int z_bytes(int r) {
    return aligned(u_size(r) * z_stride * static_cast<int>(sizeof(A)));
  }
  __host__ __device__ static constexpr int sym_bytes(int K) {
    return aligned(K * TC * TC * static_cast<int>(sizeof(A)));
  }
  __host__ __device__ static constexpr int bytes(int r, int K, int J) {
    return f_bytes(r) + 2 * z_bytes(r) + sym_bytes(K) +
           aligned(K * u_size(r) * static_cast<int>(sizeof(A))) +
           aligned(J * r * r * static_cast<int>(sizeof(A)));
  }
};

// grad (B, J, K, C, C) A: dG; inverse_mass (Bm, K) A: 1 / n_k; features (B, C, H, W) T;
// masks (Bm, K, H, W) T; kernels (J, r, r) T; d_features (B, C, H, W) T.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    _masked_gram_bwd_simt_kernel(const acc_t<T>* __restrict__ grad,
                                 const acc_t<T>* __restrict__ inverse_mass,
                                 const T* __restrict__ features, const T* __restrict__ masks,
                                 const T* __restrict__ kernels, T* __restrict__ d_features,
                                 const Dims d) {
  using A = acc_t<T>;
  using Tile = PositionTile<A>;
  using Layout = SimtBackwardLayout<T>;
  constexpr int TC = kSimtChannels;
  constexpr int u_stride = Layout::u_stride, z_stride = Layout::z_stride;
  constexpr int per_thread = Tile::size * TC / kThreads;  // dF values this thread owns
  static_assert(Tile::size * TC % kThreads == 0, "a block's dF tile must split evenly");

  const int tile = blockIdx.x, out_block = blockIdx.y, batch = blockIdx.z;
  const int y0 = tile / d.tiles_x * Tile::rows, x0 = tile % d.tiles_x * Tile::cols;
  const int h = d.r / 2;
  // U_j and Z_j live on the tile plus an h-halo, F on the tile plus a 2h-halo.
  const int u_rows = Tile::rows + 2 * h, u_cols = Tile::cols + 2 * h, u_size = u_rows * u_cols;
  const int f_rows = Tile::rows + 4 * h, f_cols = Tile::cols + 4 * h, f_size = f_rows * f_cols;
  const int taps_per_kernel = d.r * d.r;

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  unsigned char* region = shared_bytes;
  A* f_halo = reinterpret_cast<A*>(region);                           // (TC, f_rows, f_cols)
  A* z_halo = reinterpret_cast<A*>(region += Layout::f_bytes(d.r));   // (u_size, z_stride)
  A* u_halo = reinterpret_cast<A*>(region += Layout::z_bytes(d.r));   // (u_size, u_stride)
  A* sym = reinterpret_cast<A*>(region += Layout::z_bytes(d.r));      // (K, TC in, TC out)
  A* mask_sq = reinterpret_cast<A*>(region += Layout::sym_bytes(d.K));  // (K, u_size)
  A* taps = mask_sq + ceil_div(d.K * u_size, 16 / static_cast<int>(sizeof(A))) *
                          (16 / static_cast<int>(sizeof(A)));  // (J, r, r)

  const int tid = threadIdx.x;
  const int64_t N = static_cast<int64_t>(d.H) * d.W;
  const T* f_batch = features + static_cast<int64_t>(batch) * d.C * N;
  const T* m_batch = masks + static_cast<int64_t>(d.Bm == 1 ? 0 : batch) * d.K * N;

  for (int e = tid; e < d.J * taps_per_kernel; e += kThreads) taps[e] = widen(kernels[e]);
  for (int e = tid; e < d.K * u_size; e += kThreads) {
    const int k = e / u_size, p = e % u_size;
    const int y = y0 - h + p / u_cols, x = x0 - h + p % u_cols;
    const bool inside = y >= 0 && y < d.H && x >= 0 && x < d.W;
    const A m = inside ? widen(m_batch[k * N + static_cast<int64_t>(y) * d.W + x]) : A(0);
    mask_sq[e] = m * m;  // 0 outside the image, so U_j is zero there: the adjoint's padding
  }

  A d_acc[per_thread];
#pragma unroll
  for (int i = 0; i < per_thread; ++i) d_acc[i] = A(0);

  for (int j = 0; j < d.J; ++j) {
    const A* tap = taps + j * taps_per_kernel;
    for (int e = tid; e < u_size * TC; e += kThreads) u_halo[e / TC * u_stride + e % TC] = A(0);

    for (int in_block = 0; in_block < ceil_div(d.C, TC); ++in_block) {
      __syncthreads();  // the previous readers of f_halo, z_halo and sym are done
      for (int e = tid; e < TC * f_size; e += kThreads) {
        const int c = in_block * TC + e / f_size, p = e % f_size;
        const int y = y0 - 2 * h + p / f_cols, x = x0 - 2 * h + p % f_cols;
        const bool inside = c < d.C && y >= 0 && y < d.H && x >= 0 && x < d.W;
        f_halo[e] = inside ? widen(f_batch[c * N + static_cast<int64_t>(y) * d.W + x]) : A(0);
      }
      for (int e = tid; e < d.K * TC * TC; e += kThreads) {
        const int k = e / (TC * TC), row = e / TC % TC, col = e % TC;
        const int64_t slice = (static_cast<int64_t>(batch) * d.J + j) * d.K + k;
        const int c_in = in_block * TC + row, c_out = out_block * TC + col;
        // S_jk = (dG_jk + dG_jk^T) / n_k, as reference.symmetric_grad forms it
        const A inverse = inverse_mass[(d.Bm == 1 ? 0 : batch) * d.K + k];
        const A* g = grad + slice * d.C * d.C;
        sym[e] = c_in < d.C && c_out < d.C
                     ? (g[c_in * d.C + c_out] + g[c_out * d.C + c_in]) * inverse
                     : A(0);
      }
      __syncthreads();
      // Z_j on the h-halo: position (uy, ux) of u_halo is (uy, ux) .. (uy + 2h, ux + 2h) of f_halo.
      for (int e = tid; e < TC * u_size; e += kThreads) {
        const int local = e / u_size, p = e % u_size;
        const A* src = f_halo + local * f_size + p / u_cols * f_cols + p % u_cols;
        A z = A(0);
        for (int dy = 0; dy < d.r; ++dy)
          for (int dx = 0; dx < d.r; ++dx) z += tap[dy * d.r + dx] * src[dy * f_cols + dx];
        z_halo[p * z_stride + local] = z;
      }
      __syncthreads();
      // U_j[p, c_out] += sum_k m_k[p]^2 sum_{c_in in this block} Z_j[p, c_in] S_jk[c_in, c_out];
      // each (p, c_out) belongs to one thread for the whole loop over input blocks.
      for (int e = tid; e < u_size * TC; e += kThreads) {
        const int p = e / TC, c_out = e % TC;
        const A* zp = z_halo + p * z_stride;
        A u = A(0);
        for (int k = 0; k < d.K; ++k) {
          const A* s = sym + k * TC * TC + c_out;
          A t = A(0);
#pragma unroll 8
          for (int c_in = 0; c_in < TC; ++c_in) t += zp[c_in] * s[c_in * TC];
          u += mask_sq[k * u_size + p] * t;
        }
        u_halo[p * u_stride + c_out] += u;
      }
    }
    __syncthreads();  // U_j complete
    // dF[o] += sum_{dy,dx} p_j[dy, dx] U_j[o - (dy, dx) + h]: the 180-degree rotated kernel.
    // In u_halo coordinates (origin at the tile's origin minus h) that is o + 2h - (dy, dx).
#pragma unroll
    for (int i = 0; i < per_thread; ++i) {
      const int e = tid + i * kThreads;
      const int o = e % Tile::size, c_out = e / Tile::size;
      const int oy = o / Tile::cols, ox = o % Tile::cols;
      A v = A(0);
      for (int dy = 0; dy < d.r; ++dy)
        for (int dx = 0; dx < d.r; ++dx)
          v += tap[dy * d.r + dx] *
               u_halo[((oy + 2 * h - dy) * u_cols + ox + 2 * h - dx) * u_stride + c_out];
      d_acc[i] += v;
    }
    __syncthreads();  // the next kernel may clear u_halo
  }

#pragma unroll
  for (int i = 0; i < per_thread; ++i) {
    const int e = tid + i * kThreads;
    const int o = e % Tile::size, c = out_block * TC + e / Tile::size;
    const int y = y0 + o / Tile::cols, x = x0 + o % Tile::cols;
    if (c < d.C && y < d.H && x < d.W)
      d_features[(static_cast<int64_t>(batch) * d.C + c) * N + static_cast<int64_t>(y) * d.W + x] =
          narrow<T>(d_acc[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores: one block of 8 warps per SM walks the items (tile of kRows x 16
// outputs, 64 output channels, batch item), gridDim.x apart. Per item, kernel j and block of 32
// input channels (a "step"):
//   1. F on the tile's 2h-halo (columns padded to whole 16-byte vectors, as the forward's), the
//      (64 out x 32 in) blocks of dG_j1 .. dG_jK and their (32 in x 64 out) mirrors arrive by
//      cp.async, 16 bytes a copy, all in flight at once; the next step's copies (the next
//      item's first, after an item's last step) are issued as soon as their regions are free,
//      dG's once this step's S is formed, F's once Z_j is, so they overlap this step's
//      formation and MMAs (S has two buffers, F one; the mirrors have a region of their own
//      where shared memory allows, else take U_j's, and then a kernel's first step issues its
//      own, after the last kernel's adjoint); then each S_jk
//      block is formed in place, (dG + mirror) / n_k (rounded to TF32 for float32). Where a
//      tenth of the op's inputs and outputs holds S whole (plan.symmetric_scratch), a kernel
//      before this one forms it in a scratch the size of dG, and the steps copy S's blocks
//      alone: no mirrors, no form pass (16-bit input's S is narrowed in place still). Where
//      J > 1 and shared memory holds F's halo of every input block (plan.backward_f_resident:
//      C <= 64 at r = 3), each block's halo has a region of its own for the whole item and
//      arrives once, for the first kernel's steps, rather than once a kernel (the copies
//      issued a step ahead as before);
//   2. Z_j on the h-halo, formed once: each thread a column of half its rows in one channel
//      (for 16-bit input two adjacent columns of two channels, from the halo's 32-bit words),
//      each loaded value used for up to r of them; stored
//      channel-major as the B operand (a 32-bit word holds one TF32 value or a pair of
//      consecutive channels);
//   3. U_j^T (64 x positions) += [S_j1 | .. | S_jK] [m_1^2 Z_j; ..; m_K^2 Z_j]^T with mma.sync
//      (built for sm_90a, where the halo fills whole m-tiles of 64 positions: U_j += sum_k
//      diag(m_k^2) Z_j^T S_k on wgmma, the warpgroups taking 32 output channels each):
//      one chain K * C deep whose accumulators stay in registers across the input blocks, each
//      warp all 64 channels x an eighth of the positions; m_k^2 scales the B fragments in
//      registers (TF32 rounded to nearest after the product), each fragment by one warp; S,
//      symmetric, is read as A straight from its rows.
// After the last input block U_j goes to shared memory once and the adjoint convolution (p_j
// rotated by 180 degrees) adds into dF's accumulators in registers, a column of kRows outputs
// per thread and item. dF is written once, at the end. Nothing of size J * N * C goes to
// global memory.

inline constexpr int kOutBlock = 64;    // output channels per block (every MMA warp takes all)
inline constexpr int kInBlock = 32;     // input channels per step
inline constexpr int kMmaHalo = 3;      // h <= 3 (r <= 7) on tensor cores
// The MMA's warps: each takes all 64 output channels (kMTiles m-tiles of 16) and an eighth of
// the positions, so that it alone scales its B fragments by m_k^2 (with 32 channels a warp, two
// warps scaled each fragment: gpu-notes, the backward's MMA warps).
inline constexpr int kMTiles = kOutBlock / 16;
// n-tiles (8 positions) per warp: the h-halo's <= 256 positions over 8 warps
inline constexpr int kMaxNTiles = 4;
// Columns of the formation's items per row: the h-halo's widest row (22) rounded to 24, which
// F's channel stride (24 mod 32 words) makes conflict-free (16-bit input: 12 column pairs).
inline constexpr int kFormCols = 24;
inline constexpr int kCopyChunks = 8;   // 16-byte chunks of a row of F's halo, at most

template <typename T, int kRows>
struct MmaBackwardTile {
  static constexpr int per = sizeof(T) == 4 ? 1 : 2;  // channels per 32-bit word of Z
  static constexpr int z_rows = kInBlock / per;
  static constexpr int vector = 16 / sizeof(T);
  static constexpr int step = per * 8;  // input channels per MMA (k of m16n8k8 / m16n8k16)
  // F's halo rows are padded by whole vectors, at least 2h columns each side.
  __host__ __device__ static constexpr int pad(int h) { return ceil_div(2 * h, vector) * vector; }
  __host__ __device__ static constexpr int f_cols(int h) { return kTileCols + 2 * pad(h); }
  // Elements per channel of F's halo, a multiple of 16 bytes, so that a warp's formation loads
  // fall into 32 distinct banks: float32 24 (mod 32) words (lanes on consecutive (channel,
  // column) items, 24 columns per channel); 16-bit 28, an odd multiple of 4 words (the lanes
  // of the formation's word pairs, in the kernel), and not 4: about the old size, so that no
  // plan's choice moves (with 4, relu2_1's 16-bit halos stayed across the kernels: gpu-notes).
  __host__ __device__ static constexpr int f_stride(int h) {
    const int words = (kRows + 4 * h) * f_cols(h) * static_cast<int>(sizeof(T)) / 4;
    return (words + ((per == 1 ? 56 : 60) - words % 32) % 32) * 4 / static_cast<int>(sizeof(T));
  }
  __host__ __device__ static constexpr int u_size(int h) {
    return (kRows + 2 * h) * (kTileCols + 2 * h);
  }
  __host__ __device__ static constexpr int u_padded(int h) { return ceil_div(u_size(h), 32) * 32; }
  // n-tiles of 8 positions per warp (8 warps share the positions, the last ones a repeat of the
  // last n-tile where 8 do not divide them); capped where fits() fails.
  __host__ __device__ static constexpr int n_tiles(int h) {
    return ceil_div(u_padded(h) / 8, kWarps) < kMaxNTiles ? ceil_div(u_padded(h) / 8, kWarps)
                                                          : kMaxNTiles;
  }
  // Row strides in words: Z 8 (mod 32) and S 4 (mod 32: ldmatrix's 8 rows of 16 bytes), so the
  // fragment loads are conflict-free; U 16 (mod 32), for the adjoint's two channels a warp.
  __host__ __device__ static constexpr int z_stride(int h) { return u_padded(h) + 8; }
  static constexpr int s_stride = kInBlock + 4;
  __host__ __device__ static constexpr int u_stride(int h) { return u_padded(h) + 16; }
  // The mirrors' rows: 8 / per (mod 32) words, so that forming S (lanes on 4 * per input by
  // 8 / per output channels) reads the mirrors without bank conflicts (and S's float32 rows;
  // 16-bit input's 8 lanes of a row meet 2-way there).
  static constexpr int t_stride = kOutBlock + 8 / per;

  __host__ __device__ static constexpr int f_bytes(int h) {
    return kInBlock * f_stride(h) * static_cast<int>(sizeof(T));
  }
  __host__ __device__ static constexpr int s_bytes(int K) {
    return K * kOutBlock * s_stride * static_cast<int>(sizeof(float));
  }
  __host__ __device__ static constexpr int t_bytes(int K) {
    return K * kInBlock * t_stride * static_cast<int>(sizeof(float));
  }
  __host__ __device__ static constexpr int z_bytes(int h) { return z_rows * z_stride(h) * 4; }
  __host__ __device__ static constexpr int u_bytes(int h) { return kOutBlock * u_stride(h) * 4; }
  __host__ __device__ static constexpr int mask_bytes(int h, int K) {
    return K * u_padded(h) * 4;
  }
  // U_j's region and, with it, dG's mirrors': theirs after U (own_mirrors), or U's own during
  // a kernel's steps where shared memory is short (as large as U, 53 KiB at r = 3 with 8-row
  // tiles, it holds the mirrors of 5 masks in f32, 6 for 16-bit input).
  __host__ __device__ static constexpr int u_region(int h, int K, bool own_mirrors) {
    if (own_mirrors) return u_bytes(h) + t_bytes(K);
    return u_bytes(h) > t_bytes(K) ? u_bytes(h) : t_bytes(K);
  }
  // In the kernel's order: F (f_blocks halos), S twice, Z, U and the mirrors, m_k^2, taps (all
  // multiples of 16 bytes but taps).
  __host__ __device__ static constexpr int bytes(int r, int K, int J, bool own_mirrors,
                                                 int f_blocks) {
    const int h = r / 2;
    return f_blocks * f_bytes(h) + 2 * s_bytes(K) + z_bytes(h) + u_region(h, K, own_mirrors) +
           mask_bytes(h, K) + J * r * r * 4;
  }
  // Whether the kernel takes r at all: the halo's positions within the warps' n-tiles.
  __host__ __device__ static constexpr bool fits(int r) {
    return r / 2 <= kMmaHalo && u_padded(r / 2) <= kWarps * kMaxNTiles * 8;
  }
};

// grad (B, J, K, C, C) float: dG; inverse_mass (Bm, K) float: 1 / n_k; features (B, C, H, W) T;
// masks (Bm, K, H, W) T; kernels (J, r, r) T with r = 2 kH + 1; d_features (B, C, H, W) T. The
// halo kH is a template argument (mma_backward_kernel picks the kernel), so that what it decides
// is compile-time: the convolutions' r, row strides and rows (with them runtime, a formation
// column was 48 instructions for its 12 FFMA: each row's address formed apart and behind a
// guard, gpu-notes), and the MMA loop's n-tiles and accumulators (with a runtime bound each
// n-tile's HMMA sat behind a branch, 21 an iteration at effb4cf; and with h switched inside the
// kernel, the accumulators of the widest halo's n-tiles held registers at every h).
template <typename T, int kRows, int kH, int kProbe = kFull>
__global__ void __launch_bounds__(kThreads, 1)
    _masked_gram_bwd_mma_kernel(const float* __restrict__ grad,
                                const float* __restrict__ inverse_mass,
                                const T* __restrict__ features, const T* __restrict__ masks,
                                const T* __restrict__ kernels, T* __restrict__ d_features,
                                const Dims d) {
  using Tile = MmaBackwardTile<T, kRows>;
  constexpr int per = Tile::per, vector = Tile::vector, step = Tile::step;
  constexpr int s_stride = Tile::s_stride, t_stride = Tile::t_stride;
  constexpr int kItems = kOutBlock * kTileCols / kThreads;  // adjoint columns per thread
  static_assert(kWarps == 8 && kOutBlock == 64 && kInBlock % step == 0, "1 x 8 warps");
  static_assert(Tile::f_cols(kMmaHalo) / vector <= kCopyChunks, "a row of F's halo: 8 copies");
  static_assert(Tile::fits(2 * kH + 1), "a halo the tile takes (mma_backward_kernel)");

  // The halo's geometry, all compile-time.
  constexpr int h = kH;
  constexpr int pad = Tile::pad(h), f_cols = Tile::f_cols(h);
  constexpr int f_rows = kRows + 4 * h, f_stride = Tile::f_stride(h), chunks = f_cols / vector;
  constexpr int u_rows = kRows + 2 * h, u_cols = kTileCols + 2 * h, u_size = u_rows * u_cols;
  constexpr int u_padded = Tile::u_padded(h), z_stride = Tile::z_stride(h);
  constexpr int u_stride = Tile::u_stride(h);
  // Built for sm_90a (CAST_WGMMA), a halo that fills whole m-tiles of 64 positions multiplies
  // on wgmma: U_j (positions x 64 out) = sum_k diag(m_k^2) Z_j^T S_k, A = Z_j^T scaled by m_k^2
  // in registers, B = S_k from shared memory through a descriptor, S held in 16-byte core
  // matrices, (c_out, c_in) at ((c_in / 4) 64 + c_out) 4 + c_in % 4 words (the same bytes as
  // its rows of s_stride; a 16-byte copy of 4 c_in is one core-matrix row). 16-bit input's S,
  // narrowed, puts channels 8m .. 8m + 7 of row c_out where float32 had 8m .. 8m + 3: its core
  // matrices of 8 channels twice as far apart.
#if defined(CAST_WGMMA)
  constexpr bool kWgmma = u_padded % 64 == 0;
#else
  constexpr bool kWgmma = false;
#endif
  constexpr int kSRow = kWgmma ? 4 : s_stride;  // words from S's c_out to c_out + 1
  constexpr auto s_column = [](int c_in) {     // words from S's c_in 0 to c_in (a multiple of 4,
    return kWgmma ? c_in / 4 * kOutBlock * 4 + c_in % 4 : c_in;  // or any where rows are rows)
  };
  const int taps_per_kernel = d.r * d.r;
  const int in_blocks = ceil_div(d.C, kInBlock), steps = d.J * in_blocks;

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  unsigned char* region = shared_bytes;
  // F's halo of an input block, (kInBlock, f_stride): rows of f_cols; with f_blocks > 1 each
  // block's in a region of its own for the whole item, copied once rather than once a kernel.
  T* f_halos = reinterpret_cast<T*>(region);
  const auto f_halo = [&](int in_block) {
    return f_halos + (d.f_blocks > 1 ? in_block : 0) * (Tile::f_bytes(h) / sizeof(T));
  };
  float* s_tiles =
      reinterpret_cast<float*>(region += d.f_blocks * Tile::f_bytes(h));  // 2 x (K, 64, s_stride)
  uint32_t* z_tile = reinterpret_cast<uint32_t*>(region += 2 * Tile::s_bytes(d.K));
  float* u_tile = reinterpret_cast<float*>(region += Tile::z_bytes(h));  // (64, u_stride)
  // dG's mirrors, (K, 32, t_stride): after U_j, or in U_j's region during a kernel's steps.
  float* mirrors = d.own_mirrors ? u_tile + Tile::u_bytes(h) / 4 : u_tile;
  float* mask_sq =
      reinterpret_cast<float*>(region += Tile::u_region(h, d.K, d.own_mirrors));  // (K, u_padded)
  float* taps = reinterpret_cast<float*>(region += Tile::mask_bytes(h, d.K));  // (J, r, r)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t N = static_cast<int64_t>(d.H) * d.W;
  const bool vector_grad = d.C % 4 == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0;

  // The block walks items (tile of outputs, output block, batch item), tiles fastest, so that
  // the blocks running at once share F's halos in L2; gridDim.x apart.
  struct Item {
    int y0, x0, out_block, batch;
  };
  const int items = d.tiles * d.channel_blocks * d.B;
  auto item_at = [&](int w) {
    const int tile = w % d.tiles, rest = w / d.tiles;
    return Item{tile / d.tiles_x * kRows, tile % d.tiles_x * kTileCols, rest % d.channel_blocks,
                rest / d.channel_blocks};
  };

  // A 16-byte chunk of rows `row` .. of the item's dG_j1 .. dG_jK from column `col` into dst,
  // k apart by dst_k: copied where inside and whole, zeros outside, element by element across C.
  auto copy_grad_rows = [&](const Item& it, int j, float* dst, int dst_k, int row, int col) {
    const int64_t slice = static_cast<int64_t>(d.C) * d.C;  // dG_jk to dG_j(k+1)
    const bool inside = row < d.C && col < d.C;
    const float* src = grad + (static_cast<int64_t>(it.batch) * d.J + j) * d.K * slice +
                       (inside ? row * d.C + col : 0);
    if (!inside || (vector_grad && col + 4 <= d.C)) {
      for (int k = 0; k < d.K; ++k, src += slice)
        copy_async_16(dst + k * dst_k, src, inside ? 16 : 0);
    } else {
      for (int k = 0; k < d.K; ++k, src += slice)
#pragma unroll
        for (int v = 0; v < 4; ++v) dst[k * dst_k + v] = col + v < d.C ? src[v] : 0.0f;
    }
  };
  // Step s's mirrors of dG's blocks, (32 in x 64 out): rows c_in, columns c_out. They come with
  // the rest of dG's copies, but where they borrow U_j's region (not own_mirrors), free only
  // during a kernel's steps, a kernel's first step issues its own after the last kernel's
  // adjoint, and waits for them at once.
  auto issue_mirrors = [&](const Item& it, int s) {
    const int j = s / in_blocks, in_block = s % in_blocks;
    for (int half = 0; half < 2; ++half) {
      const int row = half * 16 + tid / 16;
      copy_grad_rows(it, j, mirrors + row * t_stride + tid % 16 * 4, kInBlock * t_stride,
                     in_block * kInBlock + row, it.out_block * kOutBlock + tid % 16 * 4);
    }
  };

  // Step s's copies of an item, in two parts: F's for input block s % in_blocks, and dG's
  // (issue_grad_copies, below). Each thread: one channel and one 16-byte column chunk of F for
  // every row. What every row shares (the chunk in, out of or across the image, the rows
  // inside it) is decided once, and a row's address is the last one's plus W: decided per row,
  // the loop took 97-131 instructions a row (gpu-notes).
  auto issue_feature_copies = [&](const Item& it, int s) {
    const int in_block = s % in_blocks;
    const int channel = in_block * kInBlock + tid / kCopyChunks, chunk = tid % kCopyChunks;
    if (chunk < chunks) {
      const int x = it.x0 - pad + chunk * vector, y_top = it.y0 - 2 * h;
      T* dst = f_halo(in_block) + (tid / kCopyChunks) * f_stride + chunk * vector;
      // The halo's rows in the image: [first, last), none past the last channel.
      const int first = max(0, -y_top), last = channel < d.C ? min(f_rows, d.H - y_top) : 0;
      int64_t row = (static_cast<int64_t>(it.batch) * d.C + channel) * N +
                    static_cast<int64_t>(y_top) * d.W;  // (y_top + fr) * W, read when inside
      const bool outside = x + vector <= 0 || x >= d.W;
      if (outside || (d.vector_rows && x >= 0 && x + vector <= d.W)) {  // 16 bytes or none
        for (int fr = 0; fr < f_rows; ++fr, row += d.W) {
          const bool inside = !outside && fr >= first && fr < last;
          copy_async_16(dst + fr * f_cols, inside ? features + row + x : features,
                        inside ? 16 : 0);
        }
      } else {  // across the image's edge, or rows not on whole vectors: element by element
        for (int fr = 0; fr < f_rows; ++fr, row += d.W) {
          const bool inside = fr >= first && fr < last;
#pragma unroll
          for (int v = 0; v < vector; ++v) {
            const bool in = inside && x + v >= 0 && x + v < d.W;
            dst[fr * f_cols + v] = in ? features[row + x + v] : narrow<T>(0.0f);
          }
        }
      }
    }
  };
  // dG_j1 .. dG_jK's blocks of step s (kernel s / in_blocks) into S's buffer `buffer`, and
  // their mirrors unless they borrow U_j's region and s is a kernel's first step.
  auto issue_grad_copies = [&](const Item& it, int s, int buffer) {
    const int j = s / in_blocks, in_block = s % in_blocks, chunk = tid % kCopyChunks;
    float* s_dst = s_tiles + buffer * (Tile::s_bytes(d.K) / 4);
    for (int half = 0; half < 2; ++half) {
      const int row = half * 32 + tid / kCopyChunks;  // dG's rows c_out, columns c_in
      copy_grad_rows(it, j, s_dst + row * kSRow + s_column(chunk * 4), kOutBlock * s_stride,
                     it.out_block * kOutBlock + row, in_block * kInBlock + chunk * 4);
    }
    if (!d.s_formed && (in_block > 0 || d.own_mirrors)) issue_mirrors(it, s);
  };

  // S_jk = (dG_jk + dG_jk^T) / n_k on the step's blocks, in place of dG's: the same operands,
  // added and scaled in the same order as reference.symmetric_grad, so the same bits; MMA
  // operands rounded once, here (TF32 rounding per fragment, 4x as often, gave the same bits;
  // 16-bit input's pairs packed from floats per fragment were 16 LDS.64 and 16 F2FP an
  // iteration, twice f32's shared-memory wavefronts). 16-bit input's S goes over dG's floats
  // as the input type: a row's 8 channels 8m .. 8m + 7 in its bytes 32m .. 32m + 15, which the
  // warp that forms them read (a warp takes 8 input channels of its rows), so ldmatrix reads
  // them as it reads TF32 values (channel c0's word at c0 of the row, either way).
  // A warp's lanes take 4 * per input by 8 / per output channels; a thread's 8 elements of each
  // mask share its 1 / n_k.
  auto form_symmetric = [&](int buffer, int batch) {
    if (per == 1 && d.s_formed) return;  // S came formed and rounded
    constexpr int kInLanes = 4 * per, kOutLanes = 8 / per;
    constexpr int kElements = kInBlock * kOutBlock / kThreads;  // a thread's, per mask
    // Element e = i * kThreads + tid has this c_in and c_out + i * kOutStep for every i (the
    // block's threads cover kInBlock input by kOutStep output channels): fixed offsets from a
    // mask's two rows. Derived from e apart, each element cost 30 instructions of indices.
    constexpr int kOutStep = kThreads / kInBlock;
    static_assert(kInLanes * kOutLanes == 32 && kThreads % (kInBlock * kOutLanes) == 0);
    const int rest = tid / 32;
    const int c_in = rest % (kInBlock / kInLanes) * kInLanes + tid % kInLanes;
    const int c_out = rest / (kInBlock / kInLanes) * kOutLanes + tid / kInLanes % kOutLanes;
    float* s = s_tiles + buffer * (Tile::s_bytes(d.K) / 4) + c_out * kSRow + s_column(c_in);
    const float* t = mirrors + c_in * t_stride + c_out;
    // (16-bit input) this element's place as the input type: where row c_out has channel 8m's
    // float (m = c / 8), plus 2 (c % 8) bytes
    T* pairs = reinterpret_cast<T*>(s - s_column(c_in) + s_column(c_in / 8 * 8)) + c_in % 8;
    for (int k = 0; k < d.K; ++k, s += kOutBlock * s_stride, t += kInBlock * t_stride,
             pairs += kOutBlock * s_stride * 2) {
      const float inverse = inverse_mass[(d.Bm == 1 ? 0 : batch) * d.K + k];
      float values[kElements];
      if (d.s_formed) {  // (16-bit input) S as it came, to be narrowed
#pragma unroll
        for (int i = 0; i < kElements; ++i) values[i] = s[i * kOutStep * kSRow];
      } else {
#pragma unroll
        for (int i = 0; i < kElements; ++i)
          values[i] = (s[i * kOutStep * kSRow] + t[i * kOutStep]) * inverse;
      }
      if constexpr (per == 2) __syncwarp();  // the warp's floats read before its pairs land
#pragma unroll
      for (int i = 0; i < kElements; ++i) {
        if constexpr (per == 1)
          s[i * kOutStep * kSRow] = bits_as<float>(round_to_tf32(values[i]));
        else
          pairs[i * kOutStep * kSRow * 2] = narrow<T>(values[i]);
      }
    }
  };

  if (static_cast<int>(blockIdx.x) >= items) return;
  Item it = item_at(blockIdx.x);
  issue_feature_copies(it, 0);
  issue_grad_copies(it, 0, 0);
  for (int e = tid; e < d.J * taps_per_kernel; e += kThreads) taps[e] = widen(kernels[e]);
  // Z's columns past the halo are never formed: zeros, so the MMAs there add nothing.
  if constexpr (u_padded > u_size)
    for (int e = tid; e < Tile::z_rows * (u_padded - u_size); e += kThreads) {
      const int row = e / (u_padded - u_size), p = u_size + e % (u_padded - u_size);
      z_tile[row * z_stride + p] = 0u;
    }

  // This warp's piece of U_j^T: all 64 output channels, positions wn .. (kN n-tiles of 8);
  // on wgmma, of U_j: the warpgroup's 32 output channels (4 n-tiles) from wo, rows wp .. of
  // every m-tile of 64 positions.
  constexpr int kN = Tile::n_tiles(kH);
  const int wn = warp * kN * 8, wo = warp / 4 * 32, wp = warp % 4 * 16;
  constexpr int kAccM = kWgmma ? u_padded / 64 : kMTiles, kAccN = kWgmma ? 4 : kN;
  float acc[kAccM][kAccN][4];
#pragma unroll
  for (int mi = 0; mi < kAccM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kAccN; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;
  float d_acc[kItems][kRows];
  int buffer = 0;  // S's buffer of the step in hand

  for (int w = blockIdx.x; w < items; w += gridDim.x) {
    const int y0 = it.y0, x0 = it.x0;
    const bool last_item = w + static_cast<int>(gridDim.x) >= items;
    // The next item (this one again after the last): found where its copies are issued and at
    // the end, rather than held in registers through the item.
    const auto next_item = [&] { return last_item ? it : item_at(w + gridDim.x); };
    // m_k^2 on the h-halo, 0 outside the image: U_j is zero there, the adjoint's padding. The
    // previous item's readers (its MMAs) passed its last barrier.
    const T* m_batch = masks + static_cast<int64_t>(d.Bm == 1 ? 0 : it.batch) * d.K * N;
    load_squares<4>(mask_sq, d.K * u_padded, m_batch, [&](int e) -> int64_t {
      const int k = e / u_padded, p = e % u_padded;
      const int y = y0 - h + p / u_cols, x = x0 - h + p % u_cols;
      const bool inside = p < u_size && y >= 0 && y < d.H && x >= 0 && x < d.W;
      return inside ? k * N + static_cast<int64_t>(y) * d.W + x : -1;
    });
#pragma unroll
    for (int i = 0; i < kItems; ++i)
#pragma unroll
      for (int o = 0; o < kRows; ++o) d_acc[i][o] = 0.0f;

    for (int s = 0; s < steps; ++s, buffer ^= 1) {
      const int j = s / in_blocks, in_block = s % in_blocks;
      const float* tap = taps + j * taps_per_kernel;
      // The next step's copies (the next item's first after the last step), issued as soon as
      // their regions are free, to land during this step's work: dG's once S is formed (S's
      // other buffer was read by the last step's MMAs, the mirrors' region by this form pass),
      // F's once Z_j is formed.
      const bool more = s + 1 < steps || !last_item;
      const Item after = s + 1 < steps ? it : next_item();
      const int after_step = s + 1 < steps ? s + 1 : 0;
      // F's halos kept for the item (f_blocks > 1): copied for the first kernel's steps alone
      // (the next item's first after the last step: its region the last kernel has left). A
      // form issuing each of the next item's blocks as soon as the last kernel had left its
      // region made ptxas feed some of the MMA loop's HMMAs 8-12 instructions after their
      // loads (16 or more as built: test_cuda_machine_code).
      const bool copy_f = more && (d.f_blocks == 1 || after_step < in_blocks);
      constexpr int kPasses = kProbe == kNoLoad ? 0 : kProbe == kLoadTwice ? 2 : 1;
      if (in_block == 0 && !d.own_mirrors && !d.s_formed) {
        __syncthreads();  // the last kernel's adjoint has read U_j: the mirrors may land
        issue_mirrors(it, s);
      }
      copy_async_wait_all();
      __syncthreads();  // step s's F, dG's blocks and mirrors are in; the last step's readers done
      form_symmetric(buffer, it.batch);
      if (per == 2 || !d.s_formed) __syncthreads();  // S formed
      for (int pass = 0; pass < kPasses && more; ++pass)
        issue_grad_copies(after, after_step, buffer ^ 1);

      // 2. Z_j on the h-halo: item (word row of Z, column, half of the rows), every loaded
      // value used for up to r of the item's rows; the halo's geometry compile-time.
      if constexpr (kProbe != kLoadOnly) {
        constexpr int kR = 2 * kH + 1;
        constexpr int kGroup = (kRows + 2 * kH) / 2;  // rows of Z_j an item forms
        if constexpr (per == 2) {
          // 16-bit: an item forms columns ux, ux + 1 (ux even) of both channels of a word row
          // from the halo's 32-bit words (convolve_pair: the first column read, ux - 2h, is
          // even) and stores each row's two words as one. A warp-item: 4 word rows x 2 halves x
          // 4 column pairs: pairs 0-3 on warps 0-3, 4-7 on warps 4-7, 8-11 (h of them) on
          // warps 0-3 again, so that each SM sub-partition (warps w, w + 4) runs 3 items.
          // With rows of 16 words (h > 0) lane `item % 4`'s word falls in bank pair % 4 + 4 k,
          // k = s (2 row + e) + 4 half kGroup + pair / 4 (mod 8), s = f_stride / 4 odd: the 8
          // lanes of each pair % 4 take 8 distinct k for both channels e, a lane taking channel
          // 2 row + half first. 12 warp-items are the fewest free of conflicts (pairs 0, 4, 8
          // share pair % 4: 96 items, 8 a warp-item; gpu-notes); each 64-bit store takes 2
          // wavefronts, the least.
          static_assert(Tile::z_rows == 16 && kFormCols == 24 && u_cols <= kFormCols);
          for (int item = tid; item < Tile::z_rows * kFormCols; item += kThreads) {
            const int pair = item / 128 * 4 + item % 4, half = item / 16 % 2;
            const int row = item / 32 % 4 * 4 + item / 4 % 4, ux = 2 * pair, uy = half * kGroup;
            if (ux >= u_cols) continue;
            const T* src = f_halo(in_block) + (2 * row + half) * f_stride + uy * f_cols + ux +
                           pad - 2 * kH;
            float z[2][2][kGroup] = {};  // the lane's first channel, the other; column; row
            convolve_pair<kGroup, kR, kH>(z[0], src, f_cols, kGroup + 2 * kH, tap);
            convolve_pair<kGroup, kR, kH>(z[1], src + (1 - 2 * half) * f_stride, f_cols,
                                          kGroup + 2 * kH, tap);
            struct alignas(8) Words {
              uint32_t column[2];
            };
#pragma unroll
            for (int o = 0; o < kGroup; ++o) {
              Words words;
#pragma unroll
              for (int column = 0; column < 2; ++column) {  // channel 2 row in the low half
                const uint32_t formed = pack_pair<T>(z[0][column][o], z[1][column][o]);
                words.column[column] = half ? formed >> 16 | formed << 16 : formed;
              }
              *reinterpret_cast<Words*>(z_tile + row * z_stride + (uy + o) * u_cols + ux) = words;
            }
          }
        } else {
          for (int item = tid; item < Tile::z_rows * kFormCols * 2; item += kThreads) {
            const int ux = item % kFormCols, row = item / kFormCols % Tile::z_rows;
            const int uy = item / (kFormCols * Tile::z_rows) * kGroup;
            if (ux >= u_cols) continue;
            float z[kGroup];
#pragma unroll
            for (int o = 0; o < kGroup; ++o) z[o] = 0.0f;
            const T* src = f_halo(in_block) + row * f_stride + uy * f_cols + ux + pad - 2 * kH;
            convolve_column<kGroup, kR, false>(z, src, f_cols, kGroup + 2 * kH, tap);
#pragma unroll
            for (int o = 0; o < kGroup; ++o)
              z_tile[row * z_stride + (uy + o) * u_cols + ux] = bits_as<uint32_t>(z[o]);
          }
        }
      }
      // S's copies and form pass, before wgmma's async proxy reads S (with CAST_WGMMA)
      if constexpr (kWgmma) fence_async_shared();
      __syncthreads();  // Z_j formed; F's halo free (kept for the next kernels where resident)
      for (int pass = 0; pass < kPasses && copy_f; ++pass) issue_feature_copies(after, after_step);

      // 3. U_j^T += S_k (m_k^2 Z_j)^T for every mask, kInBlock channels deep; the warp's
      // n-tiles a compile-time count, so no branch sits between the HMMAs.
      const float* s_tile = s_tiles + buffer * (Tile::s_bytes(d.K) / 4);
      constexpr int kDepth = kProbe == kLoadOnly || kProbe == kNoMma ? 0 : kInBlock;
      if constexpr (kWgmma) {
        // Per mask and 8 input channels (16 for 16-bit input) one m64n32k8 (k16) a m-tile, one
        // group, its A in one of two register sets by the step's parity: a group stays in
        // flight while the next step loads and scales, and the wait for it comes before its set
        // is written again (two steps on; the hold keeps the compiler from putting anything
        // else there sooner: ptxas does not guard registers a wgmma in flight reads). A's
        // fragment of m-tile mt:
        // rows (positions) p = mt 64 + wp + g (+ 8), columns (input channels) t (+ 4) of
        // Z_j^T (16-bit: channel pairs 2t, 2t + 8), i.e. Z_j's words t z_stride + p: banks
        // 8 t + g, conflict-free.
        const uint64_t b = wgmma_descriptor(shared_address(s_tile + wo * kSRow),
                                            per * kOutBlock * 16, 8 * 16);
        static_assert(kDepth % (2 * step) == 0, "two register sets by the step's parity");
        uint32_t sets[2][kAccM][4] = {};
#pragma unroll 1
        for (int k = 0; k < (kDepth > 0 ? d.K : 0); ++k) {
          float w[kAccM][2];
#pragma unroll
          for (int mt = 0; mt < kAccM; ++mt)
            w[mt][0] = mask_sq[k * u_padded + mt * 64 + wp + g],
            w[mt][1] = mask_sq[k * u_padded + mt * 64 + wp + g + 8];
          const uint64_t b_k = b + (k * kOutBlock * s_stride * 4 >> 4);
#pragma unroll
          for (int c0 = 0; c0 < kDepth; c0 += step) {
            uint32_t (&a)[kAccM][4] = sets[c0 / step % 2];
#pragma unroll
            for (int mt = 0; mt < kAccM; ++mt) {
              const uint32_t* z = z_tile + (c0 / per + t) * z_stride + mt * 64 + wp + g;
              const auto scaled = [](uint32_t word, float w) {
                if constexpr (per == 1) return round_to_tf32(bits_as<float>(word) * w);
                else return HalfOperands<T>::scaled(word, w, w);  // both: one position
              };
              a[mt][0] = scaled(z[0], w[mt][0]), a[mt][1] = scaled(z[8], w[mt][1]);
              a[mt][2] = scaled(z[4 * z_stride], w[mt][0]);
              a[mt][3] = scaled(z[4 * z_stride + 8], w[mt][1]);
            }
            wgmma_fence();
#pragma unroll
            for (int mt = 0; mt < kAccM; ++mt)
              wgmma_m64n32<T>(acc[mt], a[mt], b_k + (s_column(c0) * 4 >> 4));
            wgmma_commit();
            // The step before's group is done (and, at a mask's last step, this one's: no group
            // crosses the masks' loop, whose count is not compile-time) ...
            if (c0 + step < kDepth) wgmma_wait<1>();
            else wgmma_wait<0>();
#pragma unroll
            for (int mt = 0; mt < kAccM; ++mt)
              wgmma_hold(sets[c0 / step % 2 ^ 1][mt]);  // ... and only now its set is free
          }
        }
        wgmma_settled(acc);  // every group done: S's buffer is rewritten next, U read
      } else {
        // n-tile ni's first position: where the 8 warps' n-tiles outnumber Z's (4-row tiles at
        // r = 5 and 7), those past the last repeat it (wasted, not stored), rather than Z, U and
        // m_k^2 growing by whole n-tiles of zeros (up to 12 KiB, which moved shapes off the
        // tensor cores).
        constexpr int kLast = u_padded - 8;
        const auto column = [&](int ni) {
          if constexpr (kLast + 8 == kN * kWarps * 8) return wn + ni * 8;
          else return min(wn + ni * 8, kLast);
        };
        // A (mask k, input step c0) iteration's operands, ready for its HMMAs: the S fragments
        // (A) and the warp's B fragments, Z_j's words already scaled by m_k^2 (and rounded to
        // TF32). Iterations run c0 fastest, each from one of two sets of registers (c0's
        // parity: kDepth / step is even), and each loads the set of the iteration two after it
        // once its HMMAs are issued, so a load and its scaling have a whole iteration of HMMAs
        // to land. With one set loaded an iteration ahead and k fastest (until 2026-11-27),
        // ptxas issued the second iteration of each trip's loads a few instructions before the
        // FMULs and HMMAs that waited for them (gpu-notes).
        struct Fragments {
          uint32_t a[kMTiles][4];
          uint32_t b[kN][2];
        };
        constexpr int kSteps = kDepth / step;  // input steps of an iteration's mask
        static_assert(kSteps % 2 == 0, "two sets of registers by the step's parity");
        // S's rows as ldmatrix reads them (words: TF32 values, or pairs of 16-bit ones, input
        // step c0's at word c0 of a row): this lane's row lane % 16 of its 4 matrices, from the
        // input step's channel 4 * per * (lane / 16).
        const uint32_t* s_lane = reinterpret_cast<const uint32_t*>(s_tile) +
                                 (lane % 16) * s_stride + lane / 16 * 4 * per;
        const uint32_t* z_lane = z_tile + t * z_stride + g;
        const float* mask_lane = mask_sq + g;
        // This step's B words of Z_j (a step's input steps x n-tiles x 2) in registers where 24
        // or fewer (float32 at r <= 3, and r = 5 on 4-row tiles; 16-bit input), read once rather
        // than for every mask (float32 at r = 5 on 8-row tiles: ptxas spilled them at 255).
        constexpr bool kHeld = kSteps > 0 && kSteps * kN * 2 <= 24;
        uint32_t z_words[kHeld ? kSteps : 1][kN][2];
        const auto z_at = [&](int c, int ni, int e) {  // a word's offset from z_lane
          return (c * step / per + e * 4) * z_stride + column(ni);
        };
        // Mask k's words of m_k^2 on the warp's n-tiles (mask_row: their offset of mask_lane).
        struct MaskWords {
          float w[kN];
        };
        const auto mask_words = [&](int mask_row) {
          MaskWords words;
#pragma unroll
          for (int ni = 0; ni < kN; ++ni) words.w[ni] = mask_lane[mask_row + column(ni)];
          return words;
        };
        // Mask k's fragments for input step c0: its S rows (s_row: their offset of s_lane), a
        // fragment an ldmatrix (S came as MMA operands from form_symmetric), and Z_j's words
        // scaled by its words w.
        const auto load = [&](int s_row, const MaskWords& words, auto c0, Fragments& f) {
          const uint32_t* sp = s_lane + s_row + decltype(c0)::value;
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) load_matrix_x4(f.a[mi], sp + mi * 16 * s_stride);
#pragma unroll
          for (int ni = 0; ni < kN; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const uint32_t z = kHeld ? z_words[decltype(c0)::value / step][ni][e]
                                       : z_lane[z_at(decltype(c0)::value / step, ni, e)];
              const float w = words.w[ni];
              if constexpr (per == 1) f.b[ni][e] = round_to_tf32(bits_as<float>(z) * w);
              else f.b[ni][e] = HalfOperands<T>::scaled(z, w, w);
            }
        };
        const auto multiply = [&](const Fragments& f) { mma_grid<T>(acc, f.a, f.b, kMTiles, kN); };
        if constexpr (kDepth > 0) {
#pragma unroll
          for (int c = 0; c < kSteps; ++c)
#pragma unroll
            for (int ni = 0; ni < kN; ++ni)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if constexpr (kHeld) z_words[c][ni][e] = z_lane[z_at(c, ni, e)];
          MaskWords words = mask_words(0);
          Fragments sets[2];
          load(0, words, std::integral_constant<int, 0>{}, sets[0]);
          load(0, words, std::integral_constant<int, step>{}, sets[1]);
#pragma unroll 1
          for (int k = 0; k < d.K; ++k) {
            // The iterations two ahead of this mask's last two are the next mask's first two
            // (after the last mask, the first's again: loaded, not used, no branch); its words
            // are loaded first, a trip before they scale.
            const int s_row = k * kOutBlock * s_stride;
            const bool more = k + 1 < d.K;
            const int next_s_row = more ? s_row + kOutBlock * s_stride : 0;
            const MaskWords next_words = mask_words(more ? (k + 1) * u_padded : 0);
            static_for<kSteps>([&](auto i) {
              constexpr int kAhead = decltype(i)::value + 2;
              Fragments& set = sets[decltype(i)::value % 2];
              multiply(set);
              if constexpr (kAhead < kSteps)
                load(s_row, words, std::integral_constant<int, kAhead * step>{}, set);
              else
                load(next_s_row, next_words,
                     std::integral_constant<int, (kAhead - kSteps) * step>{}, set);
            });
            words = next_words;
          }
        }
      }

      if (in_block + 1 < in_blocks) continue;
      // U_j complete: to shared memory (the previous kernel's adjoint readers passed a barrier
      // since), then the adjoint into dF's accumulators.
      if constexpr (kWgmma) {
#pragma unroll
        for (int mt = 0; mt < kAccM; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row = wo + nt * 8 + 2 * t + i % 2, p = mt * 64 + wp + g + 8 * (i / 2);
              u_tile[row * u_stride + p] = acc[mt][nt][i];
              acc[mt][nt][i] = 0.0f;
            }
      } else {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int ni = 0; ni < kN; ++ni) {
            if (wn + ni * 8 >= u_padded) break;  // (repeats of the last n-tile)
#pragma unroll
            for (int i = 0; i < 4; i += 2) {
              const int row = mi * 16 + g + 4 * i, p = wn + ni * 8 + 2 * t;
              *reinterpret_cast<float2*>(u_tile + row * u_stride + p) =
                  make_float2(acc[mi][ni][i], acc[mi][ni][i + 1]);
              acc[mi][ni][i] = acc[mi][ni][i + 1] = 0.0f;
            }
          }
      }
      __syncthreads();
      if constexpr (kProbe != kLoadOnly) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int item = tid + i * kThreads, ox = item % kTileCols, c = item / kTileCols;
          convolve_column<kRows, 2 * kH + 1, true>(d_acc[i], u_tile + c * u_stride + ox, u_cols,
                                                   u_rows, tap);
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int item = tid + i * kThreads, x = x0 + item % kTileCols;
      const int c = it.out_block * kOutBlock + item / kTileCols;
#pragma unroll
      for (int o = 0; o < kRows; ++o) {
        const int y = y0 + o;
        if (c < d.C && y < d.H && x < d.W)
          d_features[(static_cast<int64_t>(it.batch) * d.C + c) * N +
                     static_cast<int64_t>(y) * d.W + x] = narrow<T>(d_acc[i][o]);
      }
    }
    it = next_item();
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

// Dims of a launch: the shape's fields, which every kernel reads, and its cut into tiles of
// rows x cols positions and blocks of channel_block channels; the forward adds its splits.
template <typename T>
Dims tiled_dims(const CastGramShape& s, const void* features, int rows, int cols,
                int channel_block) {
  Dims d{};
  d.B = static_cast<int>(s.B);
  d.C = static_cast<int>(s.C);
  d.H = static_cast<int>(s.H);
  d.W = static_cast<int>(s.W);
  d.Bm = static_cast<int>(s.Bm);
  d.K = static_cast<int>(s.K);
  d.J = static_cast<int>(s.J);
  d.r = static_cast<int>(s.r);
  d.vector_rows = d.W % Halo<T>::vector == 0 && reinterpret_cast<uintptr_t>(features) % 16 == 0;
  d.channel_blocks = ceil_div(d.C, channel_block);
  d.tiles_x = ceil_div(d.W, cols);
  d.tiles = ceil_div(d.H, rows) * d.tiles_x;
  return d;
}

template <typename T>
Dims forward_dims(const CastGramShape& s, const CastGramPlan& plan, const void* features) {
  Dims d = tiled_dims<T>(s, features, static_cast<int>(plan.tile_rows), kTileCols, kPairBlock);
  d.splits = static_cast<int>(plan.splits);
  d.tiles_per_split = ceil_div(d.tiles, d.splits);
  d.kernel_group = static_cast<int>(plan.kernel_group);
  d.mask_group = static_cast<int>(plan.mask_group);
  d.mask_groups = ceil_div(d.K, d.mask_group);
  return d;
}

// CAST_CUDA_PROBE's variant (kFull where unset).
inline int probe_variant() {
  const char* value = std::getenv("CAST_CUDA_PROBE");
  return value == nullptr ? kFull : std::atoi(value);
}

// Probe variants exist for float32 and bfloat16 on the widest tiles.
template <typename T>
inline constexpr bool kProbed = std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>;

// The launchers, by direction and input type, and apart from them the probe's variants and the
// forward's finishing kernel. Each is compiled in one translation unit of its own (a
// masked_gram_cuda_*.cu, `extern template` below for every other), so the build compiles the
// kernels in parallel and none twice: as one file they took nvcc 48 s for sm_90 on one core.
template <typename T>
struct Forward {
  static cudaError_t launch(const CastGramShape& s, const CastGramPlan& plan,
                            const void* features, const void* masks, const void* kernels,
                            const void* inverse_mass, void* scratch, void* gram,
                            cudaStream_t stream);
};

template <typename T>
struct ForwardProbe {
  static cudaError_t launch(int probe, const Dims& d, const CastGramPlan& plan,
                            const void* features, const void* masks, const void* kernels,
                            void* gram, void* scratch, cudaStream_t stream);
};

// A: the accumulation type.
template <typename A>
struct FinishForward {
  static cudaError_t launch(const Dims& d, const void* scratch, const void* inverse_mass,
                            void* gram, cudaStream_t stream);
};

// S whole into `symmetric` for the tensor-core backward of input type T.
template <typename T>
struct SymmetricGrad {
  static cudaError_t launch(const Dims& d, const void* grad, const void* inverse_mass,
                            void* symmetric, cudaStream_t stream);
};

template <typename T>
struct Backward {
  static cudaError_t launch(const CastGramShape& s, const CastGramPlan& plan, const void* grad,
                            const void* inverse_mass, const void* features, const void* masks,
                            const void* kernels, void* symmetric, void* d_features,
                            cudaStream_t stream);
};

template <typename T>
struct BackwardProbe {
  static cudaError_t launch(int probe, const CastGramShape& s, const CastGramPlan& plan,
                            const void* grad, const void* inverse_mass, const void* features,
                            const void* masks, const void* kernels, void* symmetric,
                            void* d_features, cudaStream_t stream);
};

template <typename T, bool kTensorCores, int kRows, int kProbe = kFull>
cudaError_t launch_forward_kernel(const Dims& d, const CastGramPlan& plan, const void* features,
                                  const void* masks, const void* kernels, void* gram,
                                  void* scratch, cudaStream_t stream) {
  const auto kernel = _masked_gram_fwd_kernel<T, kTensorCores, kRows, kProbe>;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.forward_smem));
  if (err != cudaSuccess) return err;
  const int groups = ceil_div(d.J, d.kernel_group) * d.mask_groups;
  const dim3 grid(d.channel_blocks * (d.channel_blocks + 1) / 2, d.splits, d.B * groups);
  kernel<<<grid, kThreads, plan.forward_smem, stream>>>(
      static_cast<const T*>(features), static_cast<const T*>(masks),
      static_cast<const T*>(kernels), static_cast<acc_t<T>*>(gram),
      static_cast<acc_t<T>*>(scratch), d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ForwardProbe<T>::launch(int probe, const Dims& d, const CastGramPlan& plan,
                                    const void* features, const void* masks,
                                    const void* kernels, void* gram, void* scratch,
                                    cudaStream_t stream) {
  switch (probe) {
    case kLoadOnly:
      return launch_forward_kernel<T, true, kWideRows, kLoadOnly>(d, plan, features, masks,
                                                                  kernels, gram, scratch, stream);
    case kNoMma:
      return launch_forward_kernel<T, true, kWideRows, kNoMma>(d, plan, features, masks, kernels,
                                                               gram, scratch, stream);
    case kNoLoad:
      return launch_forward_kernel<T, true, kWideRows, kNoLoad>(d, plan, features, masks,
                                                                kernels, gram, scratch, stream);
    case kLoadTwice:
      return launch_forward_kernel<T, true, kWideRows, kLoadTwice>(d, plan, features, masks,
                                                                   kernels, gram, scratch, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename A>
cudaError_t FinishForward<A>::launch(const Dims& d, const void* scratch, const void* inverse_mass,
                                     void* gram, cudaStream_t stream) {
  _masked_gram_finish_kernel<A><<<gram_blocks(d), kThreads, 0, stream>>>(
      static_cast<const A*>(scratch), static_cast<const A*>(inverse_mass), static_cast<A*>(gram),
      d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Forward<T>::launch(const CastGramShape& s, const CastGramPlan& plan,
                               const void* features, const void* masks, const void* kernels,
                               const void* inverse_mass, void* scratch, void* gram,
                               cudaStream_t stream) {
  const Dims d = forward_dims<T>(s, plan, features);
  const bool probed = kProbed<T> && plan.tensor_cores && plan.tile_rows == kWideRows;
  const int probe = probed ? probe_variant() : kFull;
  cudaError_t err = cudaErrorInvalidValue;
  if (probe != kFull) {
    if constexpr (kProbed<T>)
      err = ForwardProbe<T>::launch(probe, d, plan, features, masks, kernels, gram, scratch,
                                    stream);
  } else if constexpr (sizeof(acc_t<T>) == 4) {
    if (!plan.tensor_cores)
      err = launch_forward_kernel<T, false, kSimtRows>(d, plan, features, masks, kernels, gram,
                                                       scratch, stream);
    else if (plan.tile_rows == kWideRows)
      err = launch_forward_kernel<T, true, kWideRows>(d, plan, features, masks, kernels, gram,
                                                      scratch, stream);
    else
      err = launch_forward_kernel<T, true, kNarrowRows>(d, plan, features, masks, kernels, gram,
                                                        scratch, stream);
  } else {
    err = launch_forward_kernel<T, false, kSimtRows>(d, plan, features, masks, kernels, gram,
                                                     scratch, stream);
  }
  if (err != cudaSuccess) return err;
  return FinishForward<acc_t<T>>::launch(d, scratch, inverse_mass, gram, stream);
}

template <typename T>
cudaError_t SymmetricGrad<T>::launch(const Dims& d, const void* grad, const void* inverse_mass,
                                     void* symmetric, cudaStream_t stream) {
  _masked_gram_symmetric_kernel<T><<<gram_blocks(d), kThreads, 0, stream>>>(
      static_cast<const float*>(grad), static_cast<const float*>(inverse_mass),
      static_cast<float*>(symmetric), d);
  return cudaGetLastError();
}

template <typename T, typename Kernel>
cudaError_t launch_backward_kernel(Kernel kernel, const Dims& d, const dim3 grid,
                                   const CastGramPlan& plan, const void* grad,
                                   const void* inverse_mass, const void* features,
                                   const void* masks, const void* kernels, void* d_features,
                                   cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.backward_smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, plan.backward_smem, stream>>>(
      static_cast<const acc_t<T>*>(grad), static_cast<const acc_t<T>*>(inverse_mass),
      static_cast<const T*>(features), static_cast<const T*>(masks),
      static_cast<const T*>(kernels), static_cast<T*>(d_features), d);
  return cudaGetLastError();
}

// The tensor-core backward kernel for the halo h = r / 2 (its template argument), or nullptr
// where the tile does not take it (the plan picks the tiles that do).
template <typename T, int kRows, int kProbe = kFull>
auto mma_backward_kernel(int h) {
  using Tile = MmaBackwardTile<T, kRows>;
  const auto at = [](auto halo) {
    constexpr int kH = decltype(halo)::value;
    using Kernel = decltype(&_masked_gram_bwd_mma_kernel<T, kRows, 0, kProbe>);
    if constexpr (Tile::fits(2 * kH + 1))
      return Kernel{_masked_gram_bwd_mma_kernel<T, kRows, kH, kProbe>};
    else
      return Kernel{nullptr};
  };
  static_assert(kMmaHalo == 3, "one case per halo");
  switch (h) {
    case 0: return at(std::integral_constant<int, 0>{});
    case 1: return at(std::integral_constant<int, 1>{});
    case 2: return at(std::integral_constant<int, 2>{});
    case 3: return at(std::integral_constant<int, 3>{});
  }
  return at(std::integral_constant<int, kMmaHalo + 1>{});
}

// The tensor-core backward (`rows` x 16 tiles, 64 output channels): one block per SM (its
// shared memory allows no more), each walking items gridDim.x apart.
template <typename T, typename Kernel>
cudaError_t launch_mma_backward(Kernel kernel, int rows, const CastGramShape& s,
                                const CastGramPlan& plan, const void* grad,
                                const void* inverse_mass, const void* features,
                                const void* masks, const void* kernels, void* symmetric,
                                void* d_features, cudaStream_t stream) {
  if (kernel == nullptr) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  Dims d = tiled_dims<T>(s, features, rows, kTileCols, kOutBlock);
  d.f_blocks = plan.backward_f_resident ? ceil_div(d.C, kInBlock) : 1;
  d.own_mirrors = plan.backward_own_mirrors;
  if (plan.symmetric_scratch) {
    err = SymmetricGrad<T>::launch(d, grad, inverse_mass, symmetric, stream);
    if (err != cudaSuccess) return err;
    grad = symmetric;
    d.s_formed = true;
  }
  const dim3 grid(std::min(d.tiles * d.channel_blocks * d.B, sms));
  return launch_backward_kernel<T>(kernel, d, grid, plan, grad, inverse_mass, features, masks,
                                   kernels, d_features, stream);
}

template <typename T>
cudaError_t BackwardProbe<T>::launch(int probe, const CastGramShape& s, const CastGramPlan& plan,
                                     const void* grad, const void* inverse_mass,
                                     const void* features, const void* masks,
                                     const void* kernels, void* symmetric, void* d_features,
                                     cudaStream_t stream) {
  // Built for the probe's r = 3 alone (bench/gpu_probe.py, gpu_ncu.py).
  const auto mma = [&](auto kernel) {
    return launch_mma_backward<T>(s.r == 3 ? kernel : nullptr, kWideRows, s, plan, grad,
                                  inverse_mass, features, masks, kernels, symmetric, d_features,
                                  stream);
  };
  switch (probe) {
    case kLoadOnly:
      return mma(_masked_gram_bwd_mma_kernel<T, kWideRows, 1, kLoadOnly>);
    case kNoMma:
      return mma(_masked_gram_bwd_mma_kernel<T, kWideRows, 1, kNoMma>);
    case kNoLoad:
      return mma(_masked_gram_bwd_mma_kernel<T, kWideRows, 1, kNoLoad>);
    case kLoadTwice:
      return mma(_masked_gram_bwd_mma_kernel<T, kWideRows, 1, kLoadTwice>);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t Backward<T>::launch(const CastGramShape& s, const CastGramPlan& plan,
                                const void* grad, const void* inverse_mass,
                                const void* features, const void* masks, const void* kernels,
                                void* symmetric, void* d_features, cudaStream_t stream) {
  if constexpr (kProbed<T>) {
    const int probe = plan.backward_rows == kWideRows ? probe_variant() : kFull;
    if (probe != kFull)
      return BackwardProbe<T>::launch(probe, s, plan, grad, inverse_mass, features, masks,
                                      kernels, symmetric, d_features, stream);
  }
  if constexpr (sizeof(T) <= 4) {
    if (plan.backward_rows == kWideRows || plan.backward_rows == kNarrowRows) {
      const int rows = static_cast<int>(plan.backward_rows);
      const int h = static_cast<int>(s.r) / 2;
      const auto kernel = rows == kWideRows ? mma_backward_kernel<T, kWideRows>(h)
                                            : mma_backward_kernel<T, kNarrowRows>(h);
      return launch_mma_backward<T>(kernel, rows, s, plan, grad, inverse_mass, features, masks,
                                    kernels, symmetric, d_features, stream);
    }
  }
  // The SIMT kernel: a block per (tile, 32 output channels, batch item).
  using Tile = PositionTile<acc_t<T>>;
  const Dims d = tiled_dims<T>(s, features, Tile::rows, Tile::cols, kSimtChannels);
  return launch_backward_kernel<T>(_masked_gram_bwd_simt_kernel<T>, d,
                                   dim3(d.tiles, d.channel_blocks, d.B), plan, grad,
                                   inverse_mass, features, masks, kernels, d_features, stream);
}

extern template struct Forward<float>;
extern template struct Forward<double>;
extern template struct Forward<__nv_bfloat16>;
extern template struct Forward<__half>;
extern template struct ForwardProbe<float>;
extern template struct ForwardProbe<__nv_bfloat16>;
extern template struct FinishForward<float>;
extern template struct FinishForward<double>;
extern template struct SymmetricGrad<float>;
extern template struct SymmetricGrad<__nv_bfloat16>;
extern template struct SymmetricGrad<__half>;
extern template struct Backward<float>;
extern template struct Backward<double>;
extern template struct Backward<__nv_bfloat16>;
extern template struct Backward<__half>;
extern template struct BackwardProbe<float>;
extern template struct BackwardProbe<__nv_bfloat16>;

}  // namespace cast_cuda
