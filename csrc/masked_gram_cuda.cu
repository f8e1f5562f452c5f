// CUDA kernels of the fused masked high-order Gram op (SPEC §1-2) and their plain launchers.
//
// Notation as in SPEC: F (B, C, H, W), masks m_k (Bm, K, H, W), kernels p_j (J, r, r) with
// h = r / 2, Z_j = P_j F (cross-correlation, zero padding), n_k = sum m_k^2.
//
// Forward, one block per (channel-block pair a <= b, split s of the positions, batch item,
// group of kernels and masks): for every tile of positions in its split it loads F on the tile
// plus its h-halo for the 2 * kChannelTile channels of blocks a and b into shared memory once,
// forms Z_j on the tile in shared memory for each kernel of its group, and adds
// sum_n m_k[n]^2 Z_j[n, a] Z_j[n, b]^T for each mask of its group to accumulators in shared
// memory. The split's partial Grams go to a scratch (S, B, J, K, C, C); a second kernel sums the
// splits in a fixed order (deterministic, no atomics), scales by 1 / n_k and mirrors the upper
// triangle.
//
// Backward, one block per (tile of output positions, output channel block, batch item): with
// S_jk = (dG_jk + dG_jk^T) / n_k precomputed, for each kernel j it forms
// U_j = sum_k m_k^2 Z_j S_jk on the tile plus its h-halo (Z_j needs F on a 2h-halo), one input
// channel block at a time, in shared memory, then applies the adjoint convolution (p_j rotated by
// 180 degrees) into the block's dF accumulators in registers. Nothing of size J * N * C is ever
// written to global memory.
//
// Accumulation in float (double for double). The matrix products (the forward's Grams, the
// backward's U_j) run on TF32 tensor cores (WMMA m16n16k8, float accumulators) for float16 and
// bfloat16 input, and for float32 when allow_tf32, on sm_80 and newer where the tiles fit in
// shared memory; float64 and float32 without allow_tf32 run plain SIMT code. TF32 keeps 10
// mantissa bits: as many as float16 and more than bfloat16, so it loses nothing for those inputs.
// The convolutions and the adjoint stay SIMT: r * r multiply-adds per value, not a product.
#include "masked_gram_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>

