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

// Neurons per task: a ReLU neuron or an interval entry costs a few nanoseconds, a sigmoid or
// tanh relaxation a hundred exponentials (the bisections), a dual maximum a handful.
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
      int local = kOk;
      for (int64_t i = begin; i < end; ++i) {
        local |= relaxation_status<scalar_t>(lo[i], hi[i], nullptr);
        center_radius(lo[i], hi[i], c + i, r + i);
      }
      return local;
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
    const int64_t grain = kind == kRelu ? kCheapGrain : kSmoothGrain;
    status = parallel_status(in.lower.numel(), grain, [&](int64_t begin, int64_t end) {
      int local = kOk;
      for (int64_t i = begin; i < end; ++i) {
        const int check = relaxation_status<scalar_t>(lo[i], hi[i], alpha ? alpha + i : nullptr);
        local |= check;
        if (check != kOk) continue;  // the call raises; nothing is computed from bad values
        const Lines<scalar_t> lines =
            kind == kRelu ? relu_relaxation<scalar_t>(lo[i], hi[i], alpha ? alpha[i] : scalar_t(0),
                                                      alpha != nullptr)
                          : smooth_relaxation<scalar_t>(kind, lo[i], hi[i]);
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
