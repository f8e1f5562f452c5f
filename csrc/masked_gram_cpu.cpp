// CPU kernels of the fused op (SPEC §1-2): cast::_masked_gram_fused and its backward.
//
// Layout. In NCHW a band of whole image rows is, per channel, one contiguous run of positions,
// so a tile of rows [y0, y1) is a (C x T) row-major matrix, T = (y1 - y0) * W. Per tile and
// kernel j we form, in per-thread scratch only,
//   Z        = P_j F on the tile                          (C x T)
//   weighted = the K copies m_k^2 * Z, rows ordered (c, k) (C*K x T)
// and hand the products to BLAS (ATen's addmm/mm, MKL here): a hand-written GEMM would not get
// near the machine's matmul peak, and these products are >90% of the work for C >= 64.
//   forward:  acc_j[(c, k), d] += weighted[(c, k), :] . Z[d, :]   (then G = acc / n_k)
//   backward: U_j = S_j @ weighted with S_j[d, (c, k)] = (dG_jk + dG_jk^T)[d, c] / n_k,
//             dF  = sum_j P_j^T U_j
// Nothing proportional to J*N*C or K*N*C is ever allocated.
//
// Threads: the work items are (image, band of rows); at::parallel_for gives each thread a
// contiguous run of them and BLAS runs single-threaded inside (MKL does so within an OpenMP
// parallel region), so the convolutions and masking between the products run on every core
// too, not only the products as they would with one band and MKL's own threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "masked_gram_contract.h"

namespace {

// Positions per row tile: products of (C*K x T) by (T x C) ran at 85-100% of one core's
// 2048^2 sgemm rate for T = 256..4096 on this machine (AMD EPYC, 2 MiB L2); more rows per tile
// also means fewer BLAS calls. Tiles are whole image rows, so T is rounded to a multiple of W.
constexpr int64_t kTilePositions = 1024;
// Channel block of the forward's upper triangle: block row a is multiplied with channels
// [a * kChannelBlock, C) only, so C = 512 does 36/64 of the full product's work.
constexpr int64_t kChannelBlock = 64;
// Output positions a convolution step keeps in registers: one AVX-512 register of float.
constexpr int64_t kLanes = 16;

// Row kernels are compiled once per instruction set and picked at load time: the build stays
// portable (x86-64 baseline is SSE2) while this machine gets AVX-512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CAST_VECTOR_CLONES
#endif
#define CAST_INLINE inline __attribute__((always_inline))

// The taps of one output row: each is a source row, already the right row for the tap, and
// the kernel row applied to it.
template <typename T>
struct RowTaps {
  std::vector<const T*> rows, weights;
  void clear() {
    rows.clear();
    weights.clear();
  }
  void add(const T* row, const T* weight) {
    rows.push_back(row);
    weights.push_back(weight);
  }
};

template <typename T>
CAST_INLINE T correlate_at_edge(int64_t taps, const T* const* rows, const T* const* weights,
                                int64_t r, int64_t W, int64_t x) {
  T sum = 0;
  for (int64_t i = 0; i < taps; ++i)
    for (int64_t dx = 0, xs = x - r / 2; dx < r; ++dx, ++xs)
      if (xs >= 0 && xs < W) sum += weights[i][dx] * rows[i][xs];
  return sum;
}

// Vectors * kLanes outputs from x on, all of whose taps lie inside the row: summed in
// registers (a GCC vector type, lowered to whatever the clone's instruction set has) and stored
// once. Plain loops were vectorised over the taps instead, with shuffles, and ran ~1.7x slower
// than one axpy per tap; several independent vectors hide the latency of the chained FMAs.
template <int64_t Vectors, typename T>
CAST_INLINE void correlate_lanes(int64_t taps, const T* const* rows, const T* const* weights,
                                 int64_t r, int64_t x, T* __restrict out) {
  typedef T Lanes __attribute__((vector_size(kLanes * sizeof(T))));
  Lanes acc[Vectors] = {};
  for (int64_t i = 0; i < taps; ++i) {
    const T* src = rows[i] + x - r / 2;
    for (int64_t dx = 0; dx < r; ++dx) {
      const T w = weights[i][dx];
      for (int64_t v = 0; v < Vectors; ++v) {
        Lanes in;
        std::memcpy(&in, src + dx + v * kLanes, sizeof in);
        acc[v] += w * in;
      }
    }
  }
  std::memcpy(out + x, acc, sizeof acc);
}

// out[x] = sum_i sum_dx weights[i][dx] * rows[i][x + dx - r/2] for x in [0, W), columns
// outside the row being zero.
template <typename T>
CAST_INLINE void correlate_row_impl(int64_t taps, const T* const* rows, const T* const* weights,
                                    int64_t r, int64_t W, T* __restrict out) {
  const int64_t h = r / 2;
  if (W - 2 * h < kLanes) {
    for (int64_t x = 0; x < W; ++x) out[x] = correlate_at_edge(taps, rows, weights, r, W, x);
    return;
  }
  for (int64_t x = 0; x < h; ++x) out[x] = correlate_at_edge(taps, rows, weights, r, W, x);
  int64_t x = h;
  for (; x + 4 * kLanes <= W - h; x += 4 * kLanes) correlate_lanes<4>(taps, rows, weights, r, x, out);
  for (; x + kLanes <= W - h; x += kLanes) correlate_lanes<1>(taps, rows, weights, r, x, out);
  // The last block overlaps the one before: outputs are stored, not accumulated.
  if (x < W - h) correlate_lanes<1>(taps, rows, weights, r, W - h - kLanes, out);
  for (x = W - h; x < W; ++x) out[x] = correlate_at_edge(taps, rows, weights, r, W, x);
}

template <typename T>
CAST_INLINE void scale_impl(int64_t n, const T* __restrict a, const T* __restrict x,
                            T* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] * x[i];
}

