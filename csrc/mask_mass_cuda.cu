// cast::_inverse_mask_mass on the GPU (mask_mass_cuda.h): n_k = sum m_k^2 in float64 and
// 1 / n_k, in mask_mass.h's order, in two kernels and one read of the masks: a block per
// (chunk, mask) writes the chunk's sum, then a block per mask adds its chunks and inverts.
// Before it, the op's entry summed n_k in float64 bands: 10 kernel launches from Python per
// call, 22 at relu1_1 of a 1024^2 image (gpu-notes, "The op's host path").
#include "mask_mass_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_element_type.cuh"
#include "mask_mass.h"

namespace cast_mass {

__device__ __forceinline__ double widened(float x) { return x; }
__device__ __forceinline__ double widened(double x) { return x; }
__device__ __forceinline__ double widened(__half x) { return __half2float(x); }
__device__ __forceinline__ double widened(__nv_bfloat16 x) { return __bfloat162float(x); }

// The sum of the block's kMassLanes values, lane t's `sum` (t = threadIdx.x), added pairwise
// in mask_mass.h's order in the launch's dynamic shared memory (kMassLanes doubles). Only lane
// 0 gets it (it wrote it last, so reads it without a barrier); the other lanes get 0.
__device__ __forceinline__ double block_sum(double sum) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  double* lanes = reinterpret_cast<double*>(shared_bytes);
  const int lane = static_cast<int>(threadIdx.x);
  lanes[lane] = sum;
  for (int half = kMassLanes / 2; half > 0; half /= 2) {
    __syncthreads();
    if (lane < half) lanes[lane] += lanes[lane + half];
  }
  return lane == 0 ? lanes[0] : 0.0;
}

// grid (chunks, planes): partials[plane, chunk] = the chunk's sum of squares.
template <typename T>
__global__ void __launch_bounds__(kMassLanes)
    _mask_mass_chunk_kernel(const T* __restrict__ masks, int64_t positions,
                            double* __restrict__ partials) {
  const T* mask = masks + static_cast<int64_t>(blockIdx.y) * positions;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kMassChunk + threadIdx.x;
  double sum = 0;
#pragma unroll
  for (int i = 0; i < kMassPerLane; ++i) {
    const int64_t n = first + int64_t{i} * kMassLanes;
    if (n < positions) {
      const double m = widened(mask[n]);
      sum += __dmul_rn(m, m);  // not contracted into an FMA: the CPU's bits, also for float64
    }
  }
  const double chunk_sum = block_sum(sum);
  if (threadIdx.x == 0)
    partials[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = chunk_sum;
}

// grid (planes): inverse_mass[plane] = 1 / (the sum of its chunks), 0 for an empty mask.
template <typename A>
__global__ void __launch_bounds__(kMassLanes)
    _inverse_mask_mass_kernel(const double* __restrict__ partials, int64_t chunks,
                              A* __restrict__ inverse_mass) {
  const double* chunk_sums = partials + static_cast<int64_t>(blockIdx.x) * chunks;
  double sum = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kMassLanes) sum += chunk_sums[c];
  const double mass = block_sum(sum);
  if (threadIdx.x == 0) inverse_mass[blockIdx.x] = static_cast<A>(mass > 0 ? 1.0 / mass : 0.0);
}

template <typename T>
cudaError_t launch(int64_t planes, int64_t positions, const void* masks, double* partials,
                   void* inverse_mass, cudaStream_t stream) {
  using A = cast_cuda::acc_t<T>;
  const int64_t chunks = cast_mass_chunks(positions);
  if (planes < 1 || planes > 65535 || chunks < 1 || chunks > 0x7FFFFFFF)
    return cudaErrorInvalidValue;
  constexpr size_t kLaneBytes = kMassLanes * sizeof(double);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(planes));
  _mask_mass_chunk_kernel<T><<<grid, kMassLanes, kLaneBytes, stream>>>(
      static_cast<const T*>(masks), positions, partials);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  _inverse_mask_mass_kernel<A><<<static_cast<unsigned>(planes), kMassLanes, kLaneBytes, stream>>>(
      partials, chunks, static_cast<A*>(inverse_mass));
  return cudaGetLastError();
}

}  // namespace cast_mass

cudaError_t cast_inverse_mask_mass_cuda(CastDtype dtype, int64_t planes, int64_t positions,
                                        const void* masks, double* partials,
                                        void* inverse_mass, cudaStream_t stream) {
  return cast_cuda::with_element_type(dtype, [&](auto element) {
    using T = typename decltype(element)::type;
    return cast_mass::launch<T>(planes, positions, masks, partials, inverse_mass, stream);
  });
}
