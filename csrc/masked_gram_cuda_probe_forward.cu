// A part of the CUDA kernels (masked_gram_cuda_kernels.cuh), compiled on its own so that the
// build compiles the parts in parallel: bench/gpu_probe.py's variants of the forward.
#include "masked_gram_cuda_kernels.cuh"

template struct cast_cuda::ForwardProbe<float>;
template struct cast_cuda::ForwardProbe<__nv_bfloat16>;