namespace {

constexpr int kThreads = 256;
constexpr int kChannelTile = 32;  // channels per channel block: TC

// A tile of positions. Double halves the rows so a block's shared memory stays the same size.
template <typename A>
struct PositionTile {
  static constexpr int rows = 8, cols = 16, size = rows * cols;
};
template <>
struct PositionTile<double> {
  static constexpr int rows = 4, cols = 16, size = rows * cols;
};

template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulatorOf<T>::type;

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

// Shapes and cuts, passed by value to every kernel.
struct Dims {
  int B, C, H, W, Bm, K, J, r;
  int channel_blocks;         // nb = ceil(C / TC)
  int tiles_x, tiles;         // tiles of positions: per row of tiles, in all
  int splits, tiles_per_split;
  int kernel_group, mask_group, mask_groups;  // forward: kernels and masks per block
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The tensor-core forward: each warp multiplies one 16 x 16 tile of a (TC x TC) Gram block over
// one half of the tile's positions, so the Gram accumulators come in two halves.
constexpr int kMmaTile = 16;
constexpr int kMmaDepth = 8;  // TF32 WMMA is m16n16k8
constexpr int kPositionHalves = 2;
constexpr int kGramTiles = (kChannelTile / kMmaTile) * (kChannelTile / kMmaTile);
static_assert(kThreads / 32 == kPositionHalves * kGramTiles,
              "one warp per (Gram tile, half of the positions)");
static_assert(kChannelTile % kMmaDepth == 0,
              "the backward's products step over whole channel blocks");

// Row strides of the forward's Z tile (2 TC channels) and weighted tile (TC channels): odd for
// conflict-free SIMT, a multiple of 8 floats for WMMA's 32-byte aligned tile pointers.
__host__ __device__ constexpr int z_stride_of(bool tensor_cores) {
  return tensor_cores ? 2 * kChannelTile + 8 : 2 * kChannelTile + 1;
}
constexpr int kWeightedStride = kChannelTile + 8;

// Forward shared memory, in accumulator elements, in the order the kernel lays it out.
template <typename A>
__host__ __device__ constexpr int forward_smem_elements(int r, int kernel_group, int mask_group,
                                                        bool tensor_cores) {
  using Tile = PositionTile<A>;
  return (tensor_cores ? kPositionHalves : 1) * kernel_group * mask_group * kChannelTile *
             kChannelTile  // Gram accumulators
         + 2 * kChannelTile * (Tile::rows + r - 1) * (Tile::cols + r - 1)  // F on the halo
         + Tile::size * z_stride_of(tensor_cores)  // Z_j on the tile
         + (tensor_cores ? Tile::size * kWeightedStride : 0)  // m_k^2 Z_j, block a's channels
         + mask_group * Tile::size  // m_k^2 on the tile
         + kernel_group * r * r;  // taps of the group's kernels
}

// The backward's h-halo of positions, rounded up to whole 16-row WMMA tiles on tensor cores.
template <typename A>
__host__ __device__ constexpr int backward_rows(int r, bool tensor_cores) {
  using Tile = PositionTile<A>;
  const int size = (Tile::rows + r - 1) * (Tile::cols + r - 1);
  return tensor_cores ? ceil_div(size, kMmaTile) * kMmaTile : size;
}

// Row strides of the backward's Z_j (SIMT) or m_k^2 Z_j for all k (tensor cores), and of U_j.
__host__ __device__ constexpr int backward_z_stride(int K, bool tensor_cores) {
  return tensor_cores ? K * kChannelTile + 8 : kChannelTile + 1;
}
__host__ __device__ constexpr int backward_u_stride(bool tensor_cores) {
  return tensor_cores ? kChannelTile + 8 : kChannelTile + 1;
}

template <typename A>
__host__ __device__ constexpr int backward_smem_elements(int r, int K, int J, bool tensor_cores) {
  using Tile = PositionTile<A>;
  const int rows = backward_rows<A>(r, tensor_cores);
  return kChannelTile * (Tile::rows + 2 * (r - 1)) * (Tile::cols + 2 * (r - 1))  // F, 2h-halo
         + rows * backward_z_stride(K, tensor_cores)  // Z_j, or m_k^2 Z_j for every k
         + rows * backward_u_stride(tensor_cores)  // U_j
         + K * kChannelTile * kChannelTile  // S_jk restricted to (input, output) channel blocks
         + K * (Tile::rows + r - 1) * (Tile::cols + r - 1)  // m_k^2 on the h-halo
         + J * r * r;  // taps
}

// One Gram accumulation step on tensor cores: acc[jl, kl] += (m_k^2 Z_a)^T Z_b over the tile.
// One TF32 tensor-core step shared by the forward and the backward: sum += A B with A
// (kMmaTile x kMmaDepth) at a, leading dimension lda, laid out as LayoutA, and B
// (kMmaDepth x kMmaTile) row-major at b, leading dimension ldb; both rounded to TF32 first.
template <typename LayoutA, typename Accumulator>
__device__ __forceinline__ void mma_tf32_step(Accumulator& sum, const float* a, int lda,
                                              const float* b, int ldb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // TF32 needs sm_80; the plan never picks tensor cores below it
#else
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kMmaDepth, wmma::precision::tf32, LayoutA>
      lhs;
  wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaDepth, wmma::precision::tf32,
                 wmma::row_major>
      rhs;
  wmma::load_matrix_sync(lhs, a, lda);
  wmma::load_matrix_sync(rhs, b, ldb);
  for (int t = 0; t < lhs.num_elements; ++t) lhs.x[t] = wmma::__float_to_tf32(lhs.x[t]);
  for (int t = 0; t < rhs.num_elements; ++t) rhs.x[t] = wmma::__float_to_tf32(rhs.x[t]);
  wmma::mma_sync(sum, lhs, rhs, sum);
#endif
}

// weighted (Tile::size, kWeightedStride): m_k^2 Z_j for block a's channels; z_tile
// (Tile::size, z_stride): Z_j, block b's channels from column TC; acc: the two halves of this
// block's (TC x TC) accumulators for (jl, kl), half_stride elements apart.
template <int positions, int z_stride>
__device__ __forceinline__ void gram_tile_mma(const float* weighted, const float* z_tile,
                                              float* acc, int half_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // TF32 needs sm_80; the plan never picks tensor cores below it
#else
  namespace wmma = nvcuda::wmma;
  constexpr int TC = kChannelTile;
  const int warp = threadIdx.x / 32;
  const int tile = warp % kGramTiles, half = warp / kGramTiles;
  const int row = tile / (TC / kMmaTile) * kMmaTile, col = tile % (TC / kMmaTile) * kMmaTile;
  float* out = acc + half * half_stride + row * TC + col;
  wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaDepth, float> sum;
  wmma::load_matrix_sync(sum, out, TC, wmma::mem_row_major);
  constexpr int per_half = positions / kPositionHalves;
  for (int n = half * per_half; n < (half + 1) * per_half; n += kMmaDepth) {
    // A (rows of block a x positions) is weighted^T: column-major with stride kWeightedStride.
    mma_tf32_step<wmma::col_major>(sum, weighted + n * kWeightedStride + row, kWeightedStride,
                                   z_tile + n * z_stride + TC + col, z_stride);
  }
  wmma::store_matrix_sync(out, sum, TC, wmma::mem_row_major);
#endif
}

// features (B, C, H, W) T; masks (Bm, K, H, W) T; kernels (J, r, r) T.
// scratch (S, B, J, K, C, C) A: the block for channel blocks (a, b) writes rows of a and columns
// of b of its split's sum over positions of m_k^2 Z_j Z_j^T; lower blocks stay unwritten.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads)
    _masked_gram_fwd_kernel(const T* __restrict__ features, const T* __restrict__ masks,
                            const T* __restrict__ kernels, acc_t<T>* __restrict__ scratch,
                            const Dims d) {
  using A = acc_t<T>;
  using Tile = PositionTile<A>;
  constexpr int TC = kChannelTile;
  constexpr int z_stride = z_stride_of(kTensorCores);
  constexpr int halves = kTensorCores ? kPositionHalves : 1;
  static_assert(!kTensorCores || sizeof(A) == 4, "tensor cores take float tiles");

  // Which pair of channel blocks (a <= b): pairs are numbered row by row of the upper triangle.
  int a = 0, pair = blockIdx.x;
  while (pair >= d.channel_blocks - a) {
    pair -= d.channel_blocks - a;
    ++a;
  }
  const int b = a + pair;
  const int split = blockIdx.y;
  const int batch = blockIdx.z / (ceil_div(d.J, d.kernel_group) * d.mask_groups);
  const int group = blockIdx.z % (ceil_div(d.J, d.kernel_group) * d.mask_groups);
  const int j0 = group / d.mask_groups * d.kernel_group;
  const int k0 = group % d.mask_groups * d.mask_group;
  const int jn = min(d.kernel_group, d.J - j0);
  const int kn = min(d.mask_group, d.K - k0);

  const int h = d.r / 2;
  const int halo_rows = Tile::rows + 2 * h, halo_cols = Tile::cols + 2 * h;
  const int halo_size = halo_rows * halo_cols;
  const int taps_per_kernel = d.r * d.r;

  // Every region starts at a multiple of 8 elements: WMMA's tile pointers are 32-byte aligned.
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  const int half_stride = jn * kn * TC * TC;
  A* gram_acc = reinterpret_cast<A*>(shared_bytes);  // (halves, jn * kn, TC, TC)
  A* f_halo = gram_acc + halves * half_stride;       // (2 TC, halo_rows, halo_cols)
  A* z_tile = f_halo + 2 * TC * halo_size;           // (Tile::size, z_stride)
  A* weighted = z_tile + Tile::size * z_stride;      // tensor cores: (Tile::size, kWeightedStride)
  A* mask_sq = weighted + (kTensorCores ? Tile::size * kWeightedStride : 0);  // (kn, Tile::size)
  A* taps = mask_sq + kn * Tile::size;               // (jn, r, r)

  const int tid = threadIdx.x;
  for (int e = tid; e < halves * half_stride; e += kThreads) gram_acc[e] = A(0);
  for (int e = tid; e < jn * taps_per_kernel; e += kThreads)
    taps[e] = widen(kernels[static_cast<int64_t>(j0) * taps_per_kernel + e]);

  // This thread's 2 x 2 entries of every (TC x TC) Gram block: rows row0, row0 + 16 of block a,
  // columns col0, col0 + 16 of block b.
  const int row0 = tid / 16, col0 = tid % 16;

  const int64_t N = static_cast<int64_t>(d.H) * d.W;
  const T* f_batch = features + static_cast<int64_t>(batch) * d.C * N;
  const T* m_batch = masks + static_cast<int64_t>(d.Bm == 1 ? 0 : batch) * d.K * N;

  const int tile_begin = split * d.tiles_per_split;
  const int tile_end = min(tile_begin + d.tiles_per_split, d.tiles);
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int y0 = tile / d.tiles_x * Tile::rows, x0 = tile % d.tiles_x * Tile::cols;
    __syncthreads();  // the previous tile's readers of f_halo, z_tile and mask_sq are done
    for (int e = tid; e < 2 * TC * halo_size; e += kThreads) {
      const int local = e / halo_size, p = e % halo_size;
      const int c = local < TC ? a * TC + local : b * TC + local - TC;
      const int y = y0 - h + p / halo_cols, x = x0 - h + p % halo_cols;
      const bool inside = c < d.C && y >= 0 && y < d.H && x >= 0 && x < d.W;
      f_halo[e] = inside ? widen(f_batch[c * N + static_cast<int64_t>(y) * d.W + x]) : A(0);
    }
    for (int e = tid; e < kn * Tile::size; e += kThreads) {
      const int k = e / Tile::size, n = e % Tile::size;
      const int y = y0 + n / Tile::cols, x = x0 + n % Tile::cols;
      const bool inside = y < d.H && x < d.W;
      const A m =
          inside ? widen(m_batch[(k0 + k) * N + static_cast<int64_t>(y) * d.W + x]) : A(0);
      mask_sq[e] = m * m;  // 0 outside the image: those positions add nothing
    }
    for (int jl = 0; jl < jn; ++jl) {
      __syncthreads();  // f_halo and mask_sq loaded; the previous kernel's z_tile readers done
      const A* tap = taps + jl * taps_per_kernel;
      for (int e = tid; e < 2 * TC * Tile::size; e += kThreads) {
        const int local = e / Tile::size, n = e % Tile::size;
        const A* src = f_halo + local * halo_size + n / Tile::cols * halo_cols + n % Tile::cols;
        A z = A(0);
        for (int dy = 0; dy < d.r; ++dy)
          for (int dx = 0; dx < d.r; ++dx) z += tap[dy * d.r + dx] * src[dy * halo_cols + dx];
        z_tile[n * z_stride + local] = z;
      }
      __syncthreads();
      if constexpr (kTensorCores) {
        for (int kl = 0; kl < kn; ++kl) {
          for (int e = tid; e < Tile::size * TC; e += kThreads) {
            const int n = e / TC, c = e % TC;
            weighted[n * kWeightedStride + c] =
                mask_sq[kl * Tile::size + n] * z_tile[n * z_stride + c];
          }
          __syncthreads();
          gram_tile_mma<Tile::size, z_stride>(weighted, z_tile,
                                              gram_acc + (jl * kn + kl) * TC * TC, half_stride);
          __syncthreads();  // weighted is rewritten for the next mask
        }
      } else {
        for (int kl = 0; kl < kn; ++kl) {
          const A* w = mask_sq + kl * Tile::size;
          A s00 = A(0), s01 = A(0), s10 = A(0), s11 = A(0);
          for (int n = 0; n < Tile::size; ++n) {
            const A* zn = z_tile + n * z_stride;
            const A u0 = w[n] * zn[row0], u1 = w[n] * zn[row0 + 16];
            const A v0 = zn[TC + col0], v1 = zn[TC + col0 + 16];
            s00 += u0 * v0;
            s01 += u0 * v1;
            s10 += u1 * v0;
            s11 += u1 * v1;
          }
          A* acc = gram_acc + (jl * kn + kl) * TC * TC;
          acc[row0 * TC + col0] += s00;
          acc[row0 * TC + col0 + 16] += s01;
          acc[(row0 + 16) * TC + col0] += s10;
          acc[(row0 + 16) * TC + col0 + 16] += s11;
        }
      }
    }
  }

