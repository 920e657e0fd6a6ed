#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"
#include "momentum/momentum_ops.h"

namespace deepkern::momentum {

void check_step_inputs(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name, const at::Tensor& c, const char* c_name, double gamma) {
  check_floating(a, a_name);
  check_same_dtype(b, b_name, a, a_name);
  check_same_dtype(c, c_name, a, a_name);
  check_same_shape(b, b_name, a, a_name);
  check_same_shape(c, c_name, a, a_name);
  check_same_device(b, b_name, a, a_name);
  check_same_device(c, c_name, a, a_name);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0.0 && gamma <= 1.0, "gamma must lie in (0, 1], got ",
              gamma);
}

void check_exact_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& v,
                        const char* v_name, const at::Tensor& f, const at::Tensor& buffer,
                        int64_t numer, int64_t denom, int64_t frac_bits, int64_t buffer_limbs) {
  check_dtype(x, x_name, at::kLong);
  check_dtype(v, v_name, at::kLong);
  check_floating(f, "f");
  check_dtype(buffer, "buffer", at::kInt);
  check_same_shape(v, v_name, x, x_name);
  check_same_shape(f, "f", x, x_name);
  check_same_device(v, v_name, x, x_name);
  check_same_device(f, "f", x, x_name);
  check_same_device(buffer, "buffer", x, x_name);
  TORCH_CHECK(buffer.dim() == 2 && buffer.size(1) == x.numel(), "buffer must have shape [limbs, ",
              x.numel(), "] (one column per element of ", x_name, "), got ", buffer.sizes());
  TORCH_CHECK(denom >= 1 && denom <= 65536, "denom must lie in [1, 65536], got ", denom);
  TORCH_CHECK(numer >= 1 && numer <= denom, "numer must lie in [1, denom = ", denom, "], got ",
              numer);
  TORCH_CHECK(frac_bits >= 0 && frac_bits <= 52, "frac_bits must lie in [0, 52], got ", frac_bits);
  TORCH_CHECK(buffer_limbs >= 1, "buffer_limbs must be at least 1, got ", buffer_limbs);
}

double exact_update_scale(int64_t numer, int64_t denom, int64_t frac_bits) {
  return std::ldexp(static_cast<double>(denom - numer) / static_cast<double>(denom),
                    static_cast<int>(frac_bits));
}

}  // namespace deepkern::momentum
