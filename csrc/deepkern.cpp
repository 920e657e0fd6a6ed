// The deepkern extension module: every op schema, in one place, and the Python module that
// reports what was compiled in. Kernels register their implementations in their own files.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#ifndef DEEPKERN_VERSION
#define DEEPKERN_VERSION "unknown"
#endif
#ifndef DEEPKERN_CUDA_ARCHS
#define DEEPKERN_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(deepkern, m) {
  // momentum: Momentum ResNet steps in float and in exact fixed-point arithmetic.
  m.def("momentum_forward(Tensor x, Tensor v, Tensor f, float gamma) -> (Tensor, Tensor)");
  m.def(
      "momentum_inverse(Tensor x_next, Tensor v_next, Tensor f, float gamma)"
      " -> (Tensor, Tensor)");
  m.def(
      "momentum_backward(Tensor grad_x_next, Tensor grad_v_next, Tensor vjp, float gamma)"
      " -> (Tensor, Tensor)");
  m.def(
      "momentum_exact_forward(Tensor x, Tensor v, Tensor f, Tensor buffer, int numer,"
      " int denom, int frac_bits, int buffer_limbs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "momentum_exact_inverse(Tensor x_next, Tensor v_next, Tensor f, Tensor buffer,"
      " int numer, int denom, int frac_bits, int buffer_limbs)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "deepkern compiled kernels; the ops live under torch.ops.deepkern";
  module.def("build_info", [] {
    pybind11::dict info;
    info["version"] = DEEPKERN_VERSION;
#ifdef DEEPKERN_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = DEEPKERN_CUDA_VERSION;
#else
    info["cuda"] = false;
    info["cuda_version"] = pybind11::none();
#endif
    info["cuda_archs"] = std::string(DEEPKERN_CUDA_ARCHS);
    info["torch_version"] = DEEPKERN_TORCH_VERSION;
    return info;
  });
}
