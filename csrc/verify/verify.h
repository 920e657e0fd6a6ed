// Per-neuron arithmetic of the verify family, written once and called from both the CPU loops
// and the CUDA kernels, so that the CPU tests exercise the same code the GPU runs.
//
// Everything is computed in double, whatever the tensor dtype, and rounded outward once at the
// end: a float32 line or maximum is then sound against the exact activation, not only against
// float32 arithmetic. Three parts:
//
// - activation values and slopes (ReLU, sigmoid, tanh), evaluated without overflow;
// - linear relaxations: two lines that enclose the activation on [l, u];
// - the inner maximum of the Lagrangian dual, max over z in [l, u] of a z + c act(z).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/device_math.h"

namespace deepkern::verify {

// The kind codes of the schemas; deepkern.ops.verify maps the names onto them.
enum Kind : int64_t { kRelu = 0, kSigmoid = 1, kTanh = 2 };

// What a per-neuron check found, as bits OR-ed over all neurons; the host names the argument.
enum Status : int {
  kOk = 0,
  kLowerNotFinite = 1,
  kUpperNotFinite = 2,
  kLowerAboveUpper = 4,
  kSlopeOutside = 8,
  kLinearNotFinite = 16,
  kActNotFinite = 32,
};

// Steps for the tangent point of a line through an end of an interval. The bracket starts at
// most about 1400 wide (see tangent_bracket_end) and usually below 30; 48 halvings would leave
// it under 1e-13 wide. Newton steps inside the bracket close it to kTangentTolerance (relative)
// in six or seven evaluations on typical intervals, and a step that would leave the bracket
// halves it instead; the search stops after kBisectionSteps evaluations in any case. A bracket
// that narrow moves the slope by about 1e-12 of itself, far below the float32 margin.
constexpr int kBisectionSteps = 48;
constexpr double kTangentTolerance = 1e-12;

// The outward margin of the smooth relaxations, in units of the output dtype's epsilon times
// the size of the numbers summed in a line (about 1 for sigmoid and tanh). It covers the
// rounding of the double computation and PyTorch's own evaluation of the activation in the
// input dtype (a float32 sigmoid is within 2 ulps of the exact value).
constexpr double kMarginEps = 4.0;
constexpr double kDoubleEps = std::numeric_limits<double>::epsilon();

C10_HOST_DEVICE C10_ALWAYS_INLINE double vk_abs(double x) { return x < 0 ? -x : x; }

// NaN and infinity fail: x - x is NaN for both.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool finite(T x) {
  return x - x == T(0);
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// The nearest T at or above (round_up) or at or below (round_down) x. A float that rounded
// below x moves up by one ulp through its bit pattern: the pattern of a positive float grows
// with it and that of a negative one shrinks, and above either zero lies the smallest
// subnormal. Selects instead of calls, so that a loop over neurons vectorises.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T round_up(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    const float y = static_cast<float>(x);
    const uint32_t bits = float_bits(y);
    const uint32_t next_bits = y > 0 ? bits + 1u : (y < 0 ? bits - 1u : 1u);
    return static_cast<double>(y) < x ? bits_float(next_bits) : y;
  }
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T round_down(double x) {
  return -round_up<T>(-x);
}

// ---------------------------------------------------------------------------------------------
// Activations

