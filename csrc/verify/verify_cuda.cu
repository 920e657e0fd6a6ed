// CUDA kernels of the verify family. One thread per neuron (per output entry for the interval
// combine step), with a grid-stride loop; each thread computes its neuron with the arithmetic
// of verify.h, exactly as the CPU loops do. A thread that meets a bad value ORs its status bits
// into one device integer (an integer atomic: the result does not depend on the order), which
// the host reads once after the kernel: one synchronisation per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "verify/verify.h"
#include "verify/verify_ops.h"

namespace deepkern::verify {
namespace {

constexpr int kThreads = 256;

constexpr char kIntervalName[] = "interval_linear";
constexpr char kRelaxationName[] = "activation_relaxation";
constexpr char kDualName[] = "dual_activation_max";

// Enough blocks to fill the device a few times over; the grid-stride loop covers the rest.
int blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 65535)));
}

#define DEEPKERN_GRID_STRIDE(t, n)                                          \
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < (n); \
       t += int64_t(blockDim.x) * gridDim.x)

template <typename scalar_t>
__global__ void center_radius_kernel(const scalar_t* __restrict__ lower,
                                     const scalar_t* __restrict__ upper, int64_t n,
                                     scalar_t* __restrict__ center, scalar_t* __restrict__ radius,
                                     int* __restrict__ status) {
  int local = kOk;
  DEEPKERN_GRID_STRIDE(i, n) {
    local |= relaxation_status<scalar_t>(lower[i], upper[i], nullptr);
    center_radius(lower[i], upper[i], center + i, radius + i);
  }
  if (local != kOk) atomicOr(status, local);
}

// lower = c + b - r and upper = c + b + r, in the buffers of c and r.
template <typename scalar_t>
__global__ void combine_kernel(scalar_t* __restrict__ lower, scalar_t* __restrict__ upper,
                               const scalar_t* __restrict__ bias, int64_t n, int64_t m) {
  DEEPKERN_GRID_STRIDE(i, n) {
    const scalar_t c = bias ? lower[i] + bias[i % m] : lower[i];
    const scalar_t r = upper[i];
    lower[i] = c - r;
    upper[i] = c + r;
  }
}

template <typename scalar_t>
__global__ void relaxation_kernel(const scalar_t* __restrict__ lower,
                                  const scalar_t* __restrict__ upper,
                                  const scalar_t* __restrict__ alpha, int64_t kind, int64_t n,
                                  scalar_t* __restrict__ lower_slope,
                                  scalar_t* __restrict__ lower_bias,
                                  scalar_t* __restrict__ upper_slope,
                                  scalar_t* __restrict__ upper_bias, int* __restrict__ status) {
  int local = kOk;
  DEEPKERN_GRID_STRIDE(i, n) {
    const int check = relaxation_status<scalar_t>(lower[i], upper[i], alpha ? alpha + i : nullptr);
    local |= check;
    if (check != kOk) continue;
    const Lines<scalar_t> lines =
        kind == kRelu ? relu_relaxation<scalar_t>(lower[i], upper[i],
                                                  alpha ? alpha[i] : scalar_t(0), alpha != nullptr)
                      : smooth_relaxation<scalar_t>(kind, lower[i], upper[i]);
    lower_slope[i] = lines.lower_slope;
    lower_bias[i] = lines.lower_bias;
    upper_slope[i] = lines.upper_slope;
    upper_bias[i] = lines.upper_bias;
  }
  if (local != kOk) atomicOr(status, local);
}

template <typename scalar_t>
__global__ void dual_kernel(const scalar_t* __restrict__ lower, const scalar_t* __restrict__ upper,
                            const scalar_t* __restrict__ linear, const scalar_t* __restrict__ act,
                            int64_t kind, int64_t n, scalar_t* __restrict__ value,
                            scalar_t* __restrict__ argmax, int* __restrict__ status) {
  int local = kOk;
  DEEPKERN_GRID_STRIDE(i, n) {
    const int check = dual_status<scalar_t>(lower[i], upper[i], linear[i], act[i]);
    local |= check;
    if (check != kOk) continue;
    const DualMax<scalar_t> best = dual_max<scalar_t>(kind, lower[i], upper[i], linear[i], act[i]);
    value[i] = best.value;
    argmax[i] = best.argmax;
  }
  if (local != kOk) atomicOr(status, local);
}

