// The plain launcher of csrc/mask_mass_cuda.cu (torch-free, as masked_gram_cuda.h): 1 / n_k
// of the masks in mask_mass.h's order. csrc/masked_gram_cuda_ops.cpp is its ATen glue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "masked_gram_cuda.h"

// masks (planes, positions) of `dtype`, contiguous: planes = Bm * K masks, at most 65535.
// partials: planes * cast_mass_chunks(positions) doubles of scratch, uninitialised.
// inverse_mass (planes) in the accumulation dtype (double for float64 masks, else float).
// Two kernels on `stream`: the chunks' sums, then each mask's sum and its inverse.
cudaError_t cast_inverse_mask_mass_cuda(CastDtype dtype, int64_t planes, int64_t positions,
                                        const void* masks, double* partials,
                                        void* inverse_mass, cudaStream_t stream);
