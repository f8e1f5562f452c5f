// The CUDA implementations of cast::_masked_gram_fused and cast::_masked_gram_fused_backward
// (schemas in module.cpp): ATen glue around the plain launchers of masked_gram_cuda.cu.
// Inputs are canonical (cast/ops.py checks them for the user); the checks here only guard the
// contract between the Python op and these kernels.
// c10/cuda rather than ATen/cuda/CUDAContext.h: the stream and guard are all we need, and the
// lighter headers keep cuBLAS and cuSPARSE headers out of the build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mask_mass.h"
#include "mask_mass_cuda.h"
#include "masked_gram_contract.h"
#include "masked_gram_cuda.h"

namespace {

constexpr const char* kWhere = "cast::_masked_gram_fused (cuda)";

CastDtype cast_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return CastDtype::float16;
    case at::kBFloat16:
      return CastDtype::bfloat16;
    case at::kFloat:
      return CastDtype::float32;
    case at::kDouble:
      return CastDtype::float64;
    default:
      TORCH_CHECK(false, "cast::_masked_gram_fused (cuda): unexpected dtype ", t.scalar_type());
  }
}

at::ScalarType accumulation_type(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_contract(const at::Tensor& features, const at::Tensor& masks,
                    const at::Tensor& kernels) {
  for (const at::Tensor* t : {&features, &masks, &kernels}) {
    TORCH_CHECK(t->is_cuda() && t->device() == features.device(), kWhere,
                ": all inputs must be on one CUDA device");
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == features.scalar_type(), kWhere,
                ": inputs must be contiguous and of one dtype");
  }
  cast_check_shapes(features, masks, kernels, kWhere);
}

CastGramShape shape_of(const at::Tensor& features, const at::Tensor& masks,
                       const at::Tensor& kernels) {
  return CastGramShape{features.size(0), features.size(1), features.size(2), features.size(3),
                       masks.size(0),    masks.size(1),    kernels.size(0),  kernels.size(1)};
}

// Call under the features' device guard.
CastGramPlan plan_for(CastDtype dtype, const CastGramShape& shape, bool allow_tf32) {
  const int device = c10::cuda::current_device();
  int major = 0, minor = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const CastGramPlan plan =
      cast_masked_gram_cuda_plan(dtype, shape, allow_tf32, 10 * major + minor, max_smem);
  TORCH_CHECK(plan.unsupported == nullptr, "cast.masked_gram: backend 'cuda': ",
              plan.unsupported);
  return plan;
}

// allow_tf32 lets the forward's Gram products of float32 input run on TF32 tensor cores.
at::Tensor masked_gram_fused_cuda(const at::Tensor& features, const at::Tensor& masks,
                                  const at::Tensor& kernels, const at::Tensor& inv,
                                  bool allow_tf32) {
  check_contract(features, masks, kernels);
  cast_check_scale(inv, features, accumulation_type(features), {masks.size(0), masks.size(1)},
                   "inv_mass", kWhere);
  const c10::cuda::CUDAGuard guard(features.device());
  const CastDtype dtype = cast_dtype(features);
  const CastGramShape shape = shape_of(features, masks, kernels);
  const CastGramPlan plan = plan_for(dtype, shape, allow_tf32);
  const auto options = features.options().dtype(accumulation_type(features));

  at::Tensor scratch =
      at::empty({plan.scratch_grams, shape.B, shape.J, shape.K, shape.C, shape.C}, options);
  at::Tensor gram = at::empty({shape.B, shape.J, shape.K, shape.C, shape.C}, options);
  C10_CUDA_CHECK(cast_masked_gram_cuda_forward(
      dtype, shape, plan, features.const_data_ptr(), masks.const_data_ptr(),
      kernels.const_data_ptr(), inv.const_data_ptr(), scratch.mutable_data_ptr(),
      gram.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gram;
}

// The kernels form S = (dG + dG^T) / n_k whole in a G-sized scratch where a tenth of inputs +
// outputs holds it (plan.symmetric_scratch), else a block at a time.
at::Tensor masked_gram_fused_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                           const at::Tensor& masks, const at::Tensor& kernels,
                                           const at::Tensor& inv, bool allow_tf32) {
  check_contract(features, masks, kernels);
  const int64_t C = features.size(1);
  cast_check_scale(grad, features, accumulation_type(features),
                   {features.size(0), kernels.size(0), masks.size(1), C, C}, "grad", kWhere);
  cast_check_scale(inv, features, accumulation_type(features), {masks.size(0), masks.size(1)},
                   "inv_mass", kWhere);
  const c10::cuda::CUDAGuard guard(features.device());
  const CastDtype dtype = cast_dtype(features);
  const CastGramShape shape = shape_of(features, masks, kernels);
  const CastGramPlan plan = plan_for(dtype, shape, allow_tf32);

  at::Tensor d_features = at::empty_like(features);
  at::Tensor symmetric = plan.symmetric_scratch ? at::empty_like(grad) : at::Tensor();
  C10_CUDA_CHECK(cast_masked_gram_cuda_backward(
      dtype, shape, plan, grad.const_data_ptr(), inv.const_data_ptr(), features.const_data_ptr(),
      masks.const_data_ptr(), kernels.const_data_ptr(),
      plan.symmetric_scratch ? symmetric.mutable_data_ptr() : nullptr,
      d_features.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d_features;
}

// cast::_inverse_mask_mass: 1 / n_k (Bm, K) in the accumulation dtype, n_k summed in float64
// by csrc/mask_mass_cuda.cu (two kernels, a float64 partial sum per chunk of 8192 positions).
at::Tensor inverse_mask_mass_cuda(const at::Tensor& masks_in) {
  constexpr const char* where = "cast::_inverse_mask_mass (cuda)";
  // as the CPU op's check (mask_mass_cpu.cpp), and it takes any strides as that one does
  TORCH_CHECK(masks_in.dim() == 4 && masks_in.size(1) > 0 &&
                  masks_in.size(2) * masks_in.size(3) > 0 && masks_in.is_floating_point(),
              where, ": masks must be non-empty floating-point (Bm, K, H, W), got ",
              masks_in.sizes(), " ", masks_in.scalar_type());
  TORCH_CHECK(masks_in.is_cuda(), where, ": masks must be on a CUDA device, got ",
              masks_in.device());
  const at::Tensor masks = masks_in.contiguous();
  const int64_t planes = masks.size(0) * masks.size(1);
  const int64_t positions = masks.size(2) * masks.size(3);
  TORCH_CHECK(planes <= 65535, where, ": at most 65535 masks (Bm * K), got ", planes);
  const c10::cuda::CUDAGuard guard(masks.device());
  at::Tensor partials =
      at::empty({planes * cast_mass_chunks(positions)}, masks.options().dtype(at::kDouble));
  at::Tensor inverse = at::empty({masks.size(0), masks.size(1)},
                                 masks.options().dtype(accumulation_type(masks)));
  C10_CUDA_CHECK(cast_inverse_mask_mass_cuda(
      cast_dtype(masks), planes, positions, masks.const_data_ptr(),
      partials.mutable_data_ptr<double>(), inverse.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return inverse;
}

}  // namespace

TORCH_LIBRARY_IMPL(cast, CUDA, m) {
  m.impl("_masked_gram_fused", &masked_gram_fused_cuda);
  m.impl("_masked_gram_fused_backward", &masked_gram_fused_backward_cuda);
  m.impl("_inverse_mask_mass", &inverse_mask_mass_cuda);
}
