// Log-domain loopy belief propagation arithmetic for one directed edge, written once for the CPU
// loop and the CUDA kernel. A message update reads the cavity of its source node,
//
//   c(a) = unary[src](a) + sum of the messages into src - m[reverse](a),
//
// and gives m'(b) = reduce_a (c(a) + pairwise(a, b)), normalised over b, then damped. States
// are few (at most kMaxStates); the loops over them unroll when the count is a template constant
// (kFixed > 0) and run to the runtime count otherwise (kFixed == 0).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/device_math.h"

namespace deepkern::graph {

enum BPMode : int64_t { kSumProduct = 0, kMaxProduct = 1 };

// Per-thread state arrays live on the stack (registers or local memory on the GPU).
constexpr int kMaxStates = 32;

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T bp_max(T a, T b) {
  return a < b ? b : a;
}

template <int kFixed>
C10_HOST_DEVICE C10_ALWAYS_INLINE int state_count(int states) {
  return kFixed > 0 ? kFixed : states;
}

// The smallest sum of scaled kernel terms the fast sum-product path trusts. Terms below the
// smallest normal number lose precision or vanish; as long as the sum stays 1 / epsilon times
// above it, what they could have added is below the type's relative precision.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T trusted_sum() {
  return std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
}

// x - logsumexp(x) (sum-product) or x - max(x) (max-product), in place.
template <typename T, int kFixed>
C10_HOST_DEVICE C10_ALWAYS_INLINE void normalise(int states, bool sum_product, T* x) {
  const int S = state_count<kFixed>(states);
  T top = x[0];
  for (int b = 1; b < S; ++b) top = bp_max(top, x[b]);
  T shift = top;
  if (sum_product) {
    T total = T(0);
    for (int b = 0; b < S; ++b) total += math::exp(x[b] - top);
    shift = top + math::log(total);
  }
  for (int b = 0; b < S; ++b) x[b] -= shift;
}

// Sum-product constants of one edge, computed once per call so that an update needs S
// exponentials and S logarithms instead of S^2 exponentials: with col(b) = max_a P(a, b) and
// top = max_b col(b),
//   kernel(a, b) = exp(P(a, b) - col(b)) in (0, 1],  shift(b) = col(b) - top,
//   scale(b) = exp(shift(b)) in (0, 1].
template <typename T, int kFixed>
C10_HOST_DEVICE C10_ALWAYS_INLINE void prepare_sum_edge(int states, const T* pair, T* kernel,
                                                        T* shift, T* scale) {
  const int S = state_count<kFixed>(states);
  T col[kFixed > 0 ? kFixed : kMaxStates];
  for (int b = 0; b < S; ++b) col[b] = pair[b];
  for (int a = 1; a < S; ++a) {
    for (int b = 0; b < S; ++b) col[b] = bp_max(col[b], pair[a * S + b]);
  }
  T top = col[0];
  for (int b = 1; b < S; ++b) top = bp_max(top, col[b]);
  for (int a = 0; a < S; ++a) {
    for (int b = 0; b < S; ++b) kernel[a * S + b] = math::exp(pair[a * S + b] - col[b]);
  }
  for (int b = 0; b < S; ++b) {
    shift[b] = col[b] - top;
    scale[b] = math::exp(shift[b]);
  }
}

// Normalised sum-product message from the cavity c: m(b) = log sum_a exp(c(a) + P(a, b)) minus
// its logsumexp over b. With w(a) = exp(c(a) - max c) and u(b) = sum_a w(a) kernel(a, b),
//   m(b) = log(u(b) / sum_b' u(b') scale(b')) + shift(b).
// When some u(b) is too small to trust (extreme potentials), the edge is recomputed with the
// max-shifted logsumexp over (a, b) directly.
template <typename T, int kFixed>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sum_product_message(int states, const T* cavity,
                                                           const T* pair, const T* kernel,
                                                           const T* shift, const T* scale, T* out) {
  const int S = state_count<kFixed>(states);
  T top = cavity[0];
  for (int a = 1; a < S; ++a) top = bp_max(top, cavity[a]);
  for (int b = 0; b < S; ++b) out[b] = T(0);
  for (int a = 0; a < S; ++a) {
    const T w = math::exp(cavity[a] - top);
    for (int b = 0; b < S; ++b) out[b] += w * kernel[a * S + b];
  }

  T total = T(0);
  T smallest = out[0];
  for (int b = 0; b < S; ++b) {
    total += out[b] * scale[b];
    smallest = smallest < out[b] ? smallest : out[b];
  }
  if (smallest >= trusted_sum<T>()) {
    const T inverse = T(1) / total;
    for (int b = 0; b < S; ++b) out[b] = math::log(out[b] * inverse) + shift[b];
    return;
  }

  for (int b = 0; b < S; ++b) {
    T peak = cavity[0] + pair[b];
    for (int a = 1; a < S; ++a) peak = bp_max(peak, cavity[a] + pair[a * S + b]);
    T sum = T(0);
    for (int a = 0; a < S; ++a) sum += math::exp(cavity[a] + pair[a * S + b] - peak);
    out[b] = peak + math::log(sum);
  }
  normalise<T, kFixed>(states, true, out);
}