at::Tensor status_flag(const at::Tensor& like) {
  return at::zeros({1}, like.options().dtype(at::kInt));
}

int read_status(const at::Tensor& flag) { return flag.item<int>(); }

TensorPair interval_linear_cuda(const at::Tensor& lower, const at::Tensor& upper,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const IntervalInputs in = check_interval_inputs(lower, upper, weight, bias);
  check_device_type(in.lower, "lower", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(in.lower.device());

  at::Tensor center = at::empty_like(in.lower);
  at::Tensor radius = at::empty_like(in.lower);
  const at::Tensor flag = status_flag(in.lower);
  const int64_t n = in.lower.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kIntervalName, [&] {
      center_radius_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          in.lower.const_data_ptr<scalar_t>(), in.upper.const_data_ptr<scalar_t>(), n,
          center.mutable_data_ptr<scalar_t>(), radius.mutable_data_ptr<scalar_t>(),
          flag.mutable_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    raise_on_status(read_status(flag), lower, upper);
  }

  auto [out_lower, out_upper] = interval_products(center, radius, in.weight);
  const int64_t entries = out_lower.numel();
  if (entries > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kIntervalName, [&] {
      combine_kernel<scalar_t><<<blocks_for(entries), kThreads, 0, stream>>>(
          out_lower.mutable_data_ptr<scalar_t>(), out_upper.mutable_data_ptr<scalar_t>(),
          in.bias.defined() ? in.bias.const_data_ptr<scalar_t>() : nullptr, entries,
          out_lower.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out_lower.view(in.out_sizes), out_upper.view(in.out_sizes)};
}

TensorQuad activation_relaxation_cuda(const at::Tensor& lower, const at::Tensor& upper,
                                      int64_t kind,
                                      const c10::optional<at::Tensor>& relu_lower_slope) {
  const RelaxationInputs in = check_relaxation_inputs(lower, upper, kind, relu_lower_slope);
  check_device_type(in.lower, "lower", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(in.lower.device());

  at::Tensor lower_slope = at::empty_like(in.lower);
  at::Tensor lower_bias = at::empty_like(in.lower);
  at::Tensor upper_slope = at::empty_like(in.lower);
  at::Tensor upper_bias = at::empty_like(in.lower);
  const int64_t n = in.lower.numel();
  if (n == 0) return {lower_slope, lower_bias, upper_slope, upper_bias};

  const at::Tensor flag = status_flag(in.lower);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kRelaxationName, [&] {
    relaxation_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        in.lower.const_data_ptr<scalar_t>(), in.upper.const_data_ptr<scalar_t>(),
        in.alpha.defined() ? in.alpha.const_data_ptr<scalar_t>() : nullptr, kind, n,
        lower_slope.mutable_data_ptr<scalar_t>(), lower_bias.mutable_data_ptr<scalar_t>(),
        upper_slope.mutable_data_ptr<scalar_t>(), upper_bias.mutable_data_ptr<scalar_t>(),
        flag.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_on_status(read_status(flag), lower, upper, in.alpha);
  return {lower_slope, lower_bias, upper_slope, upper_bias};
}

TensorPair dual_activation_max_cuda(const at::Tensor& lower, const at::Tensor& upper,
                                    const at::Tensor& linear_coef, const at::Tensor& act_coef,
                                    int64_t kind) {
  const DualInputs in = check_dual_inputs(lower, upper, linear_coef, act_coef, kind);
  check_device_type(in.lower, "lower", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(in.lower.device());

  at::Tensor value = at::empty_like(in.lower);
  at::Tensor argmax = at::empty_like(in.lower);
  const int64_t n = in.lower.numel();
  if (n == 0) return {value, argmax};

  const at::Tensor flag = status_flag(in.lower);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.lower.scalar_type(), kDualName, [&] {
    dual_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        in.lower.const_data_ptr<scalar_t>(), in.upper.const_data_ptr<scalar_t>(),
        in.linear.const_data_ptr<scalar_t>(), in.act.const_data_ptr<scalar_t>(), kind, n,
        value.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<scalar_t>(),
        flag.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_on_status(read_status(flag), lower, upper, at::Tensor(), linear_coef, act_coef);
  return {value, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) {
  m.impl("interval_linear", &interval_linear_cuda);
  m.impl("activation_relaxation", &activation_relaxation_cuda);
  m.impl("dual_activation_max", &dual_activation_max_cuda);
}

}  // namespace deepkern::verify
