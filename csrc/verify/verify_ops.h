// Host side of the verify family: input checks and the steps the CPU and CUDA wrappers share,
// and the host entry points, one per schema in deepkern.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace deepkern::verify {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// interval_linear's inputs, contiguous, with the leading dimensions folded: [rows, n].
struct IntervalInputs {
  at::Tensor lower, upper;         // [rows, n]
  at::Tensor weight;               // [m, n]
  at::Tensor bias;                 // [m], or undefined
  std::vector<int64_t> out_sizes;  // [..., m]
};

// activation_relaxation's inputs, contiguous and flat.
struct RelaxationInputs {
  at::Tensor lower, upper;
  at::Tensor alpha;  // relu_lower_slope, or undefined
};

// dual_activation_max's inputs, broadcast to one shape and made contiguous: a broadcast input
// is copied to the full size once, here.
struct DualInputs {
  at::Tensor lower, upper, linear, act;
  std::vector<int64_t> sizes;
};

// Shape, dtype, device and code checks; the values are checked in the kernels (see Status in
// verify.h) and reported by raise_on_status.
IntervalInputs check_interval_inputs(const at::Tensor& lower, const at::Tensor& upper,
                                     const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias);
RelaxationInputs check_relaxation_inputs(const at::Tensor& lower, const at::Tensor& upper,
                                         int64_t kind,
                                         const c10::optional<at::Tensor>& relu_lower_slope);
DualInputs check_dual_inputs(const at::Tensor& lower, const at::Tensor& upper,
                             const at::Tensor& linear_coef, const at::Tensor& act_coef,
                             int64_t kind);

// Raises when a kernel's status has a bit set: the message names the argument and the first
// bad entry (found with tensor operations: this path may be slow, it runs once before raising).
// Undefined tensors are not involved.
void raise_on_status(int status, const at::Tensor& lower, const at::Tensor& upper,
                     const at::Tensor& alpha = at::Tensor(),
                     const at::Tensor& linear_coef = at::Tensor(),
                     const at::Tensor& act_coef = at::Tensor());

// The two matrix products of interval_linear, on any device: center @ weight.T and
// radius @ |weight|.T, both [rows, m].
TensorPair interval_products(const at::Tensor& center, const at::Tensor& radius,
                             const at::Tensor& weight);

TensorPair interval_linear_cpu(const at::Tensor& lower, const at::Tensor& upper,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
TensorQuad activation_relaxation_cpu(const at::Tensor& lower, const at::Tensor& upper, int64_t kind,
                                     const c10::optional<at::Tensor>& relu_lower_slope);
TensorPair dual_activation_max_cpu(const at::Tensor& lower, const at::Tensor& upper,
                                   const at::Tensor& linear_coef, const at::Tensor& act_coef,
                                   int64_t kind);

}  // namespace deepkern::verify
