// Host entry points of the momentum family, one per schema in deepkern.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace deepkern::momentum {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using ExactResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks shared by the CPU and CUDA wrappers (momentum_checks.cpp).
void check_step_inputs(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name, const at::Tensor& c, const char* c_name, double gamma);
void check_exact_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& v,
                        const char* v_name, const at::Tensor& f, const at::Tensor& buffer,
                        int64_t numer, int64_t denom, int64_t frac_bits, int64_t buffer_limbs);
double exact_update_scale(int64_t numer, int64_t denom, int64_t frac_bits);

TensorPair forward_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f, double gamma);
TensorPair inverse_cpu(const at::Tensor& x_next, const at::Tensor& v_next, const at::Tensor& f,
                       double gamma);
TensorPair backward_cpu(const at::Tensor& grad_x_next, const at::Tensor& grad_v_next,
                        const at::Tensor& vjp, double gamma);
ExactResult exact_forward_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                              const at::Tensor& buffer, int64_t numer, int64_t denom,
                              int64_t frac_bits, int64_t buffer_limbs);
ExactResult exact_inverse_cpu(const at::Tensor& x_next, const at::Tensor& v_next,
                              const at::Tensor& f, const at::Tensor& buffer, int64_t numer,
                              int64_t denom, int64_t frac_bits, int64_t buffer_limbs);

}  // namespace deepkern::momentum
