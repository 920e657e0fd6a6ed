// CPU kernels of the verify family. Every op is elementwise over neurons (interval_linear
// around its two matrix products): at::parallel_for hands contiguous ranges of neurons to
// threads, each neuron is computed by the arithmetic of verify.h, and each thread ORs the
// status bits of its range into one atomic integer, read once after the loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "common/checks.h"
#include "verify/verify.h"
#include "verify/verify_ops.h"

namespace deepkern::verify {
namespace {

constexpr char kIntervalName[] = "interval_linear";
constexpr char kRelaxationName[] = "activation_relaxation";
constexpr char kDualName[] = "dual_activation_max";

// Neurons per task: a ReLU neuron or an interval entry costs a nanosecond or two, a sigmoid or
// tanh relaxation a few dozen exponentials (the tangent searches), a dual maximum a handful.
constexpr int64_t kCheapGrain = 16384;
constexpr int64_t kSmoothGrain = 64;
constexpr int64_t kDualGrain = 1024;

// Runs body(begin, end) -> status over [0, n) in parallel and returns the OR of the statuses.
template <typename Body>
int parallel_status(int64_t n, int64_t grain, const Body& body) {
  std::atomic<int> status{kOk};
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const int local = body(begin, end);
    if (local != kOk) status.fetch_or(local);
  });
  return status.load();
}

// The ReLU lines of neurons [begin, end) and whether all their inputs were valid. No branch
// per neuron, so the loop vectorises: a bad neuron gets unused values and clears the flag.
template <typename T, bool HasAlpha>
bool relu_range(int64_t begin, int64_t end, const T* __restrict lower, const T* __restrict upper,
                const T* __restrict alpha, T* __restrict lower_slope, T* __restrict lower_bias,
                T* __restrict upper_slope, T* __restrict upper_bias) {
  T invalid = 0;  // a flag in T itself: a select of T vectorises where a bool-to-int does not
  for (int64_t i = begin; i < end; ++i) {
    const T slope = HasAlpha ? alpha[i] : T(0);
    invalid = relaxation_valid<T>(lower[i], upper[i], slope, HasAlpha) ? invalid : T(1);
    const Lines<T> lines = relu_relaxation<T>(lower[i], upper[i], slope, HasAlpha);
    lower_slope[i] = lines.lower_slope;
    lower_bias[i] = lines.lower_bias;
    upper_slope[i] = lines.upper_slope;
    upper_bias[i] = lines.upper_bias;
  }
  return invalid == 0;
}

// The status bits of relaxation inputs [begin, end), read only once a range is known to be bad.
template <typename T>
int relaxation_range_status(int64_t begin, int64_t end, const T* lower, const T* upper,
                            const T* alpha) {
  int status = kOk;
  for (int64_t i = begin; i < end; ++i) {
    status |= relaxation_status<T>(lower[i], upper[i], alpha ? alpha + i : nullptr);
  }
  return status;
}

// The ReLU dual maxima of neurons [begin, end) and whether all their inputs were valid, with no
// branch per neuron, as relu_range.
template <typename T>
bool relu_dual_range(int64_t begin, int64_t end, const T* __restrict lower,
                     const T* __restrict upper, const T* __restrict linear, const T* __restrict act,
                     T* __restrict value, T* __restrict argmax) {
  T invalid = 0;
  for (int64_t i = begin; i < end; ++i) {
    invalid = dual_valid<T>(lower[i], upper[i], linear[i], act[i]) ? invalid : T(1);
    const DualMax<T> best = relu_dual_max<T>(lower[i], upper[i], linear[i], act[i]);
    value[i] = best.value;
    argmax[i] = best.argmax;
  }
  return invalid == 0;
}

template <typename T>
int dual_range_status(int64_t begin, int64_t end, const T* lower, const T* upper, const T* linear,
                      const T* act) {
  int status = kOk;
  for (int64_t i = begin; i < end; ++i) {
    status |= dual_status<T>(lower[i], upper[i], linear[i], act[i]);
  }
  return status;
}

}  // namespace

TensorPair interval_linear_cpu(const at::Tensor& lower, const at::Tensor& upper,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const IntervalInputs in = check_interval_inputs(lower, upper, weight, bias);
  check_device_type(in.lower, "lower", c10::DeviceType::CPU);

  // Center and radius, checking the bounds on the way.
  at::Tensor center = at::empty_like(in.lower);
  at::Tensor radius = at::empty_like(in.lower);
  int status = kOk;
  AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kIntervalName, [&] {
    const scalar_t* lo = in.lower.const_data_ptr<scalar_t>();
    const scalar_t* hi = in.upper.const_data_ptr<scalar_t>();
    scalar_t* c = center.mutable_data_ptr<scalar_t>();
    scalar_t* r = radius.mutable_data_ptr<scalar_t>();
    status = parallel_status(in.lower.numel(), kCheapGrain, [&](int64_t begin, int64_t end) {
      scalar_t invalid = 0;
      for (int64_t i = begin; i < end; ++i) {
        const bool valid = relaxation_valid<scalar_t>(lo[i], hi[i], scalar_t(0), false);
        invalid = valid ? invalid : scalar_t(1);
        center_radius(lo[i], hi[i], c + i, r + i);
      }
      return invalid == 0 ? kOk : relaxation_range_status<scalar_t>(begin, end, lo, hi, nullptr);
    });
  });
  raise_on_status(status, lower, upper);

  // The products, then lower = c W^T + b - r |W|^T and upper = c W^T + b + r |W|^T in place.
  auto [out_lower, out_upper] = interval_products(center, radius, in.weight);
  const int64_t rows = out_lower.size(0);
  const int64_t m = out_lower.size(1);
  AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kIntervalName, [&] {
    const scalar_t* b = in.bias.defined() ? in.bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* lo = out_lower.mutable_data_ptr<scalar_t>();
    scalar_t* hi = out_upper.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kCheapGrain / std::max<int64_t>(m, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t row = begin; row < end; ++row) {
                         scalar_t* row_lower = lo + row * m;
                         scalar_t* row_upper = hi + row * m;
                         for (int64_t j = 0; j < m; ++j) {
                           const scalar_t c = b ? row_lower[j] + b[j] : row_lower[j];
                           const scalar_t r = row_upper[j];
                           row_lower[j] = c - r;
                           row_upper[j] = c + r;
                         }
                       }
                     });
  });
  return {out_lower.view(in.out_sizes), out_upper.view(in.out_sizes)};
}

