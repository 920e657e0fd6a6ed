// Euler-Maruyama arithmetic for one path, written once for the CPU loop and the CUDA kernel:
//
//   X_{k+1} = X_k + mu(X_k) h + sqrt(h) Sigma Z_k,
//
// with Z_k drawn from Philox4x32-10 at the address (seed, path, step), so that any step of any
// path can be replayed without storing noise. Drift families: zero, linear A x + b, and a
// one-hidden-layer MLP W2 act(W1 x + b1) + b2. Sigma is a scalar, a diagonal or a lower-
// triangular matrix.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device_math.h"
#include "common/philox.h"

namespace deepkern::sde {

enum DriftKind : int64_t { kZeroDrift = 0, kLinearDrift = 1, kMlpDrift = 2 };
enum Activation : int64_t { kTanh = 0, kRelu = 1, kSoftplus = 2, kSine = 3 };
enum SigmaKind : int64_t { kScalarSigma = 0, kDiagonalSigma = 1, kTriangularSigma = 2 };
enum Functional : int64_t { kSquaredNorm = 0, kBasketCall = 1, kMaxCall = 2, kAffine = 3 };

// Everything one path needs, as raw pointers into contiguous tensors of type T.
template <typename T>
struct Problem {
  int64_t dim;
  int64_t hidden;
  int64_t drift_kind;
  int64_t activation;
  int64_t sigma_kind;
  const T* sigma;
  const T* matrix;      // linear: A [dim, dim]; MLP: W1 [hidden, dim]
  const T* bias;        // linear: b [dim];      MLP: b1 [hidden]
  const T* out_matrix;  // MLP: W2 [dim, hidden]
  const T* out_bias;    // MLP: b2 [dim]
  T h;
  T sqrt_h;
  uint32_t key0;
  uint32_t key1;
  bool antithetic;
};

// a * b + c with one rounding. Every multiply-add of the sde arithmetic is written this way and
// the sources are compiled without contraction, so the CPU tiers and the GPU round alike.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T fused(T a, T b, T c) {
  return math::fma(a, b, c);
}

// Constants of exp_minus_one for float and double: round-to-integer shifter, ln 2 in two parts,
// and the Taylor degree of expm1 on [-ln2 / 2, ln2 / 2] that reaches the type's precision.
template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float kLn2High = 0.693145752f;
  static constexpr float kLn2Low = 1.42860677e-6f;
  static constexpr int kDegree = 7;
  static constexpr int kMantissaBits = 23;
  static constexpr int kExponentBias = 127;
};

template <>
struct ExpConstants<double> {
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2High = 6.93147180369123816490e-01;
  static constexpr double kLn2Low = 1.90821492927058770002e-10;
  static constexpr int kDegree = 13;
  static constexpr int kMantissaBits = 52;
  static constexpr int kExponentBias = 1023;
};

template <typename T>
C10_HOST_DEVICE constexpr T factorial(int n) {
  return n <= 1 ? T(1) : T(n) * factorial<T>(n - 1);
}

// 2^k for an integral k within the normal range, built from its bits.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T power_of_two(T k) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const Bits bits = static_cast<Bits>(static_cast<int32_t>(k) + ExpConstants<T>::kExponentBias)
                    << ExpConstants<T>::kMantissaBits;
  T value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// e^y - 1 for y in [-40, 0], accurate relative to the result for small |y| as well: y = k ln2 + r
// with |r| <= ln2 / 2, e^y - 1 = 2^k (e^r - 1) + (2^k - 1), and e^r - 1 from its Taylor series.
// Branch-free, so CPU loops of it vectorise.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T exp_minus_one(T y) {
  using C = ExpConstants<T>;
  const T k = (y * T(1.4426950408889634) + C::kShifter) - C::kShifter;  // round(y / ln2)
  const T r = fused(-k, C::kLn2Low, fused(-k, C::kLn2High, y));
  // e^r - 1 = r + r^2 (1/2! + r (1/3! + ... + r / D!)), by Horner's rule.
  T series = T(1) / factorial<T>(C::kDegree);
  for (int n = C::kDegree - 1; n >= 2; --n) series = fused(series, r, T(1) / factorial<T>(n));
  const T expm1_r = fused(series, r * r, r);
  const T scale = power_of_two(k);
  return fused(scale, expm1_r, scale - T(1));
}

// tanh(z) = -t / (2 + t) with t = e^(-2|z|) - 1, signed; |z| beyond 20 gives +-1 exactly.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T tanh_of(T z) {
  const T magnitude = z < T(0) ? -z : z;
  const T clamped = magnitude < T(20) ? magnitude : T(20);
  const T t = exp_minus_one(T(-2) * clamped);
  const T value = -t / (T(2) + t);
  return z < T(0) ? -value : value;
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activate(int64_t activation, T z) {
  switch (activation) {
    case kTanh:
      return tanh_of(z);
    case kRelu:
      return z > T(0) ? z : T(0);
    case kSoftplus:  // log(1 + e^z) without overflow for large z
      return z > T(20) ? z : ::log1p(::exp(z));
    default:
      return ::sin(z);
  }
}