CAST_VECTOR_CLONES void correlate_row(const RowTaps<float>& t, int64_t r, int64_t W, float* out) {
  correlate_row_impl<float>(t.rows.size(), t.rows.data(), t.weights.data(), r, W, out);
}
CAST_VECTOR_CLONES void correlate_row(const RowTaps<double>& t, int64_t r, int64_t W,
                                      double* out) {
  correlate_row_impl<double>(t.rows.size(), t.rows.data(), t.weights.data(), r, W, out);
}
CAST_VECTOR_CLONES void scale(int64_t n, const float* a, const float* x, float* y) {
  scale_impl(n, a, x, y);
}
CAST_VECTOR_CLONES void scale(int64_t n, const double* a, const double* x, double* y) {
  scale_impl(n, a, x, y);
}

// Below this many multiply-adds a call runs on one thread: waking the other threads costs more
// (0.6 ms on one thread vs 4-8 ms on two for C = 64, 64 x 64, J = K = 1 on this loaded machine).
constexpr int64_t kParallelWork = int64_t(1) << 22;

struct Shape {
  int64_t B, C, H, W, Bm, K, J, r;
  int64_t N() const { return H * W; }
  int64_t tile_rows() const { return std::clamp<int64_t>(kTilePositions / W, 1, H); }
  bool small() const { return B * J * K * N() * C * C < kParallelWork; }
  // Bands of rows per image: enough items to keep every thread busy when B is small, but at most
  // N / C of them, so the forward's per-band accumulators (J*K*C^2 values each) never outgrow
  // the J*K*N*C values the op exists to avoid, however many threads there are.
  int64_t bands() const {
    if (small()) return 1;
    const int64_t threads = at::get_num_threads();
    const int64_t most = std::clamp<int64_t>(N() / C, 1, H);
    return std::clamp<int64_t>((threads + B - 1) / B, 1, most);
  }
  // at::parallel_for's grain: everything in one chunk (the calling thread) for small calls.
  int64_t grain(int64_t items) const { return small() ? std::max<int64_t>(items, 1) : 1; }
};

Shape shape_of(const at::Tensor& features, const at::Tensor& masks, const at::Tensor& kernels) {
  return {features.size(0), features.size(1), features.size(2), features.size(3),
          masks.size(0),    masks.size(1),    kernels.size(0),  kernels.size(1)};
}

