// The compiled extension `cast._C`: imported only for the ops it registers.
// Each fused op's schema is written here once; csrc/masked_gram_cpu.cpp,
// csrc/mask_mass_cpu.cpp and csrc/masked_gram_cuda_ops.cpp register the CPU and CUDA
// implementations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

// Canonical inputs (cast/ops.py puts them in this form; each implementation checks the
// contract again before reading memory): features (B, C, H, W) contiguous, masks (Bm, K, H, W)
// with Bm in {1, B}, kernels (J, r, r), r odd, all of one dtype; inv_mass = 1 / n_k (Bm, K),
// formed once by cast/ops.py, and grad = dG (B, J, K, C, C), in the accumulation dtype. Each
// backward forms S = (dG + dG^T) / n_k its own way (the CUDA kernels a block at a time).
TORCH_LIBRARY_FRAGMENT(cast, m) {
  m.def(
      "_masked_gram_fused(Tensor features, Tensor masks, Tensor kernels, Tensor inv_mass, "
      "bool allow_tf32) -> Tensor");
  m.def(
      "_masked_gram_fused_backward(Tensor grad, Tensor features, Tensor masks, "
      "Tensor kernels, Tensor inv_mass, bool allow_tf32) -> Tensor");
  // 1 / n_k (Bm, K) of masks (Bm, K, H, W) in their accumulation dtype, n_k = sum m_k^2 in
  // float64 (csrc/mask_mass.h's order): cast/ops.py's n_k where the extension is built.
  m.def("_inverse_mask_mass(Tensor masks) -> Tensor");
}
