// Elementary functions that the per-element arithmetic calls from host and device code alike:
// on the GPU the CUDA math library (its float versions for float, so float kernels stay in
// single precision), on the CPU the C++ standard library.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace deepkern::math {

#ifdef __CUDA_ARCH__
#define DEEPKERN_UNARY_MATH(name)                 \
  template <typename T>                           \
  C10_HOST_DEVICE C10_ALWAYS_INLINE T name(T x) { \
    if constexpr (std::is_same_v<T, float>)       \
      return ::name##f(x);                        \
    else                                          \
      return ::name(x);                           \
  }
#else
#define DEEPKERN_UNARY_MATH(name)                 \
  template <typename T>                           \
  C10_HOST_DEVICE C10_ALWAYS_INLINE T name(T x) { \
    return std::name(x);                          \
  }
#endif

DEEPKERN_UNARY_MATH(exp)
DEEPKERN_UNARY_MATH(log)
DEEPKERN_UNARY_MATH(log1p)
DEEPKERN_UNARY_MATH(sqrt)
DEEPKERN_UNARY_MATH(tanh)

#undef DEEPKERN_UNARY_MATH

// a * b + c with one rounding.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T fma(T a, T b, T c) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>)
    return ::fmaf(a, b, c);
  else
    return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace deepkern::math