// Per-thread scratch for rows [y0, y1) of one image and one kernel: Z and its weighted copies.
//
// Masks are often regions: a mask that is zero on a position adds nothing there, forward or
// backward, so each mask's products run over the positions it reaches only. A tile's mask is
// dense (every position: the stacked products below, no copy), empty (skipped) or sparse (its
// positions gathered into `z_k` and `weighted_k` first). Disjoint regions thus cost the products
// of one mask, not K of them; soft masks that are nowhere zero cost what they did.
template <typename T>
struct TileScratch {
  std::vector<T> z, weighted, mask_sq, z_k, weighted_k, product_k;
  std::vector<int64_t> reached;     // positions where m_k != 0, mask after mask
  std::vector<int64_t> reached_at;  // mask k's positions are reached[reached_at[k] .. [k + 1])
  bool all_dense = true;
  RowTaps<T> taps;
  TileScratch(const Shape& s, int64_t max_rows)
      : z(s.C * max_rows * s.W),
        weighted(s.C * s.K * max_rows * s.W),
        mask_sq(s.K * max_rows * s.W),
        z_k(s.C * max_rows * s.W),
        weighted_k(s.C * max_rows * s.W),
        product_k(s.C * max_rows * s.W) {}

  // m_k^2 on rows [y0, y1) and the positions each mask reaches there.
  void set_masks(const Shape& s, const T* masks, int64_t y0, int64_t y1) {
    const int64_t T_ = (y1 - y0) * s.W;
    reached.clear();
    reached_at.assign(1, 0);
    all_dense = true;
    for (int64_t k = 0; k < s.K; ++k) {
      const T* m = masks + k * s.N() + y0 * s.W;
      T* q = mask_sq.data() + k * T_;
      scale(T_, m, m, q);
      for (int64_t t = 0; t < T_; ++t)
        if (q[t] != T(0)) reached.push_back(t);
      reached_at.push_back(static_cast<int64_t>(reached.size()));
      all_dense = all_dense && reached_at[k + 1] - reached_at[k] == T_;
    }
  }
  int64_t reach(int64_t k) const { return reached_at[k + 1] - reached_at[k]; }

  // Fill z (C x T) with P_j F and weighted (C*K x T) with m_k^2 P_j F for every mask dense on
  // rows [y0, y1), the rows set_masks was last given.
  void fill(const Shape& s, const T* image, const T* p, int64_t y0, int64_t y1) {
    const int64_t W = s.W, T_ = (y1 - y0) * W, h = s.r / 2;
    for (int64_t c = 0; c < s.C; ++c) {
      const T* plane = image + c * s.N();
      for (int64_t y = y0; y < y1; ++y) {
        taps.clear();
        for (int64_t dy = 0; dy < s.r; ++dy) {
          const int64_t ys = y + dy - h;
          if (ys >= 0 && ys < s.H) taps.add(plane + ys * W, p + dy * s.r);
        }
        const int64_t at = (y - y0) * W;
        T* z_row = z.data() + c * T_ + at;
        correlate_row(taps, s.r, W, z_row);
        for (int64_t k = 0; k < s.K; ++k)
          if (reach(k) == T_)  // a sparse mask's copies are gathered later, from z
            scale(W, mask_sq.data() + k * T_ + at, z_row, weighted.data() + (c * s.K + k) * T_ + at);
      }
    }
  }

  // Mask k's operands as (C x n) matrices with row stride `ld`: in place when it is dense,
  // else its n positions gathered (z_k, weighted_k).
  struct Operands {
    const T *z, *weighted;
    int64_t n, ld_z, ld_weighted;
  };
  Operands operands(const Shape& s, int64_t k, int64_t T_) {
    const int64_t n = reach(k);
    if (n == T_) return {z.data(), weighted.data() + k * T_, T_, T_, s.K * T_};
    const int64_t* at = reached.data() + reached_at[k];
    for (int64_t c = 0; c < s.C; ++c) {
      const T* from = z.data() + c * T_;
      const T* q = mask_sq.data() + k * T_;
      T* to = z_k.data() + c * n;
      T* to_weighted = weighted_k.data() + c * n;
      for (int64_t i = 0; i < n; ++i) {
        to[i] = from[at[i]];
        to_weighted[i] = q[at[i]] * to[i];
      }
    }
    return {z_k.data(), weighted_k.data(), n, n, n};
  }
};

