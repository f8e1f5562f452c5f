// A part of the CUDA kernels (masked_gram_cuda_kernels.cuh), compiled on its own so that the
// build compiles the parts in parallel: the float32 and float64 forward, and every input
// type's finishing kernel.
#include "masked_gram_cuda_kernels.cuh"

template struct cast_cuda::Forward<float>;
template struct cast_cuda::Forward<double>;
template struct cast_cuda::FinishForward<float>;
template struct cast_cuda::FinishForward<double>;
