// Exponential and logarithm for the CPU sum-product kernel, written branch-free with integer bit
// arithmetic only, so that the compiler vectorises loops over arrays of them (the C library's
// calls would keep those loops scalar). Both are within a few units in the last place:
//
//   exp(x) for x <= 0: x = k ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial (degree 7
//     for float, 13 for double), times 2^k built in the exponent bits. Arguments below the
//     smallest normal result give 0; the kernel's trusted-sum test catches what that drops.
//   log(y) for normal y > 0: y = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
//     s = (m - 1) / (m + 1) by its odd series (to s^9 for float, s^21 for double).
#pragma once

#include <bit>
#include <cstdint>

namespace deepkern::graph {

template <typename T>
struct MathBits;

template <>
struct MathBits<float> {
  using Int = int32_t;
  static constexpr int kMantissa = 23;
  static constexpr Int kBias = 127;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLowest = -87.0f;        // e^x stays a normal float above this
  static constexpr int kExpDegree = 7;
  static constexpr int kLogTerms = 5;  // s, s^3 / 3, ..., s^9 / 9
  static constexpr float kLn2High = 0.693359375f;
  static constexpr float kLn2Low = -2.12194440e-4f;
};

template <>
struct MathBits<double> {
  using Int = int64_t;
  static constexpr int kMantissa = 52;
  static constexpr Int kBias = 1023;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLowest = -708.0;
  static constexpr int kExpDegree = 13;
  static constexpr int kLogTerms = 11;  // s, s^3 / 3, ..., s^21 / 21
  static constexpr double kLn2High = 6.93147180369123816490e-01;
  static constexpr double kLn2Low = 1.90821492927058770002e-10;
};

// 1 / i for i < 24, rounded once.
template <typename T>
constexpr T kInverse[24] = {T(0),      T(1),      T(1) / 2,  T(1) / 3,  T(1) / 4,  T(1) / 5,
                            T(1) / 6,  T(1) / 7,  T(1) / 8,  T(1) / 9,  T(1) / 10, T(1) / 11,
                            T(1) / 12, T(1) / 13, T(1) / 14, T(1) / 15, T(1) / 16, T(1) / 17,
                            T(1) / 18, T(1) / 19, T(1) / 20, T(1) / 21, T(1) / 22, T(1) / 23};

template <typename T>
__attribute__((always_inline)) inline T vector_exp(T x) {
  using B = MathBits<T>;
  using Int = typename B::Int;
  const T clamped = x < B::kLowest ? B::kLowest : x;
  const T shifted = clamped * T(1.4426950408889634) + B::kShifter;
  const T k = shifted - B::kShifter;
  const T r = (clamped - k * B::kLn2High) - k * B::kLn2Low;
  // e^r = 1 + r (1 + r/2 (1 + r/3 (... (1 + r/n)))), by Horner from the inside out.
  T poly = T(1);
#pragma GCC unroll 16
  for (int i = B::kExpDegree; i >= 1; --i) poly = poly * (r * kInverse<T>[i]) + T(1);
  // The shifter's low mantissa bits hold k; move k + bias into the exponent field.
  const Int k_bits = std::bit_cast<Int>(shifted) - std::bit_cast<Int>(B::kShifter);
  const T scale = std::bit_cast<T>(static_cast<Int>((k_bits + B::kBias) << B::kMantissa));
  const T result = poly * scale;
  return x < B::kLowest ? T(0) : result;
}

template <typename T>
__attribute__((always_inline)) inline T vector_log(T y) {
  using B = MathBits<T>;
  using Int = typename B::Int;
  const Int bits = std::bit_cast<Int>(y);
  const Int mantissa_mask = (Int(1) << B::kMantissa) - 1;
  const Int one_bits = B::kBias << B::kMantissa;
  T m = std::bit_cast<T>(static_cast<Int>((bits & mantissa_mask) | one_bits));  // in [1, 2)
  // The exponent as a float without an integer conversion: the bits of 2^mantissa + field.
  const Int field = (bits >> B::kMantissa) & ((Int(1) << (8 * sizeof(T) - 1 - B::kMantissa)) - 1);
  const T two_to_mantissa =
      std::bit_cast<T>(static_cast<Int>((B::kBias + B::kMantissa) << B::kMantissa));
  T e = std::bit_cast<T>(static_cast<Int>(std::bit_cast<Int>(two_to_mantissa) | field)) -
        two_to_mantissa - T(B::kBias);
  const bool high = m > T(1.4142135623730951);
  m = high ? m * T(0.5) : m;
  e = high ? e + T(1) : e;
  const T s = (m - T(1)) / (m + T(1));
  const T z = s * s;
  T series = kInverse<T>[2 * B::kLogTerms - 1];
#pragma GCC unroll 16
  for (int i = B::kLogTerms - 2; i >= 0; --i) series = series * z + kInverse<T>[2 * i + 1];
  return e * B::kLn2High + (e * B::kLn2Low + T(2) * s * series);
}

}  // namespace deepkern::graph
