// A part of the CUDA kernels (masked_gram_cuda_kernels.cuh), compiled on its own so that the
// build compiles the parts in parallel: the bfloat16 backward.
#include "masked_gram_cuda_kernels.cuh"

template struct cast_cuda::Backward<__nv_bfloat16>;
template struct cast_cuda::SymmetricGrad<__nv_bfloat16>;
