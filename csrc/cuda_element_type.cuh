// The CUDA parts' input types: the one dispatch from CastDtype (masked_gram_cuda.h) to the
// type T of the inputs, and the accumulation type A that each T takes (SPEC §1), shared by the
// Gram op's launchers (masked_gram_cuda.cu) and n_k's (mask_mass_cuda.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "masked_gram_cuda.h"

namespace cast_cuda {

// float for 16-bit and float32 input, double for float64.
template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulatorOf<T>::type;

template <typename T>
struct Element {
  using type = T;
};

// Calls f(Element<T>{}) with T the input type that dtype names: the one dispatch by type.
template <typename F>
auto with_element_type(CastDtype dtype, F&& f) {
  switch (dtype) {
    case CastDtype::float16:
      return f(Element<__half>{});
    case CastDtype::bfloat16:
      return f(Element<__nv_bfloat16>{});
    case CastDtype::float32:
      return f(Element<float>{});
    case CastDtype::float64:
      break;
  }
  return f(Element<double>{});
}

}  // namespace cast_cuda
