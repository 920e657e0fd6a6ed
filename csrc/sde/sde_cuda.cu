// CUDA kernels of the sde family. One thread simulates one path end to end with a grid-stride
// loop over paths; its state and scratch live in local memory (registers and L1), so paths are
// never written out unless saved states are asked for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "sde/sde.h"
#include "sde/sde_ops.h"

namespace deepkern::sde {
namespace {

constexpr char kEulerName[] = "sde_euler";
constexpr char kNormalsName[] = "sde_normals";
constexpr char kMonteCarloName[] = "sde_monte_carlo";

// Per-thread arrays are sized at compile time; larger problems are refused with a message.
constexpr int64_t kMaxDim = 128;
constexpr int64_t kMaxHidden = 256;
constexpr int kThreads = 128;
// Monte Carlo: each block reduces kThreads * kPathsPerThread paths of one start point.
constexpr int64_t kPathsPerThread = 8;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

void check_cuda_limits(const Inputs& in) {
  TORCH_CHECK(in.dim <= kMaxDim, "the CUDA kernels support dim up to ", kMaxDim, ", got ", in.dim);
  TORCH_CHECK(in.hidden <= kMaxHidden, "the CUDA kernels support MLP drifts with up to ",
              kMaxHidden, " hidden units, got ", in.hidden);
}

template <typename T>
__global__ void euler_kernel(Problem<T> p, const T* __restrict__ start, T* __restrict__ out,
                             int64_t paths, int64_t steps, int64_t first_step, int64_t save_every,
                             int64_t saves) {
  T x[kMaxDim];
  T z[kMaxDim];
  T noise[kMaxDim];
  T mu[kMaxDim];
  T hidden[kMaxHidden];
  const Scratch<T> scratch{z, noise, mu, hidden};
  const int64_t d = p.dim;
  for (int64_t path = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; path < paths;
       path += int64_t(blockDim.x) * gridDim.x) {
    for (int64_t i = 0; i < d; ++i) x[i] = start[path * d + i];
    T* saved = out + path * saves * d;
    if (save_every > 0) {
      for (int64_t i = 0; i < d; ++i) saved[i] = x[i];
    }
    for (int64_t k = 0; k < steps; ++k) {
      euler_step(p, path, first_step + k, x, scratch);
      if (save_every > 0 && (k + 1) % save_every == 0) {
        for (int64_t i = 0; i < d; ++i) saved[((k + 1) / save_every) * d + i] = x[i];
      }
    }
    if (save_every == 0) {
      for (int64_t i = 0; i < d; ++i) out[path * d + i] = x[i];
    }
  }
}

template <typename T>
__global__ void normals_kernel(Problem<T> p, T* __restrict__ out, int64_t paths, int64_t total,
                               int64_t first_step) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    draw_normals(p, i % paths, first_step + i / paths, out + i * p.dim);
  }
}

// Grid (chunks, starts). Each thread accumulates the moments of its paths; the block merges
// them in a fixed tree order, so the result is deterministic.
template <typename T>
__global__ void monte_carlo_kernel(Problem<T> p, const T* __restrict__ start,
                                   const T* __restrict__ weights, int64_t functional_kind,
                                   double offset, bool log_coordinates, int64_t paths,
                                   int64_t steps, int64_t chunks, Moments* __restrict__ partial) {
  __shared__ Moments block_moments[kThreads];
  T x[kMaxDim];
  T z[kMaxDim];
  T noise[kMaxDim];
  T mu[kMaxDim];
  T hidden[kMaxHidden];
  const Scratch<T> scratch{z, noise, mu, hidden};
  const int64_t d = p.dim;
  const int64_t s = blockIdx.y;
  const int64_t chunk = blockIdx.x;
  const int64_t first = chunk * kThreads * kPathsPerThread;
  const int64_t last = min(paths, first + kThreads * kPathsPerThread);

  Moments moments{0.0, 0.0, 0.0};
  for (int64_t m = first + threadIdx.x; m < last; m += kThreads) {
    for (int64_t i = 0; i < d; ++i) x[i] = start[s * d + i];
    for (int64_t k = 0; k < steps; ++k) euler_step(p, s * paths + m, k, x, scratch);
    moments.add(functional(functional_kind, x, d, weights, offset, log_coordinates));
  }
  block_moments[threadIdx.x] = moments;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) block_moments[threadIdx.x].merge(block_moments[threadIdx.x + width]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[s * chunks + chunk] = block_moments[0];
}

__global__ void finish_kernel(const Moments* __restrict__ partial, int64_t starts, int64_t chunks,
                              double* __restrict__ out) {
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < starts;
       s += int64_t(blockDim.x) * gridDim.x) {
    Moments total{0.0, 0.0, 0.0};
    for (int64_t c = 0; c < chunks; ++c) total.merge(partial[s * chunks + c]);
    const double variance = total.m2 / (total.count - 1.0);
    out[3 * s] = total.mean;
    out[3 * s + 1] = variance;
    out[3 * s + 2] = ::sqrt(variance / total.count);
  }
}

}  // namespace