// Two states. Only the cavity difference d = c(0) - c(1) matters, so that an update needs one
// exponential and two logarithms: with the edge weights W(a, b) = exp(P(a, b) - max P) in (0, 1]
// and t = exp(-|d|), the larger cavity state weighs 1 and the other t, and
//   v(b) = w(0) W(0, b) + w(1) W(1, b),   m(b) = log(v(b) / (v(0) + v(1))).
// `trusted` is false when some v(b) is too small for this to hold to rounding (then the first
// and second values are 0 and the caller takes the generic path).
template <typename T>
struct BinaryMessage {
  T first;
  T second;
  bool trusted;
};

template <typename T, typename Exp, typename Log>
C10_HOST_DEVICE C10_ALWAYS_INLINE BinaryMessage<T> binary_sum_message(T d, T w00, T w01, T w10,
                                                                      T w11, Exp exp_fn,
                                                                      Log log_fn) {
  const T t = exp_fn(d < T(0) ? d : -d);
  const bool zero_leads = d >= T(0);
  const T weight0 = zero_leads ? T(1) : t;
  const T weight1 = zero_leads ? t : T(1);
  const T v0 = weight0 * w00 + weight1 * w10;
  const T v1 = weight0 * w01 + weight1 * w11;
  const bool trusted = (v0 < v1 ? v0 : v1) >= trusted_sum<T>();
  const T inverse = T(1) / (v0 + v1);
  const T first = log_fn(trusted ? v0 * inverse : T(1));
  const T second = log_fn(trusted ? v1 * inverse : T(1));
  return {first, second, trusted};
}

// damping * old + (1 - damping) * fresh, normalised again (two-state normalise).
template <typename T, typename Exp, typename Log>
C10_HOST_DEVICE C10_ALWAYS_INLINE void damp_binary(T damping, T undamped, T old_first, T old_second,
                                                   T& first, T& second, Exp exp_fn, Log log_fn) {
  const T x0 = damping * old_first + undamped * first;
  const T x1 = damping * old_second + undamped * second;
  const T gap = x0 - x1;
  const T top = gap < T(0) ? x1 : x0;
  const T shift = top + log_fn(T(1) + exp_fn(gap < T(0) ? gap : -gap));
  first = x0 - shift;
  second = x1 - shift;
}

// Normalised max-product message: m(b) = max_a (c(a) + P(a, b)) minus its maximum over b.
template <typename T, int kFixed>
C10_HOST_DEVICE C10_ALWAYS_INLINE void max_product_message(int states, const T* cavity,
                                                           const T* pair, T* out) {
  const int S = state_count<kFixed>(states);
  for (int b = 0; b < S; ++b) out[b] = cavity[0] + pair[b];
  for (int a = 1; a < S; ++a) {
    for (int b = 0; b < S; ++b) out[b] = bp_max(out[b], cavity[a] + pair[a * S + b]);
  }
  normalise<T, kFixed>(states, false, out);
}

// Damps the fresh message `out` towards the previous one (and normalises again) when damping is
// on, and returns the largest absolute change of the message. A NaN change stays NaN, so that a
// graph whose messages broke never counts as converged.
template <typename T, int kFixed>
C10_HOST_DEVICE C10_ALWAYS_INLINE T finish_message(int states, bool sum_product, T damping,
                                                   T undamped, const T* old, T* out) {
  const int S = state_count<kFixed>(states);
  if (damping != T(0)) {
    for (int b = 0; b < S; ++b) out[b] = damping * old[b] + undamped * out[b];
    normalise<T, kFixed>(states, sum_product, out);
  }
  T change = T(0);
  for (int b = 0; b < S; ++b) {
    const T d = out[b] - old[b];
    const T magnitude = d < T(0) ? -d : d;
    change = (magnitude > change || magnitude != magnitude) ? magnitude : change;
  }
  return change;
}

// Largest change so far, NaN-sticky like finish_message.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T worse_change(T so_far, T change) {
  return (change > so_far || change != change) ? change : so_far;
}

}  // namespace deepkern::graph
