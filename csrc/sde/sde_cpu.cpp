// CPU kernels of the sde family. Paths are independent: at::parallel_for splits them across
// threads, and every random number is addressed by (seed, path, step), so results do not depend
// on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "sde/sde.h"
#include "sde/sde_ops.h"

namespace deepkern::sde {
namespace {

constexpr char kEulerName[] = "sde_euler";
constexpr char kNormalsName[] = "sde_normals";
constexpr char kMonteCarloName[] = "sde_monte_carlo";

// Sixteen paths per task: each path costs steps * (dim + drift) work, enough to amortise a task.
constexpr int64_t kPathGrain = 16;
// Monte Carlo paths per chunk. Chunk moments are merged in a fixed order, so the reduction is
// deterministic whatever the thread count.
constexpr int64_t kChunkPaths = 1024;

template <typename T>
struct PathScratch {
  std::vector<T> storage;
  Scratch<T> view;

  PathScratch(int64_t dim, int64_t hidden) : storage(3 * dim + hidden + 1) {
    view = {storage.data(), storage.data() + dim, storage.data() + 2 * dim,
            storage.data() + 3 * dim};
  }
};

}  // namespace

at::Tensor euler_cpu(const at::Tensor& x0, const at::Tensor& sigma,
                     const c10::optional<at::Tensor>& matrix, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& out_matrix,
                     const c10::optional<at::Tensor>& out_bias, int64_t drift_kind,
                     int64_t activation, double h, int64_t steps, int64_t first_step,
                     int64_t save_every, int64_t seed, bool antithetic) {
  check_device_type(x0, "x0", c10::DeviceType::CPU);
  const Inputs in =
      check_inputs(x0, sigma, matrix, bias, out_matrix, out_bias, drift_kind, activation, h);
  check_steps(steps, first_step, save_every);

  const int64_t paths = in.x0.size(0);
  const int64_t d = in.dim;
  const int64_t saves = save_every > 0 ? steps / save_every + 1 : 0;
  at::Tensor out = save_every > 0 ? at::empty({paths, saves, d}, in.x0.options())
                                  : at::empty({paths, d}, in.x0.options());
  if (paths == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(in.x0.scalar_type(), kEulerName, [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(in, h, seed, antithetic);
    const scalar_t* start = in.x0.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, paths, kPathGrain, [&](int64_t begin, int64_t end) {
      PathScratch<scalar_t> scratch(d, in.hidden);
      std::vector<scalar_t> x(d);
      for (int64_t path = begin; path < end; ++path) {
        for (int64_t i = 0; i < d; ++i) x[i] = start[path * d + i];
        scalar_t* saved = result + path * saves * d;
        if (save_every > 0) std::copy(x.begin(), x.end(), saved);
        for (int64_t k = 0; k < steps; ++k) {
          euler_step(p, path, first_step + k, x.data(), scratch.view);
          if (save_every > 0 && (k + 1) % save_every == 0) {
            std::copy(x.begin(), x.end(), saved + ((k + 1) / save_every) * d);
          }
        }
        if (save_every == 0) std::copy(x.begin(), x.end(), result + path * d);
      }
    });
  });
  return out;
}

at::Tensor normals_cpu(const at::Tensor& like, int64_t steps, int64_t first_step, int64_t seed,
                       bool antithetic) {
  check_device_type(like, "like", c10::DeviceType::CPU);
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble,
              "like must be float32 or float64, got ", like.scalar_type());
  TORCH_CHECK(like.dim() == 2, "like must have shape [paths, dim], got ", like.sizes());
  check_steps(steps, first_step, 0);
  const int64_t paths = like.size(0);
  const int64_t d = like.size(1);
  at::Tensor out = at::empty({steps, paths, d}, like.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), kNormalsName, [&] {
    Problem<scalar_t> p{};
    p.dim = d;
    p.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    p.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
    p.antithetic = antithetic;
    scalar_t* z = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, steps * paths, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        draw_normals(p, i % paths, first_step + i / paths, z + i * d);
      }
    });
  });
  return out;
}

at::Tensor monte_carlo_cpu(const at::Tensor& x0, const at::Tensor& sigma,
                           const c10::optional<at::Tensor>& matrix,
                           const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& out_matrix,
                           const c10::optional<at::Tensor>& out_bias, int64_t drift_kind,
                           int64_t activation, double h, int64_t steps, int64_t paths, int64_t seed,
                           bool antithetic, int64_t functional_kind, const at::Tensor& weights,
                           double offset, bool log_coordinates) {
  check_device_type(x0, "x0", c10::DeviceType::CPU);
  const Inputs in =
      check_inputs(x0, sigma, matrix, bias, out_matrix, out_bias, drift_kind, activation, h);
  check_steps(steps, 0, 0);
  check_functional(in, functional_kind, weights, offset, paths, antithetic);

  const int64_t starts = in.x0.size(0);
  const int64_t d = in.dim;
  const int64_t chunks = (paths + kChunkPaths - 1) / kChunkPaths;
  std::vector<Moments> partial(starts * chunks, Moments{0.0, 0.0, 0.0});
  const at::Tensor w = weights.contiguous();

  AT_DISPATCH_FLOATING_TYPES(in.x0.scalar_type(), kMonteCarloName, [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(in, h, seed, antithetic);
    const scalar_t* start = in.x0.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, starts * chunks, 1, [&](int64_t begin, int64_t end) {
      PathScratch<scalar_t> scratch(d, in.hidden);
      std::vector<scalar_t> x(d);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / chunks;
        const int64_t first = (task % chunks) * kChunkPaths;
        const int64_t last = std::min(paths, first + kChunkPaths);
        Moments moments{0.0, 0.0, 0.0};
        for (int64_t m = first; m < last; ++m) {
          for (int64_t i = 0; i < d; ++i) x[i] = start[s * d + i];
          for (int64_t k = 0; k < steps; ++k) {
            euler_step(p, s * paths + m, k, x.data(), scratch.view);
          }
          moments.add(functional(functional_kind, x.data(), d, pw, offset, log_coordinates));
        }
        partial[task] = moments;
      }
    });
  });
  return finish_moments(partial, starts, chunks, in.x0.scalar_type());
}

TORCH_LIBRARY_IMPL(deepkern, CPU, m) {
  m.impl("sde_euler", &euler_cpu);
  m.impl("sde_normals", &normals_cpu);
  m.impl("sde_monte_carlo", &monte_carlo_cpu);
}

}  // namespace deepkern::sde