C10_HOST_DEVICE C10_ALWAYS_INLINE double activation(int64_t kind, double x) {
  if (kind == kRelu) return x > 0 ? x : 0.0;
  if (kind == kTanh) return math::tanh(x);
  const double e = math::exp(-vk_abs(x));  // in (0, 1]: no overflow on either side
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

// act'(x); 0 at the ReLU kink.
C10_HOST_DEVICE C10_ALWAYS_INLINE double activation_slope(int64_t kind, double x) {
  if (kind == kRelu) return x > 0 ? 1.0 : 0.0;
  if (kind == kSigmoid) {
    const double e = math::exp(-vk_abs(x));
    return e / ((1.0 + e) * (1.0 + e));
  }
  const double e = math::exp(-2.0 * vk_abs(x));
  return 4.0 * e / ((1.0 + e) * (1.0 + e));
}

// Sigmoid and tanh are point-symmetric about (0, center): act(-x) = 2 center - act(x). Their
// slope peaks at 0 with the value peak.
C10_HOST_DEVICE C10_ALWAYS_INLINE double center_value(int64_t kind) {
  return kind == kSigmoid ? 0.5 : 0.0;
}
C10_HOST_DEVICE C10_ALWAYS_INLINE double peak_slope(int64_t kind) {
  return kind == kSigmoid ? 0.25 : 1.0;
}

// ---------------------------------------------------------------------------------------------
// Linear relaxations of sigmoid and tanh
//
// Both are convex on (-inf, 0] and concave on [0, inf). An upper line on [l, u]:
//   u <= 0 (convex):    the chord;
//   l >= 0 (concave):   the tangent at the midpoint;
//   l < 0 < u:          the line through (l, act(l)) tangent to the concave side at d > 0, or
//                       the chord when d >= u.
// The lower line is the upper line of the reflected interval [-u, -l], reflected back through
// the centre of symmetry: it is the chord on a concave piece, the midpoint tangent on a convex
// one, and the line through (u, act(u)) tangent to the convex side across the inflection point.
//
// The crossing case. With g(x) = (act(x) - act(l)) / (x - l), a line through (l, act(l)) with
// slope s lies above act on [l, u] exactly when s >= max over (l, u] of g. Since
//   g'(x) = h(x) / (x - l)^2,  h(x) = act'(x) (x - l) - (act(x) - act(l)),
// and h > 0 on (l, 0] (convexity), h' = act''(x) (x - l) < 0 on (0, inf) and h -> -(sup act -
// act(l)) < 0, h has one root d > 0 and g peaks there with g(d) = act'(d). So the slope is
// act'(min(d, u)) when d < u and the chord slope g(u) otherwise. The search for d keeps a point a
// with h(a) > 0, so a <= d, and returns act'(a) >= act'(d) (act' decreases on [0, inf)): the
// line stays above the activation even where the search is cut short, and act'(0) = peak, the
// starting point, is sound on its own.

// A line above the activation on [l, u] written through its left end: value + slope (x - l).
struct PivotLine {
  double slope;
  double value;  // at x = l
};

// h of the crossing case (see above), at x >= 0.
C10_HOST_DEVICE C10_ALWAYS_INLINE double tangent_gap(int64_t kind, double x, double l,
                                                     double act_l) {
  return activation_slope(kind, x) * (x - l) - (activation(kind, x) - act_l);
}

// h, h' = act''(x) (x - l) and act'(x) at x >= 0 from one exponential: with e = exp(-x),
// sigmoid(x) = 1 / (1 + e), sigmoid' = e / (1 + e)^2 and sigmoid'' = -sigmoid' (1 - e) / (1 + e);
// with e = exp(-2x), tanh(x) = (1 - e) / (1 + e), tanh' = 4e / (1 + e)^2 and tanh'' = -2 tanh
// tanh'. The slope is computed exactly as activation_slope computes it.
struct GapAt {
  double gap;
  double gap_slope;
  double slope;
};

C10_HOST_DEVICE C10_ALWAYS_INLINE GapAt tangent_gap_at(int64_t kind, double x, double l,
                                                       double act_l) {
  const double e = math::exp(kind == kSigmoid ? -x : -2.0 * x);
  const double p = 1.0 + e;
  double act, slope, curvature;
  if (kind == kSigmoid) {
    act = 1.0 / p;
    slope = e / (p * p);
    curvature = -slope * (1.0 - e) / p;
  } else {
    act = (1.0 - e) / p;
    slope = 4.0 * e / (p * p);
    curvature = -2.0 * act * slope;
  }
  return {slope * (x - l) - (act - act_l), curvature * (x - l), slope};
}

// The slope at the tangent point of the crossing case, approached from below: act' at the
// largest point found with h > 0, for l < 0 and 0 < right <= end (tangent_bracket_end) with
// h(right) < 0. Safeguarded Newton: the bracket (below, above) keeps h(below) > 0 >= h(above);
// a Newton step that leaves it, or has no slope to follow, halves it instead. Once Newton's
// steps shrink below the tolerance, the next point steps over the root by the tolerance, so
// that the bracket closes from both sides.
C10_HOST_DEVICE inline double tangent_slope(int64_t kind, double l, double act_l, double right,
                                            double end) {
  double below = 0.0;  // h(0) > 0 by convexity on (l, 0]
  double below_slope = peak_slope(kind);
  double above = right;
  // About where the tangent touches when act(l) is near its infimum, act'(x) (x - l) ~ 1:
  // log(1 - l) for sigmoid, log(1 - 2l) / 2 for tanh, read off the bracket's end.
  const double guess = kind == kSigmoid ? (end - 3.0) / 2 : (end - 1.5) / 2;
  double x = guess > 0 && guess < right / 2 ? guess : right / 2;
  for (int step = 0; step < kBisectionSteps; ++step) {
    const GapAt at = tangent_gap_at(kind, x, l, act_l);
    if (at.gap > 0) {
      below = x;
      below_slope = at.slope;
    } else {
      above = x;
    }
    const double tolerance = kTangentTolerance * (1.0 + below);
    if (above - below <= tolerance) break;
    double next = x - at.gap / at.gap_slope;
    if (vk_abs(next - x) <= tolerance) next += at.gap > 0 ? tolerance : -tolerance;
    if (!(next > below && next < above)) next = below + (above - below) / 2;
    x = next;
  }
  return below_slope;
}

// A point where h < 0 for the interval's left end l < 0: for sigmoid, 3 + 2 log(1 - l). There
// act'(x) < e^-x gives act'(x) (x - l) <= 3 e^-3 (1 - l) / (1 - l)^2 < 0.15, while act(x) -
// act(l) >= sigmoid(3) - 1/2 > 0.45. Tanh is a scaled sigmoid, tanh(x) = 2 sigmoid(2x) - 1, so
// its point is half the sigmoid's for 2l. In double it never passes 1422.
C10_HOST_DEVICE C10_ALWAYS_INLINE double tangent_bracket_end(int64_t kind, double l) {
  if (kind == kSigmoid) return 3.0 + 2.0 * math::log1p(-l);
  return 1.5 + math::log1p(-2.0 * l);
}

// The slope of the chord over [l, u], clamped to [lowest, highest], the range act' takes on
// [l, u]. The chord slope lies in that range (mean value theorem); the clamp keeps a narrow
// interval, where act(u) - act(l) is mostly rounding, from giving a wild slope.
C10_HOST_DEVICE C10_ALWAYS_INLINE double chord_slope(double l, double u, double act_l, double act_u,
                                                     double lowest, double highest) {
  const double width = u - l;
  double slope = width > 0 ? (act_u - act_l) / width : lowest;
  slope = slope < lowest ? lowest : slope;
  return slope > highest ? highest : slope;
}

// The upper line of sigmoid or tanh on [l, u], l <= u, both finite.
C10_HOST_DEVICE inline PivotLine smooth_upper_line(int64_t kind, double l, double u) {
  const double act_l = activation(kind, l);
  if (u <= 0) {
    // Convex piece: act' increases, from act'(l) to act'(u).
    const double slope = chord_slope(l, u, act_l, activation(kind, u), activation_slope(kind, l),
                                     activation_slope(kind, u));
    return {slope, act_l};
  }
  if (l >= 0) {
    // Concave piece: the tangent at the midpoint, written through l.
    const double middle = l + (u - l) / 2;
    const double slope = activation_slope(kind, middle);
    return {slope, activation(kind, middle) - slope * (middle - l)};
  }
  // Across the inflection point: is the tangent point d before u?
  const double end = tangent_bracket_end(kind, l);
  const double right = u < end ? u : end;
  if (!(tangent_gap(kind, right, l, act_l) < 0)) {
    // d >= u: g increases up to u, and the chord is the line. (h(end) < 0 holds in exact
    // arithmetic; should rounding say otherwise, the peak slope is sound on its own.)
    if (right < u) return {peak_slope(kind), act_l};
    const double act_u = activation(kind, u);
    return {chord_slope(l, u, act_l, act_u, 0.0, peak_slope(kind)), act_l};
  }
  return {tangent_slope(kind, l, act_l, right, end), act_l};
}

// Two lines in slope-bias form, rounded outward to T:
//   lower_slope x + lower_bias <= act(x) <= upper_slope x + upper_bias on [l, u].
template <typename T>
struct Lines {
  T lower_slope, lower_bias, upper_slope, upper_bias;
};

// Sigmoid or tanh. Slopes round up; the biases are then recomputed from the rounded slopes
// through the pivot, moved out by the margin and rounded outward. Rounding a slope up is sound
// because each line passes through its pivot at the end of the interval it faces away from:
// the upper line pivots at l and is only used at x >= l, the lower one at u for x <= u.
template <typename T>
C10_HOST_DEVICE inline Lines<T> smooth_relaxation(int64_t kind, T lower, T upper) {
  constexpr double eps = std::numeric_limits<T>::epsilon();
  const double l = static_cast<double>(lower);
  const double u = static_cast<double>(upper);

  const PivotLine up = smooth_upper_line(kind, l, u);
  const T upper_slope = round_up<T>(up.slope);
  const double up_shift = static_cast<double>(upper_slope) * l;
  const double up_margin = kMarginEps * eps * (1.0 + vk_abs(up.value) + vk_abs(up_shift));
  const T upper_bias = round_up<T>(up.value - up_shift + up_margin);

  // act(x) = 2 center - act(-x) >= 2 center - (value' + slope' (-x + u)) on [l, u].
  const PivotLine reflected = smooth_upper_line(kind, -u, -l);
  const double low_value = 2.0 * center_value(kind) - reflected.value;  // at x = u
  const T lower_slope = round_up<T>(reflected.slope);
  const double low_shift = static_cast<double>(lower_slope) * u;
  const double low_margin = kMarginEps * eps * (1.0 + vk_abs(low_value) + vk_abs(low_shift));
  const T lower_bias = round_down<T>(low_value - low_shift - low_margin);
  return {lower_slope, lower_bias, upper_slope, upper_bias};
}

// ReLU: exact lines for stable neurons; for unstable ones (l < 0 < u) the chord
// u (x - l) / (u - l) above and alpha x below. The chord slope and bias round up, and float64
// biases move up by a few ulps, so the chord stays above ReLU under rounding too. The chord is
// computed for every neuron and the stable ones select their exact lines over it, so that a
// loop over neurons has no branches and vectorises (a stable neuron's chord may be NaN or
// infinite; it is never selected).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE Lines<T> relu_relaxation(T lower, T upper, T alpha,
                                                           bool has_alpha) {
  const double l = static_cast<double>(lower);
  const double u = static_cast<double>(upper);
  const T chord_slope = round_up<T>(u / (u - l));
  const double bias = -static_cast<double>(chord_slope) * l;
  // In float64 the chord's value at u, slope * u + bias, may round below u by an ulp of u.
  const double margin =
      std::is_same_v<T, double>
          ? kMarginEps * kDoubleEps * (bias + static_cast<double>(chord_slope) * u)
          : 0.0;
  const T chord_bias = round_up<T>(bias + margin);
  const T unstable_lower_slope = has_alpha ? alpha : T(upper > -lower ? 1 : 0);

  const bool active = lower >= 0;
  const bool inactive = upper <= 0;
  const T stable_slope = active ? T(1) : T(0);
  const bool stable = active | inactive;
  return {stable ? stable_slope : unstable_lower_slope, T(0), stable ? stable_slope : chord_slope,
          stable ? T(0) : chord_bias};
}

