// CUDA kernels of the momentum family. One thread per element with a grid-stride loop; the
// per-element arithmetic lives in momentum.h and is shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "momentum/momentum.h"
#include "momentum/momentum_ops.h"

namespace deepkern::momentum {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the device a few times over; the grid-stride loop covers the rest.
int blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(wanted, 65535));
}

enum class StepKind { kForward, kInverse, kBackward };

// Op names for the dispatch macros, which need compile-time strings.
constexpr char kForwardName[] = "momentum_forward";
constexpr char kInverseName[] = "momentum_inverse";
constexpr char kBackwardName[] = "momentum_backward";
constexpr char kExactForwardName[] = "momentum_exact_forward";
constexpr char kExactInverseName[] = "momentum_exact_inverse";

template <StepKind kind, typename scalar_t>
__global__ void pairwise_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                const scalar_t* __restrict__ c, double gamma,
                                scalar_t* __restrict__ out0, scalar_t* __restrict__ out1,
                                int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g = static_cast<acc_t>(gamma);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    if constexpr (kind == StepKind::kForward) {
      forward_step<scalar_t, acc_t>(a[i], b[i], c[i], g, out0 + i, out1 + i);
    } else if constexpr (kind == StepKind::kInverse) {
      inverse_step<scalar_t, acc_t>(a[i], b[i], c[i], g, out0 + i, out1 + i);
    } else {
      backward_step<scalar_t, acc_t>(a[i], b[i], c[i], g, out0 + i, out1 + i);
    }
  }
}

template <StepKind kind, const char* op_name>
TensorPair run_pairwise(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                        double gamma) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor a_in = a.contiguous();
  const at::Tensor b_in = b.contiguous();
  const at::Tensor c_in = c.contiguous();
  at::Tensor out0 = at::empty_like(a_in);
  at::Tensor out1 = at::empty_like(a_in);
  const int64_t n = a_in.numel();
  if (n == 0) return {out0, out1};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_in.scalar_type(), op_name, [&] {
    pairwise_kernel<kind, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        a_in.const_data_ptr<scalar_t>(), b_in.const_data_ptr<scalar_t>(),
        c_in.const_data_ptr<scalar_t>(), gamma, out0.mutable_data_ptr<scalar_t>(),
        out1.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out0, out1};
}

// status[0] accumulates the checksum and status[1] the error count with integer atomics, which
// are exact and order independent, so the result is deterministic. Limb l of element i sits at
// l * n + i, so consecutive threads touch consecutive words.
template <bool kForward, typename scalar_t>
__global__ void exact_kernel(const int64_t* __restrict__ x, const int64_t* __restrict__ v,
                             const scalar_t* __restrict__ f, const uint32_t* __restrict__ limbs_in,
                             int64_t in_limbs, uint32_t* __restrict__ limbs_out, int64_t out_limbs,
                             SmallDivisor numer, SmallDivisor denom, double update_scale,
                             int64_t* __restrict__ x_out, int64_t* __restrict__ v_out,
                             unsigned long long* status, int64_t n) {
  unsigned long long hash = 0;
  unsigned long long errors = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t xi = x[i];
    int64_t vi = v[i];
    int64_t q = 0;
    const double fi = static_cast<double>(f[i]);
    const BufferView view{limbs_in + i, in_limbs, limbs_out + i, out_limbs, n};
    const bool ok = kForward
                        ? exact_forward_step(&xi, &vi, fi, update_scale, view, numer, denom, &q)
                        : exact_inverse_step(&xi, &vi, fi, update_scale, view, numer, denom, &q);
    x_out[i] = xi;
    v_out[i] = vi;
    hash += checksum_term(q, i);
    errors += ok ? 0 : 1;
  }
  atomicAdd(status, hash);
  atomicAdd(status + 1, errors);
}

