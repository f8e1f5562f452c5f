// cast::_inverse_mask_mass (schema in module.cpp) on the CPU, its shape for torch.compile and
// its (absent) gradient:
// 1 / n_k (Bm, K) of masks (Bm, K, H, W) in the accumulation dtype, n_k = sum m_k^2 summed in
// float64 in mask_mass.h's order (the GPU's bits; any thread count), one read of the masks
// and no float64 copy of them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mask_mass.h"

namespace {

constexpr const char* kWhere = "cast::_inverse_mask_mass";

at::ScalarType accumulation_type(const at::Tensor& masks) {
  return masks.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_masks(const at::Tensor& masks) {
  TORCH_CHECK(masks.dim() == 4 && masks.size(1) > 0 && masks.size(2) * masks.size(3) > 0 &&
                  masks.is_floating_point(),
              kWhere, ": masks must be non-empty floating-point (Bm, K, H, W), got ",
              masks.sizes(), " ", masks.scalar_type());
}

// m * m rounded before it is added, as the GPU's __dmul_rn: where the target has FMAs (aarch64,
// or -march with FMA) the build's -ffp-contract=fast would fuse `sum += m * m` into one rounding,
// which changes float64 masks' bits (16- and 32-bit masks' squares are exact either way).
inline double rounded_square(double m) {
#ifdef __FP_FAST_FMA
  return std::fma(m, m, 0.0);  // one instruction there, and never fused with the add
#else
  return m * m;  // no FMA instructions to fuse into (the x86-64 baseline)
#endif
}

// The sum of value(i) for i < count in mask_mass.h's order, as the GPU's block of kMassLanes
// threads adds them: lane t adds values t, t + kMassLanes, ... from 0, then the lanes pairwise.
template <typename Value>
double lane_sum(int64_t count, Value value) {
  double lanes[kMassLanes];
  for (int t = 0; t < kMassLanes; ++t) {
    double sum = 0;
    for (int64_t i = t; i < count; i += kMassLanes) sum += value(i);
    lanes[t] = sum;
  }
  for (int half = kMassLanes / 2; half > 0; half /= 2)
    for (int t = 0; t < half; ++t) lanes[t] += lanes[t + half];
  return lanes[0];
}

template <typename T>
double chunk_sum(const T* mask, int64_t positions, int64_t chunk) {
  const int64_t first = chunk * kMassChunk;
  return lane_sum(std::min(kMassChunk, positions - first),
                  [&](int64_t i) { return rounded_square(static_cast<double>(mask[first + i])); });
}

at::Tensor inverse_mask_mass_cpu(const at::Tensor& masks_in) {
  check_masks(masks_in);
  TORCH_CHECK(masks_in.device().is_cpu(), kWhere, ": masks must be on the CPU");
  const at::Tensor masks = masks_in.contiguous();
  const int64_t planes = masks.size(0) * masks.size(1);
  const int64_t positions = masks.size(2) * masks.size(3);
  const int64_t chunks = cast_mass_chunks(positions);
  std::vector<double> partials(planes * chunks);
  at::Tensor inverse = at::empty({masks.size(0), masks.size(1)},
                                 masks.options().dtype(accumulation_type(masks)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), kWhere, [&] {
    const scalar_t* data = masks.const_data_ptr<scalar_t>();
    // one item a (mask, chunk): 8192 positions, a few µs; fewer than 16 stay on this thread
    at::parallel_for(0, planes * chunks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item)
        partials[item] = chunk_sum(data + item / chunks * positions, positions, item % chunks);
    });
  });
  AT_DISPATCH_FLOATING_TYPES(inverse.scalar_type(), kWhere, [&] {
    scalar_t* out = inverse.mutable_data_ptr<scalar_t>();
    for (int64_t plane = 0; plane < planes; ++plane) {
      const double* chunk_sums = partials.data() + plane * chunks;
      const double mass = lane_sum(chunks, [&](int64_t c) { return chunk_sums[c]; });
      out[plane] = static_cast<scalar_t>(mass > 0 ? 1.0 / mass : 0.0);
    }
  });
  return inverse;
}

// For torch.compile's fake tensors: the result's shape and dtype, nothing read; the sizes may
// be symbolic (a dynamic batch), so only the rank is checked here.
at::Tensor inverse_mask_mass_meta(const at::Tensor& masks) {
  TORCH_CHECK(masks.dim() == 4, kWhere, ": masks must be (Bm, K, H, W), got ", masks.dim(),
              " dimensions");
  return at::empty_symint({masks.sym_size(0), masks.sym_size(1)},
                          masks.options().dtype(accumulation_type(masks)));
}

}  // namespace

TORCH_LIBRARY_IMPL(cast, CPU, m) { m.impl("_inverse_mask_mass", &inverse_mask_mass_cpu); }
TORCH_LIBRARY_IMPL(cast, Meta, m) { m.impl("_inverse_mask_mass", &inverse_mask_mass_meta); }
// The masks are constants of the problem (SPEC §1): 1 / n_k never requires grad.
TORCH_LIBRARY_IMPL(cast, Autograd, m) {
  m.impl("_inverse_mask_mass", torch::CppFunction::makeFallthrough());
}