// Whether one neuron's relaxation inputs pass every check of relaxation_status, without
// branches; relaxation_status names what failed.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool relaxation_valid(T lower, T upper, T alpha, bool has_alpha) {
  // Bitwise ands: every comparison is made, so none sits behind a branch.
  const bool alpha_ok = !has_alpha || ((alpha >= T(0)) & (alpha <= T(1)));
  return finite(lower) & finite(upper) & (lower <= upper) & alpha_ok;
}

// The checks of one neuron's relaxation inputs.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE int relaxation_status(T lower, T upper, const T* alpha) {
  int status = kOk;
  if (!finite(lower)) status |= kLowerNotFinite;
  if (!finite(upper)) status |= kUpperNotFinite;
  if (status == kOk && lower > upper) status |= kLowerAboveUpper;
  if (alpha != nullptr && !(*alpha >= T(0) && *alpha <= T(1))) status |= kSlopeOutside;
  return status;
}

// ---------------------------------------------------------------------------------------------
// The inner maximum of the Lagrangian dual: max over z in [l, u] of f(z) = a z + c act(z)
//
// ReLU is piecewise linear, so a maximum sits at l, u or the kink 0. Sigmoid and tanh are
// smooth: a maximum sits at l, u or a stationary point, act'(z) = r with r = -a / c. act' is
// even with values in (0, peak], so there are two (+-z0) when 0 < r <= peak and none otherwise:
//   tanh:    1 - tanh(z0)^2 = r,  tanh(z0) = t = sqrt(1 - r),
//            z0 = atanh(t) = log((1 + t) / sqrt(r))   (as 1 - t = r / (1 + t));
//   sigmoid: sigmoid'(z) = tanh'(z / 2) / 4, so z0 = 2 log((1 + q) / (2 sqrt(r))),
//            q = sqrt(1 - 4 r).
// Candidates outside [l, u] are clamped to it (they then repeat an end). The largest of the
// candidates' values wins, the first one on ties, in the order l, u, then the kink or -z0, +z0.

