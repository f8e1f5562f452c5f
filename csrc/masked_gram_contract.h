// The contract of the compiled ops (schemas in module.cpp), checked by each implementation
// before it reads memory: the registered ops can be called directly, without cast/ops.py.
// Only metadata is read. Devices and dtypes of the inputs are each implementation's own check.
#pragma once

#include <ATen/ATen.h>

// features (B, C, H, W) non-empty, masks (Bm, K, H, W) with Bm in {1, B} and K >= 1 on the
// features' grid, kernels (J, r, r) with J >= 1 and r odd.
inline void cast_check_shapes(const at::Tensor& features, const at::Tensor& masks,
                              const at::Tensor& kernels, const char* where) {
  TORCH_CHECK(features.dim() == 4 && masks.dim() == 4 && kernels.dim() == 3 &&
                  features.numel() > 0 && masks.size(1) > 0 && kernels.size(0) > 0,
              where, ": expected non-empty (B,C,H,W), (Bm,K,H,W), (J,r,r)");
  TORCH_CHECK(masks.size(0) == 1 || masks.size(0) == features.size(0), where,
              ": masks' batch must be 1 or B");
  TORCH_CHECK(masks.size(2) == features.size(2) && masks.size(3) == features.size(3), where,
              ": masks must be on the features' grid");
  TORCH_CHECK(kernels.size(1) == kernels.size(2) && kernels.size(1) % 2 == 1, where,
              ": kernels must be square with an odd size");
}

// inv_mass (Bm, K), formed once by cast/ops.py, or grad (B, J, K, C, C): contiguous, in the
// accumulation dtype, on the features' device.
inline void cast_check_scale(const at::Tensor& scale, const at::Tensor& features,
                             at::ScalarType accumulation, at::IntArrayRef shape,
                             const char* what, const char* where) {
  TORCH_CHECK(scale.device() == features.device() && scale.is_contiguous() &&
                  scale.scalar_type() == accumulation && scale.sizes() == shape,
              where, ": ", what, " must be a contiguous ", shape, " ", accumulation,
              " tensor on the features' device, got ", scale.sizes(), " ", scale.scalar_type());
}
