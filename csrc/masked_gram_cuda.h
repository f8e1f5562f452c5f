// Plain C++ launchers of the CUDA kernels in masked_gram_cuda.cu (SPEC §1-2). No torch here:
// the .cu files build with nvcc alone; csrc/masked_gram_cuda_ops.cpp is the ATen glue.
//
// All pointers are device pointers of contiguous tensors. "T" is the features' dtype, "A" its
// accumulation dtype: double for float64, float otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

enum class CastDtype : int { float16, bfloat16, float32, float64 };

struct CastGramShape {
  int64_t B, C, H, W;  // features (B, C, H, W)
  int64_t Bm, K;       // masks (Bm, K, H, W), Bm in {1, B}
  int64_t J, r;        // kernels (J, r, r), r odd
};

// How a shape is cut into blocks; the caller allocates the forward scratch from it.
struct CastGramPlan {
  int64_t splits;        // S: the forward's partial sums over ranges of positions
  int64_t scratch_grams;  // copies of G in the forward's scratch: S - 1 (G holds split 0's)
  int64_t kernel_group;  // kernels whose Grams one forward block accumulates
  int64_t mask_group;    // masks whose Grams one forward block accumulates
  int64_t tile_rows;     // the forward's tiles of positions: tile_rows x 16
  int64_t backward_rows;  // the backward's on tensor cores: backward_rows x 16; 0: on CUDA cores
  // The tensor-core backward reads S_jk = (dG_jk + dG_jk^T) / n_k whole from a scratch formed
  // before it, (B, J, K, C, C) A, where a tenth of the op's inputs and outputs holds it: then
  // no block of dG is read twice (as itself and as a mirror). Else it forms S a block at a
  // time from dG.
  bool symmetric_scratch;
  // The tensor-core backward keeps F's halo of every input block in shared memory for the
  // whole item, so that each arrives once, not once for each kernel j; where J > 1 and it fits.
  bool backward_f_resident;
  // The tensor-core backward's copies of dG's mirrored blocks have a shared-memory region of
  // their own (a kernel's first step need not wait for U_j's readers), where it fits and S is
  // not whole in a scratch (then nothing is mirrored); else they borrow U_j's.
  bool backward_own_mirrors;
  bool tensor_cores;     // the matrix products on tensor cores
  size_t forward_smem;   // dynamic shared memory per block, bytes
  size_t backward_smem;
  const char* unsupported;  // nullptr, or why this shape does not fit the kernels
};

// compute_capability: major * 10 + minor. Tensor cores from sm_80 on: bf16 / fp16 products
// for 16-bit input, TF32 (rounded to nearest) for float32 if allow_tf32; float64 on CUDA cores.
CastGramPlan cast_masked_gram_cuda_plan(CastDtype dtype, const CastGramShape& shape,
                                        bool allow_tf32, int compute_capability,
                                        size_t max_smem_per_block);

// gram (B, J, K, C, C) A. inverse_mass (Bm, K) A: 1 / n_k, 0 where n_k == 0.
// scratch (plan.scratch_grams, B, J, K, C, C) A, uninitialised (none at one split).
cudaError_t cast_masked_gram_cuda_forward(
    CastDtype dtype, const CastGramShape& shape, const CastGramPlan& plan, const void* features,
    const void* masks, const void* kernels, const void* inverse_mass, void* scratch, void* gram,
    cudaStream_t stream);

// d_features (B, C, H, W) T. grad (B, J, K, C, C) A: dG. inverse_mass (Bm, K) A: 1 / n_k, 0
// where n_k == 0. symmetric (B, J, K, C, C) A, uninitialised, where plan.symmetric_scratch
// (S_jk = (dG_jk + dG_jk^T) / n_k goes there first), else unused (may be null: S is formed a
// block at a time on the GPU).
cudaError_t cast_masked_gram_cuda_backward(
    CastDtype dtype, const CastGramShape& shape, const CastGramPlan& plan, const void* grad,
    const void* inverse_mass, const void* features, const void* masks, const void* kernels,
    void* symmetric, void* d_features, cudaStream_t stream);