template <typename T>
struct DualMax {
  T value;
  T argmax;
};

// Half the distance between the stationary points, or -1 when there are none.
C10_HOST_DEVICE C10_ALWAYS_INLINE double stationary_point(int64_t kind, double a, double c) {
  if (c == 0) return -1.0;
  const double r = -a / c;
  if (!(r > 0 && r <= peak_slope(kind))) return -1.0;
  if (kind == kTanh) {
    const double t = math::sqrt(1.0 - r);
    return math::log((1.0 + t) / math::sqrt(r));
  }
  const double q = math::sqrt(1.0 - 4.0 * r);
  return 2.0 * math::log((1.0 + q) / (2.0 * math::sqrt(r)));
}

// The value rounds up, after a relative margin of a few double ulps for the double arithmetic:
// it bounds the true maximum from above, as a dual bound needs.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE DualMax<T> rounded_dual_max(T lower, T upper, double best_z,
                                                              double best_linear, double best_act) {
  const double margin = kMarginEps * kDoubleEps * (vk_abs(best_linear) + vk_abs(best_act));
  T argmax = static_cast<T>(best_z);
  argmax = argmax < lower ? lower : (argmax > upper ? upper : argmax);
  return {round_up<T>(best_linear + best_act + margin), argmax};
}

// ReLU: the ends, then the kink when l < 0 < u. Every candidate is evaluated and the winner
// selected, with no branches, so that a loop over neurons vectorises.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE DualMax<T> relu_dual_max(T lower, T upper, T linear, T act) {
  const double l = static_cast<double>(lower);
  const double u = static_cast<double>(upper);
  const double a = static_cast<double>(linear);
  const double c = static_cast<double>(act);
  const double linear_l = a * l;
  const double act_l = c * (l > 0 ? l : 0.0);
  const double linear_u = a * u;
  const double act_u = c * (u > 0 ? u : 0.0);
  const double linear_kink = a * 0.0;
  const double act_kink = c * 0.0;

  const bool take_u = linear_u + act_u > linear_l + act_l;
  double best_z = take_u ? u : l;
  double best_linear = take_u ? linear_u : linear_l;
  double best_act = take_u ? act_u : act_l;
  const bool take_kink = (l < 0) & (u > 0) & (linear_kink + act_kink > best_linear + best_act);
  best_z = take_kink ? 0.0 : best_z;
  best_linear = take_kink ? linear_kink : best_linear;
  best_act = take_kink ? act_kink : best_act;
  return rounded_dual_max<T>(lower, upper, best_z, best_linear, best_act);
}

