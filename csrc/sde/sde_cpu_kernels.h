// The CPU kernels of the sde family, compiled once per instruction-set tier (generic, AVX2,
// AVX-512) from the same source, and the choice among them at run time. Every tier computes the
// same bits: the arithmetic is IEEE with explicit fused multiply-adds and no contraction.
#pragma once

#include <cstdint>
#include <string>

#include "sde/sde.h"

namespace deepkern::sde {

template <typename T>
struct EulerJob {
  const T* start;  // [paths, dim]
  T* out;          // [paths, dim] or [paths, saves, dim]
  int64_t steps;
  int64_t first_step;
  int64_t save_every;
  int64_t saves;
};

template <typename T>
struct NormalsJob {
  T* out;  // [steps, paths, dim]
  int64_t paths;
  int64_t first_step;
};

template <typename T>
struct MonteCarloJob {
  const T* start;    // [starts, dim]
  const T* weights;  // [dim]
  int64_t paths;     // per start point
  int64_t steps;
  int64_t chunk_paths;
  int64_t chunks;  // per start point
  int64_t functional;
  double offset;
  bool log_coordinates;
  Moments* partial;  // [starts * chunks]
};

// Each kernel handles a range of its job: paths [begin, end), rows (step, path) of the normals
// [begin, end), or Monte Carlo chunks [begin, end).
template <typename T>
struct CpuKernels {
  void (*euler)(const Problem<T>&, const EulerJob<T>&, int64_t begin, int64_t end);
  void (*normals)(const Problem<T>&, const NormalsJob<T>&, int64_t begin, int64_t end);
  void (*monte_carlo)(const Problem<T>&, const MonteCarloJob<T>&, int64_t begin, int64_t end);
};

namespace generic {
template <typename T>
CpuKernels<T> cpu_kernels();
}
namespace avx2 {
template <typename T>
CpuKernels<T> cpu_kernels();
}
namespace avx512 {
template <typename T>
CpuKernels<T> cpu_kernels();
}

// The kernels of the tier in use: the best this processor supports, unless lowered with
// set_cpu_capability or the DEEPKERN_CPU_CAPABILITY environment variable.
template <typename T>
CpuKernels<T> active_cpu_kernels();

// "generic", "avx2" or "avx512".
std::string cpu_capability();
// Selects a tier for the calls that follow (for tests and benchmarks); returns the previous one.
// Refuses a tier this build or this processor lacks.
std::string set_cpu_capability(const std::string& name);

}  // namespace deepkern::sde
