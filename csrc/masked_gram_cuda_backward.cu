// A part of the CUDA kernels (masked_gram_cuda_kernels.cuh), compiled on its own so that the
// build compiles the parts in parallel: the float32 and float64 backward.
#include "masked_gram_cuda_kernels.cuh"

template struct cast_cuda::Backward<float>;
template struct cast_cuda::Backward<double>;
template struct cast_cuda::SymmetricGrad<float>;