template <typename T>
C10_HOST_DEVICE inline DualMax<T> dual_max(int64_t kind, T lower, T upper, T linear, T act) {
  if (kind == kRelu) return relu_dual_max<T>(lower, upper, linear, act);
  const double l = static_cast<double>(lower);
  const double u = static_cast<double>(upper);
  const double a = static_cast<double>(linear);
  const double c = static_cast<double>(act);

  // The ends first. A candidate clamped onto an end would repeat that end's value and lose the
  // tie, so only candidates strictly inside (l, u) are evaluated after them.
  double best_z = l;
  double best_linear = a * l;
  double best_act = c * activation(kind, l);
  double best = best_linear + best_act;
  const auto consider = [&](double z) {
    const double lin = a * z;
    const double nonlin = c * activation(kind, z);
    if (lin + nonlin > best) {
      best = lin + nonlin;
      best_z = z;
      best_linear = lin;
      best_act = nonlin;
    }
  };
  consider(u);
  const double z0 = stationary_point(kind, a, c);
  if (z0 >= 0) {
    if (-z0 > l && -z0 < u) consider(-z0);
    if (z0 > l && z0 < u) consider(z0);
  }
  return rounded_dual_max<T>(lower, upper, best_z, best_linear, best_act);
}

// Whether one neuron's dual inputs pass every check of dual_status, without branches.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool dual_valid(T lower, T upper, T linear, T act) {
  return relaxation_valid<T>(lower, upper, T(0), false) & finite(linear) & finite(act);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE int dual_status(T lower, T upper, T linear, T act) {
  int status = relaxation_status<T>(lower, upper, nullptr);
  if (!finite(linear)) status |= kLinearNotFinite;
  if (!finite(act)) status |= kActNotFinite;
  return status;
}

// ---------------------------------------------------------------------------------------------
// Interval linear maps in center-radius form

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void center_radius(T lower, T upper, T* center, T* radius) {
  *center = lower / 2 + upper / 2;  // halves first: no overflow near the largest finite value
  *radius = upper / 2 - lower / 2;
}

}  // namespace deepkern::verify
