// The CUDA backend's plans and its entry points (masked_gram_cuda.h): which kernels and tiles a
// shape takes on a given card, and the dispatch by input type (cuda_element_type.cuh) to the
// launchers. The kernels are in masked_gram_cuda_kernels.cuh, compiled by direction and input
// type in the other masked_gram_cuda_*.cu files (the build runs them in parallel), none here.
#include "masked_gram_cuda.h"

#include <algorithm>
#include <cstdint>

#include "cuda_element_type.cuh"
#include "masked_gram_cuda_kernels.cuh"

namespace cast_cuda {
namespace {

template <typename T, bool kTensorCores, int kRows>
size_t forward_smem(int r) {
  return static_cast<size_t>(ForwardTile<T, kTensorCores, kRows>::smem_bytes(r));
}

// The forward's shared memory for a plan's tiles; 0 where no kernel has them.
template <typename T>
size_t forward_smem_of(bool tensor_cores, int rows, int r) {
  if constexpr (sizeof(T) <= 4) {
    if (tensor_cores && rows == kWideRows) return forward_smem<T, true, kWideRows>(r);
    if (tensor_cores && rows == kNarrowRows) return forward_smem<T, true, kNarrowRows>(r);
  }
  return !tensor_cores && rows == kSimtRows ? forward_smem<T, false, kSimtRows>(r) : 0;
}

// The forward's tile rows: the widest whose shared memory fits, 0 if none does.
template <typename T>
int forward_rows(bool tensor_cores, int r, size_t max_smem) {
  for (int rows : {kWideRows, kNarrowRows, kSimtRows}) {
    const size_t bytes = forward_smem_of<T>(tensor_cores, rows, r);
    if (bytes > 0 && bytes <= max_smem) return rows;
  }
  return 0;
}

template <typename T, int kRows>
size_t mma_backward_smem(int r, int K, int J, bool own_mirrors, int f_blocks) {
  using Tile = MmaBackwardTile<T, kRows>;
  return Tile::fits(r) ? static_cast<size_t>(Tile::bytes(r, K, J, own_mirrors, f_blocks)) : 0;
}

// The tensor-core backward's way through shared memory: its tile rows, 0 for the SIMT backward.
struct BackwardTiles {
  int rows;
  size_t smem;
  bool f_resident;
  bool own_mirrors;
};

// The widest tile rows whose shared memory fits; at those, F's halos kept for the item where
// that fits too (with more than one kernel j to share them), and dG's mirrors in a region of
// their own where that fits as well (a kernel's first step need not wait for them), else in
// U_j's; none of their own where S comes whole from a scratch (`mirrors` false: no mirror
// is read).
template <typename T>
BackwardTiles backward_tiles(bool tensor_cores, int r, int K, int J, int C, size_t max_smem,
                             bool mirrors) {
  if constexpr (sizeof(T) <= 4) {
    const int in_blocks = ceil_div(C, kInBlock);
    for (int rows : {kWideRows, kNarrowRows})
      for (bool resident : {J > 1, false})
        for (bool own : {mirrors, false}) {
          const int f_blocks = resident ? in_blocks : 1;
          const size_t bytes = rows == kWideRows
                                   ? mma_backward_smem<T, kWideRows>(r, K, J, own, f_blocks)
                                   : mma_backward_smem<T, kNarrowRows>(r, K, J, own, f_blocks);
          if (tensor_cores && bytes > 0 && bytes <= max_smem) return {rows, bytes, resident, own};
        }
  }
  return {0, static_cast<size_t>(SimtBackwardLayout<T>::bytes(r, K, J)), false, false};
}

constexpr int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
CastGramPlan plan_for(const CastGramShape& s, bool tensor_cores, size_t max_smem) {
  using A = acc_t<T>;
  const int r = static_cast<int>(s.r), J = static_cast<int>(s.J), K = static_cast<int>(s.K);
  CastGramPlan plan{};
  plan.tensor_cores = tensor_cores;
  plan.tile_rows = r / 2 <= kMaxHalo ? forward_rows<T>(tensor_cores, r, max_smem) : 0;
  const int max_kernels = Operands<T, false>::max_kernels;  // the same on tensor cores
  plan.mask_group = ceil_div(K, ceil_div(K, kMaxMasks));
  plan.forward_smem = forward_smem_of<T>(tensor_cores, static_cast<int>(plan.tile_rows), r);
  // Inputs and outputs, issue 9's measure for scratch: F, the masks, the kernels and dG in, G
  // and dF out.
  const int64_t gram_bytes = s.B * s.J * s.K * s.C * s.C * static_cast<int64_t>(sizeof(A));
  const int64_t io = ((2 * s.B * s.C + s.Bm * s.K) * s.H * s.W + s.J * s.r * s.r) *
                         static_cast<int64_t>(sizeof(T)) +
                     2 * gram_bytes;
  // S whole in a scratch of G's size where that is within a tenth of them (relu1_1 - relu3_1
  // of a 1024^2 image: 0.1-2.3 MiB; not at relu4_1, 9 MiB at J = K = 3): the backward's
  // steps then copy S's blocks alone, without dG's mirrors (a third of a step's copies at
  // C = 64, K = 3) or the pass that forms S.
  const bool symmetric = tensor_cores && sizeof(T) <= 4 && gram_bytes <= io / 10;
  const BackwardTiles backward =
      backward_tiles<T>(tensor_cores, r, K, J, static_cast<int>(s.C), max_smem, !symmetric);
  plan.backward_rows = backward.rows;
  plan.backward_smem = backward.smem;
  plan.backward_f_resident = backward.f_resident;
  plan.backward_own_mirrors = backward.own_mirrors;
  plan.symmetric_scratch = symmetric && plan.backward_rows > 0;
  if (plan.tile_rows == 0 || plan.backward_smem > max_smem)
    plan.unsupported =
        "the kernels' size r or the number of masks K is too large for the CUDA backend's "
        "shared-memory tiles; use backend='triton'";

  // The forward's splits of the positions and its groups of kernels. G holds split 0's sums,
  // a scratch the other splits', within a tenth of the op's inputs and outputs (nothing else
  // of the op's is live while the forward runs; the backward's S after it). Both are chosen
  // for whole waves of kWave blocks, one a block per SM (a forward block takes an SM's shared
  // memory or registers: 124-188 KiB, 225-242 registers a thread), minimising waves x tiles a
  // block x (kernels a block + 1/2),
  // the half a tile's loads, which each group of kernels repeats (the probe of effb4cf at
  // relu1_1: F's loads alone 0.3 ms of the forward's 1.34, partly hidden by cp.async); ties
  // to fewer blocks. kWave is an H100's and H200's SM count, a constant, not the device's:
  // the splits fix the order of the sums, and with it G to the last bit, on every GPU; the
  // groups do not change it.
  constexpr int64_t kWave = 132;
  // At most the splits for two blocks on each SM (the count before the cap: more would add
  // scratch, not parallelism) and kMaxSplits (131 copies of G at C = 64, J = K = 3: 18 MiB,
  // 3.5 % of inputs + outputs at 1024^2).
  constexpr int64_t kMaxSplits = 132;
  const int64_t rows = std::max<int64_t>(1, plan.tile_rows);
  const int64_t tiles = div_up(s.H, rows) * div_up(s.W, kTileCols);
  const int64_t nb = div_up(s.C, kPairBlock);
  const int64_t blocks_per_split = nb * (nb + 1) / 2 * s.B * div_up(K, plan.mask_group);
  const int64_t most = std::clamp<int64_t>(
      std::min(div_up(2 * kWave, blocks_per_split), 1 + io / 10 / gram_bytes), 1,
      std::min(tiles, kMaxSplits));
  int64_t best_cost = -1, best_blocks = 0;
  for (int64_t wanted = 1; wanted <= most; ++wanted) {
    const int64_t splits = div_up(tiles, div_up(tiles, wanted));  // no split left without a tile
    for (int64_t groups = div_up(J, max_kernels); groups <= J; ++groups) {
      const int64_t group = div_up(J, groups);  // as even as the count allows
      const int64_t blocks = blocks_per_split * splits * div_up(J, group);
      const int64_t cost = div_up(blocks, kWave) * div_up(tiles, splits) * (2 * group + 1);
      if (best_cost < 0 || cost < best_cost || (cost == best_cost && blocks < best_blocks)) {
        best_cost = cost, best_blocks = blocks;
        plan.splits = splits;
        plan.kernel_group = group;
      }
    }
  }
  plan.scratch_grams = plan.splits - 1;
  return plan;
}

}  // namespace
}  // namespace cast_cuda

