// A part of the CUDA kernels (masked_gram_cuda_kernels.cuh), compiled on its own so that the
// build compiles the parts in parallel: the float16 backward.
#include "masked_gram_cuda_kernels.cuh"

template struct cast_cuda::Backward<__half>;
template struct cast_cuda::SymmetricGrad<__half>;