template <bool kForward>
ExactResult run_exact(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                      const at::Tensor& buffer, int64_t numer, int64_t denom, int64_t frac_bits,
                      int64_t buffer_limbs) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_in = x.contiguous();
  const at::Tensor v_in = v.contiguous();
  const at::Tensor f_in = f.contiguous();
  const at::Tensor buffer_in = buffer.contiguous();
  const int64_t n = x_in.numel();

  at::Tensor x_out = at::empty_like(x_in);
  at::Tensor v_out = at::empty_like(v_in);
  at::Tensor buffer_out = at::empty({buffer_limbs, n}, buffer_in.options());
  at::Tensor status = at::zeros({2}, x_in.options());
  if (n == 0) return {x_out, v_out, buffer_out, status};

  const double update_scale = exact_update_scale(numer, denom, frac_bits);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr const char* op_name = kForward ? kExactForwardName : kExactInverseName;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f_in.scalar_type(), op_name, [&] {
    exact_kernel<kForward, scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x_in.const_data_ptr<int64_t>(), v_in.const_data_ptr<int64_t>(),
        f_in.const_data_ptr<scalar_t>(),
        reinterpret_cast<const uint32_t*>(buffer_in.const_data_ptr()), buffer_in.size(0),
        reinterpret_cast<uint32_t*>(buffer_out.mutable_data_ptr()), buffer_limbs,
        make_divisor(static_cast<uint32_t>(numer)), make_divisor(static_cast<uint32_t>(denom)),
        update_scale, x_out.mutable_data_ptr<int64_t>(), v_out.mutable_data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(status.mutable_data_ptr<int64_t>()), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_out, v_out, buffer_out, status};
}

}  // namespace

TensorPair forward_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                        double gamma) {
  check_step_inputs(x, "x", v, "v", f, "f", gamma);
  check_device_type(x, "x", c10::DeviceType::CUDA);
  return run_pairwise<StepKind::kForward, kForwardName>(x, v, f, gamma);
}

TensorPair inverse_cuda(const at::Tensor& x_next, const at::Tensor& v_next, const at::Tensor& f,
                        double gamma) {
  check_step_inputs(x_next, "x_next", v_next, "v_next", f, "f", gamma);
  check_device_type(x_next, "x_next", c10::DeviceType::CUDA);
  return run_pairwise<StepKind::kInverse, kInverseName>(x_next, v_next, f, gamma);
}

TensorPair backward_cuda(const at::Tensor& grad_x_next, const at::Tensor& grad_v_next,
                         const at::Tensor& vjp, double gamma) {
  check_step_inputs(grad_x_next, "grad_x_next", grad_v_next, "grad_v_next", vjp, "vjp", gamma);
  check_device_type(grad_x_next, "grad_x_next", c10::DeviceType::CUDA);
  return run_pairwise<StepKind::kBackward, kBackwardName>(grad_x_next, grad_v_next, vjp, gamma);
}

ExactResult exact_forward_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& f,
                               const at::Tensor& buffer, int64_t numer, int64_t denom,
                               int64_t frac_bits, int64_t buffer_limbs) {
  check_exact_inputs(x, "x", v, "v", f, buffer, numer, denom, frac_bits, buffer_limbs);
  check_device_type(x, "x", c10::DeviceType::CUDA);
  TORCH_CHECK(buffer_limbs >= buffer.size(0), "buffer_limbs must be at least the ", buffer.size(0),
              " limbs buffer already has (a forward step never shrinks it), got ", buffer_limbs);
  return run_exact<true>(x, v, f, buffer, numer, denom, frac_bits, buffer_limbs);
}

ExactResult exact_inverse_cuda(const at::Tensor& x_next, const at::Tensor& v_next,
                               const at::Tensor& f, const at::Tensor& buffer, int64_t numer,
                               int64_t denom, int64_t frac_bits, int64_t buffer_limbs) {
  check_exact_inputs(x_next, "x_next", v_next, "v_next", f, buffer, numer, denom, frac_bits,
                     buffer_limbs);
  check_device_type(x_next, "x_next", c10::DeviceType::CUDA);
  TORCH_CHECK(buffer_limbs <= buffer.size(0), "buffer_limbs must be at most the ", buffer.size(0),
              " limbs buffer has (an inverse step never grows it), got ", buffer_limbs);
  return run_exact<false>(x_next, v_next, f, buffer, numer, denom, frac_bits, buffer_limbs);
}

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) {
  m.impl("momentum_forward", &forward_cuda);
  m.impl("momentum_inverse", &inverse_cuda);
  m.impl("momentum_backward", &backward_cuda);
  m.impl("momentum_exact_forward", &exact_forward_cuda);
  m.impl("momentum_exact_inverse", &exact_inverse_cuda);
}

}  // namespace deepkern::momentum