TensorQuad activation_relaxation_cpu(const at::Tensor& lower, const at::Tensor& upper, int64_t kind,
                                     const c10::optional<at::Tensor>& relu_lower_slope) {
  const RelaxationInputs in = check_relaxation_inputs(lower, upper, kind, relu_lower_slope);
  check_device_type(in.lower, "lower", c10::DeviceType::CPU);

  at::Tensor lower_slope = at::empty_like(in.lower);
  at::Tensor lower_bias = at::empty_like(in.lower);
  at::Tensor upper_slope = at::empty_like(in.lower);
  at::Tensor upper_bias = at::empty_like(in.lower);
  int status = kOk;
  AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kRelaxationName, [&] {
    const scalar_t* lo = in.lower.const_data_ptr<scalar_t>();
    const scalar_t* hi = in.upper.const_data_ptr<scalar_t>();
    const scalar_t* alpha = in.alpha.defined() ? in.alpha.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ls = lower_slope.mutable_data_ptr<scalar_t>();
    scalar_t* lb = lower_bias.mutable_data_ptr<scalar_t>();
    scalar_t* us = upper_slope.mutable_data_ptr<scalar_t>();
    scalar_t* ub = upper_bias.mutable_data_ptr<scalar_t>();
    if (kind == kRelu) {
      status = parallel_status(in.lower.numel(), kCheapGrain, [&](int64_t begin, int64_t end) {
        const bool valid =
            alpha ? relu_range<scalar_t, true>(begin, end, lo, hi, alpha, ls, lb, us, ub)
                  : relu_range<scalar_t, false>(begin, end, lo, hi, alpha, ls, lb, us, ub);
        return valid ? kOk : relaxation_range_status<scalar_t>(begin, end, lo, hi, alpha);
      });
      return;
    }
    status = parallel_status(in.lower.numel(), kSmoothGrain, [&](int64_t begin, int64_t end) {
      int local = kOk;
      for (int64_t i = begin; i < end; ++i) {
        const int check = relaxation_status<scalar_t>(lo[i], hi[i], nullptr);
        local |= check;
        if (check != kOk) continue;  // the call raises; nothing is computed from bad values
        const Lines<scalar_t> lines = smooth_relaxation<scalar_t>(kind, lo[i], hi[i]);
        ls[i] = lines.lower_slope;
        lb[i] = lines.lower_bias;
        us[i] = lines.upper_slope;
        ub[i] = lines.upper_bias;
      }
      return local;
    });
  });
  raise_on_status(status, lower, upper, in.alpha);
  return {lower_slope, lower_bias, upper_slope, upper_bias};
}

TensorPair dual_activation_max_cpu(const at::Tensor& lower, const at::Tensor& upper,
                                   const at::Tensor& linear_coef, const at::Tensor& act_coef,
                                   int64_t kind) {
  const DualInputs in = check_dual_inputs(lower, upper, linear_coef, act_coef, kind);
  check_device_type(in.lower, "lower", c10::DeviceType::CPU);

  at::Tensor value = at::empty_like(in.lower);
  at::Tensor argmax = at::empty_like(in.lower);
  int status = kOk;
  AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kDualName, [&] {
    const scalar_t* lo = in.lower.const_data_ptr<scalar_t>();
    const scalar_t* hi = in.upper.const_data_ptr<scalar_t>();
    const scalar_t* a = in.linear.const_data_ptr<scalar_t>();
    const scalar_t* c = in.act.const_data_ptr<scalar_t>();
    scalar_t* v = value.mutable_data_ptr<scalar_t>();
    scalar_t* z = argmax.mutable_data_ptr<scalar_t>();
    if (kind == kRelu) {
      status = parallel_status(in.lower.numel(), kCheapGrain, [&](int64_t begin, int64_t end) {
        return relu_dual_range<scalar_t>(begin, end, lo, hi, a, c, v, z)
                   ? kOk
                   : dual_range_status<scalar_t>(begin, end, lo, hi, a, c);
      });
      return;
    }
    status = parallel_status(in.lower.numel(), kDualGrain, [&](int64_t begin, int64_t end) {
      int local = kOk;
      for (int64_t i = begin; i < end; ++i) {
        const int check = dual_status<scalar_t>(lo[i], hi[i], a[i], c[i]);
        local |= check;
        if (check != kOk) continue;
        const DualMax<scalar_t> best = dual_max<scalar_t>(kind, lo[i], hi[i], a[i], c[i]);
        v[i] = best.value;
        z[i] = best.argmax;
      }
      return local;
    });
  });
  raise_on_status(status, lower, upper, at::Tensor(), linear_coef, act_coef);
  return {value, argmax};
}

TORCH_LIBRARY_IMPL(deepkern, CPU, m) {
  m.impl("interval_linear", &interval_linear_cpu);
  m.impl("activation_relaxation", &activation_relaxation_cpu);
  m.impl("dual_activation_max", &dual_activation_max_cpu);
}

}  // namespace deepkern::verify
