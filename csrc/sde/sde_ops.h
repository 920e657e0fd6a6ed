// Host side of the sde family: input checking shared by the CPU and CUDA wrappers, and the
// translation of checked tensors into the raw Problem that the per-path arithmetic reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <vector>

#include "sde/sde.h"

namespace deepkern::sde {

// The checked, contiguous inputs of one simulation call.
struct Inputs {
  at::Tensor x0;  // [paths or starts, dim]
  at::Tensor sigma;
  at::Tensor matrix, bias, out_matrix, out_bias;  // undefined where the drift has none
  int64_t dim = 0;
  int64_t hidden = 0;
  int64_t drift_kind = 0;
  int64_t activation = 0;
  int64_t sigma_kind = 0;
};

// Checks every argument (shapes, dtypes, devices, finiteness, Sigma lower-triangular) and makes
// the tensors contiguous. Reading values for the finiteness and triangularity checks costs one
// host synchronisation on CUDA.
Inputs check_inputs(const at::Tensor& x0, const at::Tensor& sigma,
                    const c10::optional<at::Tensor>& matrix, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& out_matrix,
                    const c10::optional<at::Tensor>& out_bias, int64_t drift_kind,
                    int64_t activation, double h);
void check_steps(int64_t steps, int64_t first_step, int64_t save_every);
void check_functional(const Inputs& in, int64_t kind, const at::Tensor& weights, double offset,
                      int64_t paths, bool antithetic);

// [starts, 3]: mean, unbiased variance and standard error of the mean per start point, from
// per-chunk moments merged chunk by chunk in order.
at::Tensor finish_moments(const std::vector<Moments>& partial, int64_t starts, int64_t chunks,
                          at::ScalarType dtype);

template <typename T>
Problem<T> make_problem(const Inputs& in, double h, int64_t seed, bool antithetic) {
  Problem<T> p{};
  p.dim = in.dim;
  p.hidden = in.hidden;
  p.drift_kind = in.drift_kind;
  p.activation = in.activation;
  p.sigma_kind = in.sigma_kind;
  p.sigma = in.sigma.const_data_ptr<T>();
  p.matrix = in.matrix.defined() ? in.matrix.const_data_ptr<T>() : nullptr;
  p.bias = in.bias.defined() ? in.bias.const_data_ptr<T>() : nullptr;
  p.out_matrix = in.out_matrix.defined() ? in.out_matrix.const_data_ptr<T>() : nullptr;
  p.out_bias = in.out_bias.defined() ? in.out_bias.const_data_ptr<T>() : nullptr;
  p.h = static_cast<T>(h);
  p.sqrt_h = static_cast<T>(std::sqrt(h));
  p.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  p.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  p.antithetic = antithetic;
  return p;
}

}  // namespace deepkern::sde
