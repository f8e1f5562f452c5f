// A part of the CUDA kernels (masked_gram_cuda_kernels.cuh), compiled on its own so that the
// build compiles the parts in parallel: the bfloat16 and float16 forward.
#include "masked_gram_cuda_kernels.cuh"

template struct cast_cuda::Forward<__nv_bfloat16>;
template struct cast_cuda::Forward<__half>;
