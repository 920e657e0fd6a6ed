// Host side of the verify family: argument checks, the messages for bad values the kernels
// found, and the matrix products of interval_linear, shared by the CPU and CUDA wrappers.
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "verify/verify.h"
#include "verify/verify_ops.h"

namespace deepkern::verify {
namespace {

void check_real(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Same dtype and device as lower.
void check_like_lower(const at::Tensor& t, const char* name, const at::Tensor& lower) {
  check_same_dtype(t, name, lower, "lower");
  check_same_device(t, name, lower, "lower");
}

void check_kind(int64_t kind) {
  TORCH_CHECK(kind == kRelu || kind == kSigmoid || kind == kTanh,
              "kind must be 0 (relu), 1 (sigmoid) or 2 (tanh), got ", kind);
}

// The flat index of the first true entry of a boolean tensor that has one.
int64_t first_true(const at::Tensor& mask) {
  return mask.reshape({-1}).nonzero().select(1, 0)[0].item<int64_t>();
}

[[noreturn]] void raise_not_finite(const at::Tensor& t, const char* name) {
  const at::Tensor flat = t.reshape({-1});
  const int64_t i = first_true(at::logical_not(at::isfinite(flat)));
  TORCH_CHECK(false, name, " must be finite (no NaN or infinity), got ", flat[i].item<double>(),
              " at flat index ", i);
}

}  // namespace

IntervalInputs check_interval_inputs(const at::Tensor& lower, const at::Tensor& upper,
                                     const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias) {
  check_real(lower, "lower");
  TORCH_CHECK(lower.dim() >= 1, "lower must have shape [..., n], got a 0-D tensor");
  check_like_lower(upper, "upper", lower);
  check_same_shape(upper, "upper", lower, "lower");
  check_like_lower(weight, "weight", lower);
  const int64_t n = lower.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == n, "weight must have shape [m, ", n,
              "] (n = lower.size(-1)), got ", weight.sizes());
  const int64_t m = weight.size(0);

  IntervalInputs in;
  if (bias.has_value() && bias->defined()) {
    check_like_lower(*bias, "bias", lower);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == m, "bias must have shape [", m,
                "] (m = weight.size(0)), got ", bias->sizes());
    in.bias = bias->contiguous();
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < lower.dim(); ++d) rows *= lower.size(d);
  in.lower = lower.reshape({rows, n}).contiguous();
  in.upper = upper.reshape({rows, n}).contiguous();
  in.weight = weight.contiguous();
  in.out_sizes = lower.sizes().vec();
  in.out_sizes.back() = m;
  return in;
}

RelaxationInputs check_relaxation_inputs(const at::Tensor& lower, const at::Tensor& upper,
                                         int64_t kind,
                                         const c10::optional<at::Tensor>& relu_lower_slope) {
  check_kind(kind);
  check_real(lower, "lower");
  check_like_lower(upper, "upper", lower);
  check_same_shape(upper, "upper", lower, "lower");

  RelaxationInputs in;
  if (relu_lower_slope.has_value() && relu_lower_slope->defined()) {
    TORCH_CHECK(kind == kRelu, "relu_lower_slope applies to kind 0 (relu) only, got kind ", kind);
    check_like_lower(*relu_lower_slope, "relu_lower_slope", lower);
    check_same_shape(*relu_lower_slope, "relu_lower_slope", lower, "lower");
    in.alpha = relu_lower_slope->contiguous();
  }
  in.lower = lower.contiguous();
  in.upper = upper.contiguous();
  return in;
}

DualInputs check_dual_inputs(const at::Tensor& lower, const at::Tensor& upper,
                             const at::Tensor& linear_coef, const at::Tensor& act_coef,
                             int64_t kind) {
  check_kind(kind);
  check_real(lower, "lower");
  check_like_lower(upper, "upper", lower);
  check_like_lower(linear_coef, "linear_coef", lower);
  check_like_lower(act_coef, "act_coef", lower);

  // Broadcast right-aligned, naming the argument that does not fit.
  const std::vector<std::pair<const char*, const at::Tensor*>> args = {
      {"lower", &lower}, {"upper", &upper}, {"linear_coef", &linear_coef}, {"act_coef", &act_coef}};
  std::vector<int64_t> sizes;
  for (const auto& [name, t] : args) {
    const int64_t dims = std::max<int64_t>(t->dim(), static_cast<int64_t>(sizes.size()));
    std::vector<int64_t> merged(dims, 1);
    for (int64_t d = 0; d < dims; ++d) {
      const int64_t from_old = d - (dims - static_cast<int64_t>(sizes.size()));
      const int64_t from_new = d - (dims - t->dim());
      const int64_t old_size = from_old >= 0 ? sizes[from_old] : 1;
      const int64_t new_size = from_new >= 0 ? t->size(from_new) : 1;
      TORCH_CHECK(old_size == new_size || old_size == 1 || new_size == 1, name, " of shape ",
                  t->sizes(), " does not broadcast with the arguments before it (shape ",
                  at::IntArrayRef(sizes), ")");
      merged[d] = old_size == 1 ? new_size : old_size;
    }
    sizes = merged;
  }

  DualInputs in;
  in.lower = lower.expand(sizes).contiguous();
  in.upper = upper.expand(sizes).contiguous();
  in.linear = linear_coef.expand(sizes).contiguous();
  in.act = act_coef.expand(sizes).contiguous();
  in.sizes = sizes;
  return in;
}

void raise_on_status(int status, const at::Tensor& lower, const at::Tensor& upper,
                     const at::Tensor& alpha, const at::Tensor& linear_coef,
                     const at::Tensor& act_coef) {
  if (status == kOk) return;
  if (status & kLowerNotFinite) raise_not_finite(lower, "lower");
  if (status & kUpperNotFinite) raise_not_finite(upper, "upper");
  if (status & kLowerAboveUpper) {
    const at::Tensor above = at::gt(lower, upper);
    const int64_t i = first_true(above);
    const double low = lower.expand_as(above).reshape({-1})[i].item<double>();
    const double high = upper.expand_as(above).reshape({-1})[i].item<double>();
    TORCH_CHECK(false, "lower must not exceed upper, got lower = ", low, " > upper = ", high,
                " at flat index ", i);
  }
  if (status & kSlopeOutside) {
    const at::Tensor flat = alpha.reshape({-1});
    const int64_t i = first_true(at::logical_not(at::logical_and(flat.ge(0), flat.le(1))));
    TORCH_CHECK(false, "relu_lower_slope must lie in [0, 1], got ", flat[i].item<double>(),
                " at flat index ", i);
  }
  if (status & kLinearNotFinite) raise_not_finite(linear_coef, "linear_coef");
  if (status & kActNotFinite) raise_not_finite(act_coef, "act_coef");
  TORCH_CHECK(false, "verify kernel reported an unknown status ", status);
}

TensorPair interval_products(const at::Tensor& center, const at::Tensor& radius,
                             const at::Tensor& weight) {
  const at::Tensor transposed = weight.t();
  return {at::matmul(center, transposed), at::matmul(radius, transposed.abs())};
}

}  // namespace deepkern::verify