// A (rows x cols) row-major view with row stride `ld` of memory this code owns.
template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& features, const at::Tensor& masks,
                        const at::Tensor& inv_mass, const at::Tensor& kernels) {
  const Shape s = shape_of(features, masks, kernels);
  const int64_t C = s.C, K = s.K, J = s.J, CK = C * K;
  const int64_t bands = s.bands(), rows_per_band = (s.H + bands - 1) / bands;
  const int64_t tile_rows = s.tile_rows();
  const T* f = features.data_ptr<T>();
  const T* m = masks.data_ptr<T>();
  const T* p = kernels.data_ptr<T>();

  // acc[item][j] is (C*K x C), row (c, k), column d, filled where block(c) <= d.
  // One per (image, band): at most B * max(1, N / C) of them (see Shape::bands).
  std::vector<T> acc(s.B * bands * J * CK * C, T(0));

  at::parallel_for(0, s.B * bands, s.grain(s.B * bands), [&](int64_t begin, int64_t end) {
    TileScratch<T> tile(s, tile_rows);
    for (int64_t item = begin; item < end; ++item) {
      T* item_acc = acc.data() + item * J * CK * C;
      const int64_t b = item / bands, band = item % bands;
      const int64_t y_begin = band * rows_per_band, y_end = std::min(s.H, y_begin + rows_per_band);
      const T* image = f + b * C * s.N();
      const T* image_masks = m + (s.Bm == 1 ? 0 : b) * K * s.N();
      for (int64_t y0 = y_begin; y0 < y_end; y0 += tile_rows) {
        const int64_t y1 = std::min(y_end, y0 + tile_rows), T_ = (y1 - y0) * s.W;
        tile.set_masks(s, image_masks, y0, y1);
        for (int64_t j = 0; j < J; ++j) {
          tile.fill(s, image, p + j * s.r * s.r, y0, y1);
          T* acc_j = item_acc + j * CK * C;
          if (tile.all_dense) {  // every mask at once: rows (c, k) of one product
            for (int64_t a0 = 0; a0 < C; a0 += kChannelBlock) {
              const int64_t ca = std::min(kChannelBlock, C - a0);
              const at::Tensor lhs = matrix(tile.weighted.data() + a0 * K * T_, ca * K, T_, T_);
              const at::Tensor rhs = matrix(tile.z.data() + a0 * T_, C - a0, T_, T_);
              matrix(acc_j + a0 * K * C + a0, ca * K, C - a0, C).addmm_(lhs, rhs.t());
            }
            continue;
          }
          for (int64_t k = 0; k < K; ++k) {  // mask by mask, over the positions it reaches
            if (!tile.reach(k)) continue;
            const auto o = tile.operands(s, k, T_);
            for (int64_t a0 = 0; a0 < C; a0 += kChannelBlock) {
              const int64_t ca = std::min(kChannelBlock, C - a0);
              const at::Tensor lhs = matrix(o.weighted + a0 * o.ld_weighted, ca, o.n, o.ld_weighted);
              const at::Tensor rhs = matrix(o.z + a0 * o.ld_z, C - a0, o.n, o.ld_z);
              matrix(acc_j + (a0 * K + k) * C + a0, ca, C - a0, K * C).addmm_(lhs, rhs.t());
            }
          }
        }
      }
    }
  });

  // Sum the bands, divide by n_k, mirror the upper triangle.
  at::Tensor gram = at::empty({s.B, J, K, C, C}, features.options());
  const T* inv = inv_mass.data_ptr<T>();  // 1 / n_k (Bm, K), formed once in cast/ops.py
  T* g = gram.data_ptr<T>();
  at::parallel_for(0, s.B * J * K, s.grain(s.B * J * K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (J * K), j = (i / K) % J, k = i % K;
      const T scale_k = inv[(s.Bm == 1 ? 0 : b) * K + k];
      T* out = g + i * C * C;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t d = c; d < C; ++d) {
          T sum = 0;
          for (int64_t band = 0; band < bands; ++band)
            sum += acc[(((b * bands + band) * J + j) * CK + c * K + k) * C + d];
          out[c * C + d] = out[d * C + c] = T(sum * scale_k);
        }
      }
    }
  });
  return gram;
}

