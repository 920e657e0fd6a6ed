// The deepkern extension module: every op schema, in one place, and the Python module that
// reports what was compiled in. Kernels register their implementations in their own files.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "sde/sde_cpu_kernels.h"

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

  // sde: fused Euler-Maruyama simulation with counter-based normals.
  m.def(
      "sde_euler(Tensor x0, Tensor sigma, Tensor? matrix, Tensor? bias, Tensor? out_matrix,"
      " Tensor? out_bias, int drift_kind, int activation, float h, int steps, int first_step,"
      " int save_every, int seed, bool antithetic) -> Tensor");
  m.def("sde_normals(Tensor like, int steps, int first_step, int seed, bool antithetic) -> Tensor");
  m.def(
      "sde_monte_carlo(Tensor x0, Tensor sigma, Tensor? matrix, Tensor? bias, Tensor? out_matrix,"
      " Tensor? out_bias, int drift_kind, int activation, float h, int steps, int paths, int seed,"
      " bool antithetic, int functional, Tensor weights, float offset, bool log_coordinates)"
      " -> Tensor");

  // graph: deterministic CSR segment reductions and fused gather-reduce.
  m.def("segment_reduce(Tensor values, Tensor rowptr, int reduce) -> (Tensor out, Tensor arg)");
  m.def(
      "segment_reduce_backward(Tensor grad_out, Tensor rowptr, Tensor arg, int reduce, int rows)"
      " -> Tensor");
  m.def(
      "gather_reduce(Tensor x, Tensor rowptr, Tensor col, Tensor? weight, int reduce)"
      " -> (Tensor out, Tensor arg)");
  m.def(
      "gather_reduce_backward(Tensor grad_out, Tensor x, Tensor rowptr, Tensor col,"
      " Tensor? weight, Tensor arg, int reduce, bool x_grad, bool weight_grad)"
      " -> (Tensor grad_x, Tensor grad_weight)");

  //
  // graph: batched log-domain loopy belief propagation.
  m.def(
      "loopy_bp(Tensor unary, Tensor pairwise, Tensor src, Tensor dst, Tensor reverse,"
      " Tensor node_graph, int num_graphs, int mode, float damping, float tol, int max_iters)"
      " -> (Tensor log_marginals, Tensor log_messages, Tensor iterations, Tensor converged)");

  // verify: interval bounds of linear maps, linear relaxations of activations, and the
  // per-neuron inner maximum of the Lagrangian dual. kind: 0 relu, 1 sigmoid, 2 tanh.
  m.def(
      "interval_linear(Tensor lower, Tensor upper, Tensor weight, Tensor? bias)"
      " -> (Tensor out_lower, Tensor out_upper)");
  m.def(
      "activation_relaxation(Tensor lower, Tensor upper, int kind, Tensor? relu_lower_slope)"
      " -> (Tensor lower_slope, Tensor lower_bias, Tensor upper_slope, Tensor upper_bias)");
  m.def(
      "dual_activation_max(Tensor lower, Tensor upper, Tensor linear_coef, Tensor act_coef,"
      " int kind) -> (Tensor value, Tensor argmax)");
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
    info["cpu_capability"] = deepkern::sde::cpu_capability();
    return info;
  });
  module.def("cpu_capability", &deepkern::sde::cpu_capability,
             "the instruction-set tier of the CPU kernels in use: generic, avx2 or avx512");
  module.def("set_cpu_capability", &deepkern::sde::set_cpu_capability, pybind11::arg("name"),
             "use the CPU kernels of another tier (no higher than the processor supports); "
             "returns the previous tier");
}