// The d normals of one (path, step): ceil(d / 4) Philox blocks, counter (path, step, block).
// Antithetic pairs (2j, 2j + 1) share the normals of j with opposite signs.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void draw_normals(const Problem<T>& p, int64_t path, int64_t step,
                                                    T* z) {
  uint64_t source = static_cast<uint64_t>(path);
  T sign = T(1);
  if (p.antithetic) {
    sign = (source & 1) ? T(-1) : T(1);
    source >>= 1;
  }
  for (int64_t block = 0; block * 4 < p.dim; ++block) {
    const philox::Block counter{{static_cast<uint32_t>(source), static_cast<uint32_t>(source >> 32),
                                 static_cast<uint32_t>(step), static_cast<uint32_t>(block)}};
    float normals[4];
    philox::normals4(philox::philox4x32_10(counter, p.key0, p.key1), normals);
    for (int lane = 0; lane < 4 && block * 4 + lane < p.dim; ++lane) {
      z[block * 4 + lane] = sign * static_cast<T>(normals[lane]);
    }
  }
}

// mu(x) into `out`; `hidden` holds p.hidden values of scratch for the MLP.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void drift(const Problem<T>& p, const T* x, T* out, T* hidden) {
  const int64_t d = p.dim;
  if (p.drift_kind == kZeroDrift) {
    for (int64_t i = 0; i < d; ++i) out[i] = T(0);
    return;
  }
  if (p.drift_kind == kLinearDrift) {
    for (int64_t i = 0; i < d; ++i) {
      T acc = p.bias[i];
      for (int64_t j = 0; j < d; ++j) acc = fused(p.matrix[i * d + j], x[j], acc);
      out[i] = acc;
    }
    return;
  }
  for (int64_t u = 0; u < p.hidden; ++u) {
    T acc = p.bias[u];
    for (int64_t j = 0; j < d; ++j) acc = fused(p.matrix[u * d + j], x[j], acc);
    hidden[u] = activate(p.activation, acc);
  }
  for (int64_t i = 0; i < d; ++i) {
    T acc = p.out_bias[i];
    for (int64_t u = 0; u < p.hidden; ++u) {
      acc = fused(p.out_matrix[i * p.hidden + u], hidden[u], acc);
    }
    out[i] = acc;
  }
}

// Sigma z, in place of z's copy `out`.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void apply_sigma(const Problem<T>& p, const T* z, T* out) {
  const int64_t d = p.dim;
  if (p.sigma_kind == kScalarSigma) {
    for (int64_t i = 0; i < d; ++i) out[i] = p.sigma[0] * z[i];
  } else if (p.sigma_kind == kDiagonalSigma) {
    for (int64_t i = 0; i < d; ++i) out[i] = p.sigma[i] * z[i];
  } else {
    for (int64_t i = 0; i < d; ++i) {
      T acc = T(0);
      for (int64_t j = 0; j <= i; ++j) acc = fused(p.sigma[i * d + j], z[j], acc);
      out[i] = acc;
    }
  }
}

// Scratch for one path: z, Sigma z and mu, d values each, then `hidden` values.
template <typename T>
struct Scratch {
  T* z;
  T* noise;
  T* mu;
  T* hidden;
};

// x + mu h + sqrt(h) noise, rounded the same way everywhere.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T update(T x, T mu, T noise, const Problem<T>& p) {
  return x + fused(mu, p.h, p.sqrt_h * noise);
}

// One Euler-Maruyama step of one path, in place.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void euler_step(const Problem<T>& p, int64_t path, int64_t step,
                                                  T* x, Scratch<T> s) {
  draw_normals(p, path, step, s.z);
  apply_sigma(p, s.z, s.noise);
  drift(p, x, s.mu, s.hidden);
  for (int64_t i = 0; i < p.dim; ++i) x[i] = update(x[i], s.mu[i], s.noise[i], p);
}

// The terminal functional of one path, in double.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE double functional(int64_t kind, const T* x, int64_t d,
                                                    const T* weights, double offset,
                                                    bool log_coordinates) {
  double acc = kind == kMaxCall ? -INFINITY : 0.0;
  for (int64_t i = 0; i < d; ++i) {
    const double value = static_cast<double>(x[i]);
    const double y = log_coordinates ? ::exp(value) : value;
    if (kind == kSquaredNorm) {
      acc += value * value;
    } else if (kind == kMaxCall) {
      acc = y > acc ? y : acc;
    } else {
      acc += static_cast<double>(weights[i]) * y;
    }
  }
  if (kind == kBasketCall || kind == kMaxCall) {
    const double payoff = acc - offset;
    return payoff > 0.0 ? payoff : 0.0;
  }
  return kind == kAffine ? acc + offset : acc;
}

// Welford's running mean and sum of squared deviations; merge() is Chan's pairwise update.
struct Moments {
  double count;
  double mean;
  double m2;

  C10_HOST_DEVICE inline void add(double value) {
    count += 1.0;
    const double delta = value - mean;
    mean += delta / count;
    m2 += delta * (value - mean);
  }

  C10_HOST_DEVICE inline void merge(const Moments& other) {
    if (other.count == 0.0) return;
    const double total = count + other.count;
    const double delta = other.mean - mean;
    mean += delta * other.count / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }
};

}  // namespace deepkern::sde