CastGramPlan cast_masked_gram_cuda_plan(CastDtype dtype, const CastGramShape& shape,
                                        bool allow_tf32, int compute_capability,
                                        size_t max_smem_per_block) {
  // Tensor cores from sm_80 on: bf16 and fp16 MMAs for 16-bit input, TF32 for float32 if
  // allow_tf32; float64 is SIMT.
  const bool tensor_cores = compute_capability >= 80 && dtype != CastDtype::float64 &&
                            (dtype != CastDtype::float32 || allow_tf32);
  auto plan = [&](bool cores) {
    return cast_cuda::with_element_type(dtype, [&](auto element) {
      using T = typename decltype(element)::type;
      return cast_cuda::plan_for<T>(shape, cores, max_smem_per_block);
    });
  };
  const CastGramPlan chosen = plan(tensor_cores);
  // Where the tensor-core tiles do not fit (99 KiB on sm_86 / sm_89 at r = 3), the SIMT ones,
  // smaller, still may.
  if (chosen.unsupported != nullptr && tensor_cores) return plan(false);
  return chosen;
}

cudaError_t cast_masked_gram_cuda_forward(CastDtype dtype, const CastGramShape& shape,
                                          const CastGramPlan& plan, const void* features,
                                          const void* masks, const void* kernels,
                                          const void* inverse_mass, void* scratch, void* gram,
                                          cudaStream_t stream) {
  return cast_cuda::with_element_type(dtype, [&](auto element) {
    using T = typename decltype(element)::type;
    return cast_cuda::Forward<T>::launch(shape, plan, features, masks, kernels, inverse_mass,
                                         scratch, gram, stream);
  });
}

cudaError_t cast_masked_gram_cuda_backward(CastDtype dtype, const CastGramShape& shape,
                                           const CastGramPlan& plan, const void* grad,
                                           const void* inverse_mass, const void* features,
                                           const void* masks, const void* kernels,
                                           void* symmetric, void* d_features,
                                           cudaStream_t stream) {
  return cast_cuda::with_element_type(dtype, [&](auto element) {
    using T = typename decltype(element)::type;
    return cast_cuda::Backward<T>::launch(shape, plan, grad, inverse_mass, features, masks,
                                          kernels, symmetric, d_features, stream);
  });
}