at::Tensor euler_cuda(const at::Tensor& x0, const at::Tensor& sigma,
                      const c10::optional<at::Tensor>& matrix,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& out_matrix,
                      const c10::optional<at::Tensor>& out_bias, int64_t drift_kind,
                      int64_t activation, double h, int64_t steps, int64_t first_step,
                      int64_t save_every, int64_t seed, bool antithetic) {
  check_device_type(x0, "x0", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x0.device());
  const Inputs in =
      check_inputs(x0, sigma, matrix, bias, out_matrix, out_bias, drift_kind, activation, h);
  check_steps(steps, first_step, save_every);
  check_cuda_limits(in);

  const int64_t paths = in.x0.size(0);
  const int64_t d = in.dim;
  const int64_t saves = save_every > 0 ? steps / save_every + 1 : 0;
  at::Tensor out = save_every > 0 ? at::empty({paths, saves, d}, in.x0.options())
                                  : at::empty({paths, d}, in.x0.options());
  if (paths == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.x0.scalar_type(), kEulerName, [&] {
    euler_kernel<scalar_t><<<blocks_for(paths), kThreads, 0, stream>>>(
        make_problem<scalar_t>(in, h, seed, antithetic), in.x0.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), paths, steps, first_step, save_every, saves);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor normals_cuda(const at::Tensor& like, int64_t steps, int64_t first_step, int64_t seed,
                        bool antithetic) {
  check_device_type(like, "like", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(like.device());
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble,
              "like must be float32 or float64, got ", like.scalar_type());
  TORCH_CHECK(like.dim() == 2, "like must have shape [paths, dim], got ", like.sizes());
  check_steps(steps, first_step, 0);
  const int64_t paths = like.size(0);
  at::Tensor out = at::empty({steps, paths, like.size(1)}, like.options());
  if (out.numel() == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), kNormalsName, [&] {
    Problem<scalar_t> p{};
    p.dim = like.size(1);
    p.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    p.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    p.antithetic = antithetic;
    normals_kernel<scalar_t><<<blocks_for(steps * paths), kThreads, 0, stream>>>(
        p, out.mutable_data_ptr<scalar_t>(), paths, steps * paths, first_step);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor monte_carlo_cuda(const at::Tensor& x0, const at::Tensor& sigma,
                            const c10::optional<at::Tensor>& matrix,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& out_matrix,
                            const c10::optional<at::Tensor>& out_bias, int64_t drift_kind,
                            int64_t activation, double h, int64_t steps, int64_t paths,
                            int64_t seed, bool antithetic, int64_t functional_kind,
                            const at::Tensor& weights, double offset, bool log_coordinates) {
  check_device_type(x0, "x0", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x0.device());
  const Inputs in =
      check_inputs(x0, sigma, matrix, bias, out_matrix, out_bias, drift_kind, activation, h);
  check_steps(steps, 0, 0);
  check_functional(in, functional_kind, weights, offset, paths, antithetic);
  check_cuda_limits(in);

  const int64_t starts = in.x0.size(0);
  const int64_t chunks = (paths + kThreads * kPathsPerThread - 1) / (kThreads * kPathsPerThread);
  TORCH_CHECK(starts <= 65535,
              "the CUDA Monte Carlo kernel takes up to 65535 start points per "
              "call, got ",
              starts);
  at::Tensor partial = at::empty({starts * chunks * static_cast<int64_t>(sizeof(Moments))},
                                 in.x0.options().dtype(at::kByte));
  at::Tensor out = at::empty({starts, 3}, in.x0.options().dtype(at::kDouble));
  if (starts == 0) return out.to(in.x0.scalar_type());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w = weights.contiguous();
  Moments* moments = reinterpret_cast<Moments*>(partial.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES(in.x0.scalar_type(), kMonteCarloName, [&] {
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(starts));
    monte_carlo_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        make_problem<scalar_t>(in, h, seed, antithetic), in.x0.const_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>(), functional_kind, offset, log_coordinates, paths, steps,
        chunks, moments);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_kernel<<<blocks_for(starts), kThreads, 0, stream>>>(moments, starts, chunks,
                                                             out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.to(in.x0.scalar_type());
}

TORCH_LIBRARY_IMPL(deepkern, CUDA, m) {
  m.impl("sde_euler", &euler_cuda);
  m.impl("sde_normals", &normals_cuda);
  m.impl("sde_monte_carlo", &monte_carlo_cuda);
}

}  // namespace deepkern::sde