  __syncthreads();  // tensor cores: warps wrote the accumulators this thread reads
  for (int jl = 0; jl < jn; ++jl) {
    for (int kl = 0; kl < kn; ++kl) {
      const int64_t slice = ((static_cast<int64_t>(split) * d.B + batch) * d.J + j0 + jl) * d.K +
                            k0 + kl;
      A* out = scratch + slice * d.C * d.C;
      const A* acc = gram_acc + (jl * kn + kl) * TC * TC;
      for (int q = 0; q < 4; ++q) {
        const int local_row = row0 + 16 * (q / 2), local_col = col0 + 16 * (q % 2);
        const int row = a * TC + local_row, col = b * TC + local_col;
        A value = acc[local_row * TC + local_col];
        if (kTensorCores) value += acc[half_stride + local_row * TC + local_col];
        if (row < d.C && col < d.C) out[static_cast<int64_t>(row) * d.C + col] = value;
      }
    }
  }
}

// scratch (S, B, J, K, C, C) A as written above; inverse_mass (Bm, K) A; gram (B, J, K, C, C) A.
// Both halves of G read the same upper-triangle sum, so G is exactly symmetric.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    _masked_gram_reduce_kernel(const A* __restrict__ scratch, const A* __restrict__ inverse_mass,
                               A* __restrict__ gram, const Dims d) {
  const int64_t C = d.C;
  const int64_t total = static_cast<int64_t>(d.B) * d.J * d.K * C * C;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = e % C, row = e / C % C, slice = e / (C * C);  // slice: (batch, j, k)
    const int k = static_cast<int>(slice % d.K);
    const int batch = static_cast<int>(slice / (static_cast<int64_t>(d.J) * d.K));
    const int64_t upper = slice * C * C + min(row, col) * C + max(row, col);
    A sum = A(0);
    for (int s = 0; s < d.splits; ++s) sum += scratch[s * total + upper];
    gram[e] = sum * inverse_mass[(d.Bm == 1 ? 0 : batch) * d.K + k];
  }
}

