// Segment reduction arithmetic, written once and called from both the CPU loops and the CUDA
// kernels, so that the CPU tests exercise the same per-element code the GPU runs.
//
// A segment i covers rows rowptr[i] .. rowptr[i+1] of the values (or, for gather-reduce, edges
// rowptr[i] .. rowptr[i+1], each bringing weight[e] * x[col[e]]). Every output element is
// reduced by one thread in row order, so results do not depend on the thread count or device.
// Max and min keep the first row that reaches the extreme (ties go to the lower index) and let
// a NaN win over every number, as torch.amax and torch.amin do.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace deepkern::graph {

// The reduce codes of the schemas; deepkern.ops.graph maps the names onto them.
enum Reduce : int64_t { kSum = 0, kMean = 1, kMax = 2, kMin = 3 };

constexpr bool has_arg(int64_t reduce) { return reduce == kMax || reduce == kMin; }

// Whether `candidate` takes the place of the running extreme `best`. Strict comparisons keep
// the first of equal values; a NaN replaces a number and is never replaced.
template <int64_t reduce, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool replaces(T candidate, T best) {
  const bool nan_first = candidate != candidate && best == best;
  if constexpr (reduce == kMax) {
    return candidate > best || nan_first;
  } else {
    return candidate < best || nan_first;
  }
}

// The first row of a nonempty segment starts the reduction.
template <int64_t reduce, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void start(T value, int64_t index, T* acc, int64_t* arg) {
  *acc = value;
  if constexpr (has_arg(reduce)) *arg = index;
}

// Every later row joins it.
template <int64_t reduce, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void accumulate(T value, int64_t index, T* acc, int64_t* arg) {
  if constexpr (has_arg(reduce)) {
    if (replaces<reduce>(value, *acc)) {
      *acc = value;
      *arg = index;
    }
  } else {
    *acc += value;
  }
}

// The reduction of `count` rows: the mean divides the sum by the row count (not by the sum of
// the weights); an empty segment gives 0.
template <int64_t reduce, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T finish(T acc, int64_t count) {
  if (count == 0) return T(0);
  if constexpr (reduce == kMean) return acc / static_cast<T>(count);
  return acc;
}

// The gradient that output element (i, f) sends to row `index` of its segment of `count` rows:
// all of it for sum, a 1/count share for mean, and all of it to the arg row for max and min.
template <int64_t reduce, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T row_gradient(T grad, int64_t count, int64_t arg,
                                                 int64_t index) {
  if constexpr (reduce == kSum) {
    return grad;
  } else if constexpr (reduce == kMean) {
    return grad / static_cast<T>(count);
  } else {
    return arg == index ? grad : T(0);
  }
}

// Calls body(std::integral_constant<int64_t, reduce>) so that the loops are compiled once per
// reduction. The code is checked before any kernel runs.
template <typename Body>
inline void dispatch_reduce(int64_t reduce, Body&& body) {
  switch (reduce) {
    case kSum:
      body(std::integral_constant<int64_t, kSum>{});
      break;
    case kMean:
      body(std::integral_constant<int64_t, kMean>{});
      break;
    case kMax:
      body(std::integral_constant<int64_t, kMax>{});
      break;
    case kMin:
      body(std::integral_constant<int64_t, kMin>{});
      break;
    default:
      TORCH_CHECK(false, "reduce must be 0 (sum), 1 (mean), 2 (max) or 3 (min), got ", reduce);
  }
}

}  // namespace deepkern::graph
