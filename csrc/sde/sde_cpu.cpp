// CPU entry points of the sde family. Paths are independent: at::parallel_for splits them across
// threads, and every random number is addressed by (seed, path, step), so results do not depend
// on the thread count. The kernels themselves (sde_cpu_tiles.h) come in instruction-set tiers
// chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/checks.h"
#include "sde/sde.h"
#include "sde/sde_cpu_kernels.h"
#include "sde/sde_ops.h"

namespace deepkern::sde {
namespace {

constexpr char kEulerName[] = "sde_euler";
constexpr char kNormalsName[] = "sde_normals";
constexpr char kMonteCarloName[] = "sde_monte_carlo";

// Sixty-four paths per task: each path costs steps * (dim + drift) work, enough to amortise a
// task, and a multiple of the kernels' tile width.
constexpr int64_t kPathGrain = 64;
// Monte Carlo paths per chunk. Chunk moments are merged in a fixed order, so the reduction is
// deterministic whatever the thread count.
constexpr int64_t kChunkPaths = 1024;

enum class Tier { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* tier_name(Tier tier) {
  switch (tier) {
    case Tier::kAvx512:
      return "avx512";
    case Tier::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

Tier best_supported_tier() {
#if defined(DEEPKERN_X86_TIERS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("fma")) {
    return Tier::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Tier::kAvx2;
#endif
  return Tier::kGeneric;
}

Tier parse_tier(const std::string& name) {
  if (name == "generic") return Tier::kGeneric;
  if (name == "avx2") return Tier::kAvx2;
  if (name == "avx512") return Tier::kAvx512;
  TORCH_CHECK(false, "cpu capability must be 'generic', 'avx2' or 'avx512', got '", name, "'");
}

Tier checked_tier(const std::string& name, const char* where) {
  const Tier tier = parse_tier(name);
  TORCH_CHECK(static_cast<int>(tier) <= static_cast<int>(best_supported_tier()), where,
              " asks for the ", name, " kernels, which this build or processor lacks (best: ",
              tier_name(best_supported_tier()), ")");
  return tier;
}

Tier initial_tier() {
  const char* requested = std::getenv("DEEPKERN_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') return best_supported_tier();
  return checked_tier(requested, "DEEPKERN_CPU_CAPABILITY");
}

std::atomic<int>& active_tier() {
  static std::atomic<int> tier{static_cast<int>(initial_tier())};
  return tier;
}

}  // namespace

template <typename T>
CpuKernels<T> active_cpu_kernels() {
  switch (static_cast<Tier>(active_tier().load())) {
#if defined(DEEPKERN_X86_TIERS)
    case Tier::kAvx512:
      return avx512::cpu_kernels<T>();
    case Tier::kAvx2:
      return avx2::cpu_kernels<T>();
#endif
    default:
      return generic::cpu_kernels<T>();
  }
}

std::string cpu_capability() { return tier_name(static_cast<Tier>(active_tier().load())); }

std::string set_cpu_capability(const std::string& name) {
  const Tier tier = checked_tier(name, "set_cpu_capability");
  return tier_name(static_cast<Tier>(active_tier().exchange(static_cast<int>(tier))));
}

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
    const EulerJob<scalar_t> job{in.x0.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(),
                                 steps,
                                 first_step,
                                 save_every,
                                 saves};
    const auto kernel = active_cpu_kernels<scalar_t>().euler;
    at::parallel_for(0, paths, kPathGrain,
                     [&](int64_t begin, int64_t end) { kernel(p, job, begin, end); });
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
    const NormalsJob<scalar_t> job{out.mutable_data_ptr<scalar_t>(), paths, first_step};
    const auto kernel = active_cpu_kernels<scalar_t>().normals;
    at::parallel_for(0, steps * paths, 256,
                     [&](int64_t begin, int64_t end) { kernel(p, job, begin, end); });
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
  const int64_t chunks = (paths + kChunkPaths - 1) / kChunkPaths;
  std::vector<Moments> partial(starts * chunks, Moments{0.0, 0.0, 0.0});
  const at::Tensor w = weights.contiguous();

  AT_DISPATCH_FLOATING_TYPES(in.x0.scalar_type(), kMonteCarloName, [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(in, h, seed, antithetic);
    const MonteCarloJob<scalar_t> job{in.x0.const_data_ptr<scalar_t>(),
                                      w.const_data_ptr<scalar_t>(),
                                      paths,
                                      steps,
                                      kChunkPaths,
                                      chunks,
                                      functional_kind,
                                      offset,
                                      log_coordinates,
                                      partial.data()};
    const auto kernel = active_cpu_kernels<scalar_t>().monte_carlo;
    at::parallel_for(0, starts * chunks, 1,
                     [&](int64_t begin, int64_t end) { kernel(p, job, begin, end); });
  });
  return finish_moments(partial, starts, chunks, in.x0.scalar_type());
}

TORCH_LIBRARY_IMPL(deepkern, CPU, m) {
  m.impl("sde_euler", &euler_cpu);
  m.impl("sde_normals", &normals_cpu);
  m.impl("sde_monte_carlo", &monte_carlo_cpu);
}

}  // namespace deepkern::sde