// One input channel block's share of U_j on tensor cores: U_j += W S, with
// W = [m_1^2 Z_j | ... | m_K^2 Z_j] (rows, K TC) and S = [S_j1; ...; S_jK] (K TC, TC), each warp
// taking 16 x 16 tiles of U_j in turn.
__device__ __forceinline__ void u_tile_mma(const float* weighted, int weighted_stride,
                                           const float* sym, int K, float* u_halo, int u_stride,
                                           int rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // TF32 needs sm_80; the plan never picks tensor cores below it
#else
  namespace wmma = nvcuda::wmma;
  constexpr int TC = kChannelTile;
  constexpr int col_tiles = TC / kMmaTile;
  const int tiles = rows / kMmaTile * col_tiles;
  for (int tile = threadIdx.x / 32; tile < tiles; tile += kThreads / 32) {
    const int row = tile / col_tiles * kMmaTile, col = tile % col_tiles * kMmaTile;
    float* out = u_halo + row * u_stride + col;
    wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaDepth, float> sum;
    wmma::load_matrix_sync(sum, out, u_stride, wmma::mem_row_major);
    for (int c = 0; c < K * TC; c += kMmaDepth) {
      mma_tf32_step<wmma::row_major>(sum, weighted + row * weighted_stride + c, weighted_stride,
                                     sym + c * TC + col, TC);
    }
    wmma::store_matrix_sync(out, sum, u_stride, wmma::mem_row_major);
  }
#endif
}