template <typename T>
at::Tensor backward_impl(const at::Tensor& sym_grad, const at::Tensor& features,
                         const at::Tensor& masks, const at::Tensor& kernels) {
  const Shape s = shape_of(features, masks, kernels);
  const int64_t C = s.C, K = s.K, J = s.J, CK = C * K, W = s.W, h = s.r / 2;
  const int64_t bands = s.bands(), rows_per_band = (s.H + bands - 1) / bands;
  const int64_t tile_rows = s.tile_rows();
  const T* f = features.data_ptr<T>();
  const T* m = masks.data_ptr<T>();
  const T* p = kernels.data_ptr<T>();

  // S[b][j] as (C x C*K): S[d, (c, k)] = S_bjk[d, c] (formed once in cast/ops.py as
  // (dG + dG^T) / n_k), so that U_j = S_j @ weighted is one product per tile.
  const at::Tensor sym_layout = sym_grad.permute({0, 1, 3, 4, 2}).contiguous();
  T* sym = sym_layout.data_ptr<T>();
  // ... and as given, S_bjk (C x C) one after the other, for the products mask by mask.
  const at::Tensor sym_contiguous = sym_grad.contiguous();
  const T* sym_jk = sym_contiguous.data_ptr<T>();

  // The 180-degree rotated kernels: P_j^T is cross-correlation with them.
  const at::Tensor rotated = kernels.flip({1, 2}).contiguous();
  const T* p_rot = rotated.data_ptr<T>();
  // Every row of dF is written once, by the tile that owns it.
  at::Tensor d_features = at::empty_like(features);
  T* df = d_features.data_ptr<T>();
  // U_j is kept for a sliding window of rows [tile start - h, tile end + h): each row of U is
  // computed once per band, and the adjoint convolution of a tile reads its neighbours.
  const int64_t window_rows = tile_rows + 2 * h, plane = window_rows * W;

  at::parallel_for(0, s.B * bands, s.grain(s.B * bands), [&](int64_t begin, int64_t end) {
    TileScratch<T> tile(s, window_rows);
    std::vector<T> window(J * C * plane);
    RowTaps<T> taps;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / bands, band = item % bands;
      const int64_t y_begin = band * rows_per_band, y_end = std::min(s.H, y_begin + rows_per_band);
      if (y_begin >= y_end) continue;
      const T* image = f + b * C * s.N();
      const T* image_masks = m + (s.Bm == 1 ? 0 : b) * K * s.N();
      T* image_df = df + b * C * s.N();
      // Window row w holds image row base + w; rows [lo, done) of U are in it.
      int64_t base = y_begin - h, lo = std::max<int64_t>(0, y_begin - h), done = lo;
      for (int64_t y0 = y_begin; y0 < y_end; y0 += tile_rows) {
        const int64_t y1 = std::min(y_end, y0 + tile_rows), need = std::min(s.H, y1 + h);
        if (done < need) tile.set_masks(s, image_masks, done, need);
        for (int64_t j = 0; j < J && done < need; ++j) {
          tile.fill(s, image, p + j * s.r * s.r, done, need);
          const int64_t T_ = (need - done) * W;
          T* u = window.data() + j * C * plane + (done - base) * W;
          at::Tensor u_new = matrix(u, C, T_, plane);
          if (tile.all_dense) {  // every mask at once: one product with the stacked S_j
            const at::Tensor lhs = matrix(sym + (b * J + j) * C * CK, C, CK, CK);
            at::mm_out(u_new, lhs, matrix(tile.weighted.data(), CK, T_, T_));
            continue;
          }
          u_new.zero_();
          for (int64_t k = 0; k < K; ++k) {  // mask by mask, over the positions it reaches
            if (!tile.reach(k)) continue;
            const auto o = tile.operands(s, k, T_);
            const at::Tensor s_jk = matrix(sym_jk + ((b * J + j) * K + k) * C * C, C, C, C);
            const at::Tensor w_k = matrix(o.weighted, C, o.n, o.ld_weighted);
            if (o.n == T_) {
              u_new.addmm_(s_jk, w_k);
              continue;
            }
            at::Tensor product = matrix(tile.product_k.data(), C, o.n, o.n);
            at::mm_out(product, s_jk, w_k);
            const int64_t* at = tile.reached.data() + tile.reached_at[k];
            for (int64_t d = 0; d < C; ++d) {
              const T* from = tile.product_k.data() + d * o.n;
              T* to = u + d * plane;
              for (int64_t i = 0; i < o.n; ++i) to[at[i]] += from[i];
            }
          }
        }
        // dF = sum_j P_j^T U_j on the tile's rows, all kernels at once.
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t y = y0; y < y1; ++y) {
            taps.clear();
            for (int64_t j = 0; j < J; ++j) {
              for (int64_t dy = 0; dy < s.r; ++dy) {
                const int64_t ys = y + dy - h;
                if (ys >= lo && ys < need)
                  taps.add(window.data() + (j * C + c) * plane + (ys - base) * W,
                           p_rot + (j * s.r + dy) * s.r);
              }
            }
            correlate_row(taps, s.r, W, image_df + c * s.N() + y * W);
          }
        }
        done = need;
        // Slide: keep rows [y1 - h, done) for the next tile, at the window's start.
        const int64_t next_base = y1 - h, keep_lo = std::max<int64_t>(lo, next_base);
        if (done > keep_lo && next_base != base) {
          for (int64_t jc = 0; jc < J * C; ++jc) {
            T* u = window.data() + jc * plane;
            std::memmove(u + (keep_lo - next_base) * W, u + (keep_lo - base) * W,
                         (done - keep_lo) * W * sizeof(T));
          }
        }
        base = next_base;
        lo = keep_lo;
      }
    }
  });
  return d_features;
}

