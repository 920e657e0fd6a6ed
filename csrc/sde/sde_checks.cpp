#include <ATen/ATen.h>

#include <limits>

#include "common/checks.h"
#include "sde/sde_ops.h"

namespace deepkern::sde {
namespace {

// A drift parameter: present, of the given shape, dtype and device of x0, finite.
at::Tensor check_parameter(const c10::optional<at::Tensor>& t, const char* name,
                           at::IntArrayRef shape, const at::Tensor& x0, const char* drift) {
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required by the ", drift, " drift");
  check_same_dtype(*t, name, x0, "x0");
  check_same_device(*t, name, x0, "x0");
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, " for the ", drift,
              " drift, got ", t->sizes());
  TORCH_CHECK(at::isfinite(*t).all().item<bool>(), name, " must be finite");
  return t->contiguous();
}

void check_absent(const c10::optional<at::Tensor>& t, const char* name, const char* drift) {
  TORCH_CHECK(!(t.has_value() && t->defined()), name, " must be None for the ", drift, " drift");
}

}  // namespace

Inputs check_inputs(const at::Tensor& x0, const at::Tensor& sigma,
                    const c10::optional<at::Tensor>& matrix, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& out_matrix,
                    const c10::optional<at::Tensor>& out_bias, int64_t drift_kind,
                    int64_t activation, double h) {
  TORCH_CHECK(x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble,
              "x0 must be float32 or float64, got ", x0.scalar_type());
  TORCH_CHECK(x0.dim() == 2 && x0.size(1) >= 1,
              "x0 must have shape [paths, dim] with dim >= 1, got ", x0.sizes());
  TORCH_CHECK(at::isfinite(x0).all().item<bool>(), "x0 must be finite");
  TORCH_CHECK(std::isfinite(h) && h > 0.0, "h (the step size) must be positive and finite, got ",
              h);

  Inputs in;
  in.dim = x0.size(1);
  in.x0 = x0.contiguous();
  const int64_t d = in.dim;

  check_same_dtype(sigma, "sigma", x0, "x0");
  check_same_device(sigma, "sigma", x0, "x0");
  TORCH_CHECK(sigma.dim() <= 2,
              "sigma must be a scalar, a vector [dim] or a matrix [dim, dim], got ", sigma.dim(),
              " dimensions");
  if (sigma.dim() == 1) {
    TORCH_CHECK(sigma.size(0) == d, "diagonal sigma must have ", d, " entries, got ",
                sigma.size(0));
  } else if (sigma.dim() == 2) {
    TORCH_CHECK(sigma.size(0) == d && sigma.size(1) == d, "matrix sigma must be square [", d, ", ",
                d, "], got ", sigma.sizes());
    TORCH_CHECK(at::triu(sigma, 1).count_nonzero().item<int64_t>() == 0,
                "matrix sigma must be lower-triangular (a Cholesky factor), but it has non-zero "
                "entries above the diagonal");
  }
  TORCH_CHECK(at::isfinite(sigma).all().item<bool>(), "sigma must be finite");
  in.sigma = sigma.contiguous();
  in.sigma_kind = sigma.dim();

  TORCH_CHECK(activation >= kTanh && activation <= kSine,
              "activation must be 0 (tanh), 1 (relu), 2 (softplus) or 3 (sine), got ", activation);
  in.activation = activation;
  in.drift_kind = drift_kind;
  if (drift_kind == kZeroDrift) {
    check_absent(matrix, "A", "zero");
    check_absent(bias, "b", "zero");
    check_absent(out_matrix, "W2", "zero");
    check_absent(out_bias, "b2", "zero");
  } else if (drift_kind == kLinearDrift) {
    in.matrix = check_parameter(matrix, "A", {d, d}, x0, "linear");
    in.bias = check_parameter(bias, "b", {d}, x0, "linear");
    check_absent(out_matrix, "W2", "linear");
    check_absent(out_bias, "b2", "linear");
  } else if (drift_kind == kMlpDrift) {
    TORCH_CHECK(matrix.has_value() && matrix->defined() && matrix->dim() == 2,
                "W1 must be a matrix [hidden, dim] for the MLP drift");
    in.hidden = matrix->size(0);
    TORCH_CHECK(in.hidden >= 1, "W1 must have at least one row (hidden unit)");
    in.matrix = check_parameter(matrix, "W1", {in.hidden, d}, x0, "MLP");
    in.bias = check_parameter(bias, "b1", {in.hidden}, x0, "MLP");
    in.out_matrix = check_parameter(out_matrix, "W2", {d, in.hidden}, x0, "MLP");
    in.out_bias = check_parameter(out_bias, "b2", {d}, x0, "MLP");
  } else {
    TORCH_CHECK(false, "drift_kind must be 0 (zero), 1 (linear) or 2 (MLP), got ", drift_kind);
  }
  return in;
}

void check_steps(int64_t steps, int64_t first_step, int64_t save_every) {
  TORCH_CHECK(steps >= 0, "steps must be non-negative, got ", steps);
  TORCH_CHECK(first_step >= 0, "first_step must be non-negative, got ", first_step);
  // The step index is one 32-bit word of the Philox counter.
  // Compared without forming the sum, which could overflow int64.
  TORCH_CHECK(first_step <= int64_t{std::numeric_limits<uint32_t>::max()} - steps,
              "first_step + steps must stay below 2^32, got first_step = ", first_step,
              " and steps = ", steps);
  TORCH_CHECK(save_every >= 0, "save_every must be non-negative, got ", save_every);
  TORCH_CHECK(save_every == 0 || steps % save_every == 0, "steps (", steps,
              ") must be a multiple of save_every (", save_every, ")");
}

void check_functional(const Inputs& in, int64_t kind, const at::Tensor& weights, double offset,
                      int64_t paths, bool antithetic) {
  TORCH_CHECK(kind >= kSquaredNorm && kind <= kAffine,
              "functional must be 0 (squared norm), 1 (basket call), 2 (max call) or 3 (affine), "
              "got ",
              kind);
  check_same_dtype(weights, "weights", in.x0, "x0");
  check_same_device(weights, "weights", in.x0, "x0");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == in.dim, "weights must have shape [", in.dim,
              "], got ", weights.sizes());
  TORCH_CHECK(at::isfinite(weights).all().item<bool>(), "weights must be finite");
  TORCH_CHECK(std::isfinite(offset), "offset (strike or constant) must be finite, got ", offset);
  TORCH_CHECK(paths >= 2, "paths must be at least 2 to estimate a variance, got ", paths);
  TORCH_CHECK(!antithetic || paths % 2 == 0,
              "paths must be even with antithetic sampling (pairs share their normals), got ",
              paths);
}

at::Tensor finish_moments(const std::vector<Moments>& partial, int64_t starts, int64_t chunks,
                          at::ScalarType dtype) {
  at::Tensor out = at::empty({starts, 3}, at::TensorOptions().dtype(at::kDouble));
  double* po = out.mutable_data_ptr<double>();
  for (int64_t s = 0; s < starts; ++s) {
    Moments total{0.0, 0.0, 0.0};
    for (int64_t c = 0; c < chunks; ++c) total.merge(partial[s * chunks + c]);
    const double variance = total.m2 / (total.count - 1.0);
    po[3 * s] = total.mean;
    po[3 * s + 1] = variance;
    po[3 * s + 2] = std::sqrt(variance / total.count);
  }
  return out.to(dtype);
}

}  // namespace deepkern::sde