// sym_grad (B, J, K, C, C) A: S_jk = (dG_jk + dG_jk^T) / n_k; features (B, C, H, W) T;
// masks (Bm, K, H, W) T; kernels (J, r, r) T; d_features (B, C, H, W) T.
// One block per SM on tensor cores (its shared memory allows no more): all registers may be used,
// and 128 would spill (ptxas, sm_90). Two per SM with SIMT, which fits in 128 registers.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, kTensorCores ? 1 : 2)
    _masked_gram_bwd_kernel(const acc_t<T>* __restrict__ sym_grad, const T* __restrict__ features,
                            const T* __restrict__ masks, const T* __restrict__ kernels,
                            T* __restrict__ d_features, const Dims d) {
  using A = acc_t<T>;
  using Tile = PositionTile<A>;
  constexpr int TC = kChannelTile;
  constexpr int u_stride = backward_u_stride(kTensorCores);
  constexpr int per_thread = Tile::size * TC / kThreads;  // dF values this thread owns
  static_assert(!kTensorCores || sizeof(A) == 4, "tensor cores take float tiles");
  static_assert(Tile::size * TC % kThreads == 0, "a block's dF tile must split evenly");

  const int tile = blockIdx.x, out_block = blockIdx.y, batch = blockIdx.z;
  const int y0 = tile / d.tiles_x * Tile::rows, x0 = tile % d.tiles_x * Tile::cols;
  const int h = d.r / 2;
  // U_j and Z_j live on the tile plus an h-halo, F on the tile plus a 2h-halo.
  const int u_rows = Tile::rows + 2 * h, u_cols = Tile::cols + 2 * h, u_size = u_rows * u_cols;
  const int f_rows = Tile::rows + 4 * h, f_cols = Tile::cols + 4 * h, f_size = f_rows * f_cols;
  const int taps_per_kernel = d.r * d.r;

  // SIMT: z_halo holds Z_j. Tensor cores: m_k^2 Z_j for every k side by side, on whole WMMA
  // tiles of rows; the rows past u_size hold garbage that reaches only U_j's unused rows.
  const int rows = backward_rows<A>(d.r, kTensorCores);
  const int z_stride = backward_z_stride(d.K, kTensorCores);
  // Every region starts at a multiple of 8 elements: WMMA's tile pointers are 32-byte aligned.
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  A* f_halo = reinterpret_cast<A*>(shared_bytes);  // (TC, f_rows, f_cols)
  A* z_halo = f_halo + TC * f_size;                 // (rows, z_stride)
  A* u_halo = z_halo + rows * z_stride;             // (rows, u_stride)
  A* sym = u_halo + rows * u_stride;                // (K, TC in, TC out)
  A* mask_sq = sym + d.K * TC * TC;                 // (K, u_size)
  A* taps = mask_sq + d.K * u_size;                 // (J, r, r)

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

    for (int in_block = 0; in_block < d.channel_blocks; ++in_block) {
      __syncthreads();  // the previous readers of f_halo, z_halo and sym are done
      for (int e = tid; e < TC * f_size; e += kThreads) {
        const int c = in_block * TC + e / f_size, p = e % f_size;
        const int y = y0 - 2 * h + p / f_cols, x = x0 - 2 * h + p % f_cols;
        const bool inside = c < d.C && y >= 0 && y < d.H && x >= 0 && x < d.W;
        f_halo[e] = inside ? widen(f_batch[c * N + static_cast<int64_t>(y) * d.W + x]) : A(0);
      }
      for (int e = tid; e < d.K * TC * TC; e += kThreads) {
        const int k = e / (TC * TC);
        const int c_in = in_block * TC + e / TC % TC, c_out = out_block * TC + e % TC;
        const int64_t slice = (static_cast<int64_t>(batch) * d.J + j) * d.K + k;
        sym[e] = c_in < d.C && c_out < d.C
                     ? sym_grad[(slice * d.C + c_in) * d.C + c_out]
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
        if (kTensorCores) {
          for (int k = 0; k < d.K; ++k)
            z_halo[p * z_stride + k * TC + local] = mask_sq[k * u_size + p] * z;
        } else {
          z_halo[p * z_stride + local] = z;
        }
      }
      __syncthreads();
      if constexpr (kTensorCores) {
        u_tile_mma(z_halo, z_stride, sym, d.K, u_halo, u_stride, rows);
      } else {
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

template <typename T>
Dims dims_of(const CastGramShape& s, const CastGramPlan& plan) {
  using Tile = PositionTile<acc_t<T>>;
  Dims d{};
  d.B = static_cast<int>(s.B);
  d.C = static_cast<int>(s.C);
  d.H = static_cast<int>(s.H);
  d.W = static_cast<int>(s.W);
  d.Bm = static_cast<int>(s.Bm);
  d.K = static_cast<int>(s.K);
  d.J = static_cast<int>(s.J);
  d.r = static_cast<int>(s.r);
  d.channel_blocks = ceil_div(d.C, kChannelTile);
  d.tiles_x = ceil_div(d.W, Tile::cols);
  d.tiles = ceil_div(d.H, Tile::rows) * d.tiles_x;
  d.splits = static_cast<int>(plan.splits);
  d.tiles_per_split = ceil_div(d.tiles, d.splits);
  d.kernel_group = static_cast<int>(plan.kernel_group);
  d.mask_group = static_cast<int>(plan.mask_group);
  d.mask_groups = ceil_div(d.K, d.mask_group);
  return d;
}

template <typename T>
CastGramPlan plan_for(const CastGramShape& s, bool tensor_cores, size_t max_smem) {
  using A = acc_t<T>;
  using Tile = PositionTile<A>;
  const int r = static_cast<int>(s.r), J = static_cast<int>(s.J), K = static_cast<int>(s.K);
  CastGramPlan plan{};
  plan.tensor_cores = tensor_cores;
  // Smaller groups of kernels and masks until the Gram accumulators fit in shared memory.
  int kernel_group = J, mask_group = K;
  auto forward_bytes = [&] {
    return sizeof(A) * static_cast<size_t>(
                           forward_smem_elements<A>(r, kernel_group, mask_group, tensor_cores));
  };
  while (forward_bytes() > max_smem && (kernel_group > 1 || mask_group > 1)) {
    if (kernel_group > 1)
      kernel_group = ceil_div(kernel_group, 2);
    else
      mask_group = ceil_div(mask_group, 2);
  }
  plan.kernel_group = kernel_group;
  plan.mask_group = mask_group;
  plan.forward_smem = forward_bytes();
  plan.backward_smem =
      sizeof(A) * static_cast<size_t>(backward_smem_elements<A>(r, K, J, tensor_cores));
  if (plan.forward_smem > max_smem || plan.backward_smem > max_smem)
    plan.unsupported =
        "the kernels' size r or the number of masks K is too large for the CUDA backend's "
        "shared-memory tiles; use backend='triton'";

  // Enough splits of the positions for kTargetBlocks blocks even at C = 64: two for each of an
  // H100's 132 SMs. A constant, not the device's SM count, so that the order of the sums, and
  // with it G to the last bit, is the same on every GPU and for every grouping of kernels and
  // masks.
  constexpr int64_t kTargetBlocks = 2 * 132;
  const int tiles =
      ceil_div(static_cast<int>(s.H), Tile::rows) * ceil_div(static_cast<int>(s.W), Tile::cols);
  const int nb = ceil_div(static_cast<int>(s.C), kChannelTile);
  const int64_t blocks_per_split = static_cast<int64_t>(nb) * (nb + 1) / 2 * s.B *
                                   ceil_div(J, kernel_group) * ceil_div(K, mask_group);
  const int64_t wanted = (kTargetBlocks + blocks_per_split - 1) / blocks_per_split;
  constexpr int kMaxSplits = 64;  // bounds the scratch at 64 copies of G
  const int splits = static_cast<int>(std::clamp<int64_t>(wanted, 1, std::min(tiles, kMaxSplits)));
  plan.splits = ceil_div(tiles, ceil_div(tiles, splits));  // no split left without a tile
  return plan;
}

template <typename T, bool kTensorCores>
cudaError_t launch_forward_kernel(const Dims& d, const CastGramPlan& plan, const void* features,
                                  const void* masks, const void* kernels, void* scratch,
                                  cudaStream_t stream) {
  const auto kernel = _masked_gram_fwd_kernel<T, kTensorCores>;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.forward_smem));
  if (err != cudaSuccess) return err;
  const int groups = ceil_div(d.J, d.kernel_group) * d.mask_groups;
  const dim3 grid(d.channel_blocks * (d.channel_blocks + 1) / 2, d.splits, d.B * groups);
  kernel<<<grid, kThreads, plan.forward_smem, stream>>>(
      static_cast<const T*>(features), static_cast<const T*>(masks),
      static_cast<const T*>(kernels), static_cast<acc_t<T>*>(scratch), d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward(const CastGramShape& s, const CastGramPlan& plan, const void* features,
                    const void* masks, const void* kernels, const void* inverse_mass,
                    void* scratch, void* gram, cudaStream_t stream) {
  using A = acc_t<T>;
  const Dims d = dims_of<T>(s, plan);
  cudaError_t err;
  if constexpr (sizeof(A) == 4) {
    err = plan.tensor_cores
              ? launch_forward_kernel<T, true>(d, plan, features, masks, kernels, scratch, stream)
              : launch_forward_kernel<T, false>(d, plan, features, masks, kernels, scratch, stream);
  } else {
    err = launch_forward_kernel<T, false>(d, plan, features, masks, kernels, scratch, stream);
  }
  if (err != cudaSuccess) return err;

  const int64_t total = static_cast<int64_t>(d.B) * d.J * d.K * d.C * d.C;
  const int64_t reduce_blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20);
  _masked_gram_reduce_kernel<A><<<static_cast<unsigned>(reduce_blocks), kThreads, 0, stream>>>(
      static_cast<const A*>(scratch), static_cast<const A*>(inverse_mass), static_cast<A*>(gram),
      d);
  return cudaGetLastError();
}

template <typename T, bool kTensorCores>
cudaError_t launch_backward_kernel(const CastGramShape& s, const CastGramPlan& plan,
                                   const void* sym_grad, const void* features, const void* masks,
                                   const void* kernels, void* d_features, cudaStream_t stream) {
  const Dims d = dims_of<T>(s, plan);
  const auto kernel = _masked_gram_bwd_kernel<T, kTensorCores>;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.backward_smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(d.tiles, d.channel_blocks, d.B);
  kernel<<<grid, kThreads, plan.backward_smem, stream>>>(
      static_cast<const acc_t<T>*>(sym_grad), static_cast<const T*>(features),
      static_cast<const T*>(masks), static_cast<const T*>(kernels), static_cast<T*>(d_features),
      d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const CastGramShape& s, const CastGramPlan& plan, const void* sym_grad,
                     const void* features, const void* masks, const void* kernels,
                     void* d_features, cudaStream_t stream) {
  if constexpr (sizeof(acc_t<T>) == 4) {
    if (plan.tensor_cores)
      return launch_backward_kernel<T, true>(s, plan, sym_grad, features, masks, kernels,
                                             d_features, stream);
  }
  return launch_backward_kernel<T, false>(s, plan, sym_grad, features, masks, kernels, d_features,
                                          stream);
}

}  // namespace

CastGramPlan cast_masked_gram_cuda_plan(CastDtype dtype, const CastGramShape& shape,
                                        bool allow_tf32, int compute_capability,
                                        size_t max_smem_per_block) {
  if (dtype == CastDtype::float64)
    return plan_for<double>(shape, false, max_smem_per_block);
  // Every other dtype accumulates in float and tiles alike.
  const bool tensor_cores =
      compute_capability >= 80 && (dtype != CastDtype::float32 || allow_tf32);
  const CastGramPlan plan = plan_for<float>(shape, tensor_cores, max_smem_per_block);
  // The tensor-core kernels need more shared memory (two halves of Gram accumulators, weighted
  // tiles): where they do not fit even with one kernel and one mask per forward block (99 KiB
  // on sm_86 / sm_89 at r = 3), the SIMT kernels still may.
  if (plan.unsupported != nullptr && tensor_cores)
    return plan_for<float>(shape, false, max_smem_per_block);
  return plan;
}

cudaError_t cast_masked_gram_cuda_forward(CastDtype dtype, const CastGramShape& shape,
                                          const CastGramPlan& plan, const void* features,
                                          const void* masks, const void* kernels,
                                          const void* inverse_mass, void* scratch, void* gram,
                                          cudaStream_t stream) {
  switch (dtype) {
    case CastDtype::float16:
      return forward<__half>(shape, plan, features, masks, kernels, inverse_mass, scratch, gram,
                             stream);
    case CastDtype::bfloat16:
      return forward<__nv_bfloat16>(shape, plan, features, masks, kernels, inverse_mass, scratch,
                                    gram, stream);
    case CastDtype::float32:
      return forward<float>(shape, plan, features, masks, kernels, inverse_mass, scratch, gram,
                            stream);
    case CastDtype::float64:
      return forward<double>(shape, plan, features, masks, kernels, inverse_mass, scratch, gram,
                             stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cast_masked_gram_cuda_backward(CastDtype dtype, const CastGramShape& shape,
                                           const CastGramPlan& plan, const void* sym_grad,
                                           const void* features, const void* masks,
                                           const void* kernels, void* d_features,
                                           cudaStream_t stream) {
  switch (dtype) {
    case CastDtype::float16:
      return backward<__half>(shape, plan, sym_grad, features, masks, kernels, d_features,
                              stream);
    case CastDtype::bfloat16:
      return backward<__nv_bfloat16>(shape, plan, sym_grad, features, masks, kernels, d_features,
                                     stream);
    case CastDtype::float32:
      return backward<float>(shape, plan, sym_grad, features, masks, kernels, d_features,
                             stream);
    case CastDtype::float64:
      return backward<double>(shape, plan, sym_grad, features, masks, kernels, d_features,
                              stream);
  }
  return cudaErrorInvalidValue;
}