constexpr const char* kWhere = "cast::_masked_gram_fused (cpu)";

// The registered op can be called directly: guard every memory read the kernels make.
void check_contract(const at::Tensor& features, const at::Tensor& masks,
                    const at::Tensor& kernels) {
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "cast::_masked_gram_fused on CPU takes float32 or float64, got ",
              features.scalar_type());
  for (const at::Tensor* t : {&features, &masks, &kernels}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() &&
                    t->scalar_type() == features.scalar_type(),
                kWhere, ": inputs must be contiguous CPU tensors of one dtype; call "
                "cast.masked_gram");
  }
  cast_check_shapes(features, masks, kernels, kWhere);
}

at::Tensor masked_gram_fused_cpu(const at::Tensor& features, const at::Tensor& masks,
                                 const at::Tensor& kernels, const at::Tensor& inv_mass,
                                 bool /*allow_tf32: GPU only*/) {
  check_contract(features, masks, kernels);
  // on the CPU the accumulation dtype is the features' (float32 or float64)
  cast_check_scale(inv_mass, features, features.scalar_type(), {masks.size(0), masks.size(1)},
                   "inv_mass", kWhere);
  return features.scalar_type() == at::kDouble
             ? forward_impl<double>(features, masks, inv_mass, kernels)
             : forward_impl<float>(features, masks, inv_mass, kernels);
}

at::Tensor masked_gram_fused_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                          const at::Tensor& masks, const at::Tensor& kernels,
                                          const at::Tensor& inv_mass,
                                          bool /*allow_tf32: GPU only*/) {
  check_contract(features, masks, kernels);
  const int64_t C = features.size(1), Bm = masks.size(0), K = masks.size(1);
  cast_check_scale(grad, features, features.scalar_type(),
                   {features.size(0), kernels.size(0), K, C, C}, "grad", kWhere);
  cast_check_scale(inv_mass, features, features.scalar_type(), {Bm, K}, "inv_mass", kWhere);
  // S = (dG + dG^T) / n_k whole, as reference.symmetric_grad forms it: a G-sized temporary,
  // which issue 9's memory target (a GPU's) does not count here.
  const at::Tensor sym_grad =
      (grad + grad.transpose(-1, -2)).mul_(inv_mass.view({Bm, 1, K, 1, 1}));
  return features.scalar_type() == at::kDouble
             ? backward_impl<double>(sym_grad, features, masks, kernels)
             : backward_impl<float>(sym_grad, features, masks, kernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(cast, CPU, m) {
  m.impl("_masked_gram_fused", &masked_gram_fused_cpu);
  m.impl("_masked_gram_fused_backward", &masked_gram_fused_backward_cpu);
}
