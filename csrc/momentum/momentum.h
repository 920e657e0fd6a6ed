// Momentum ResNet step arithmetic, written once and called from both the CPU loop and the CUDA
// kernel, so that the CPU tests exercise the same per-element code the GPU runs.
//
// Float mode:   v' = gamma v + (1 - gamma) f(x),   x' = x + v'.
// Exact mode:   x and v are int64 fixed point with `frac_bits` fractional bits, gamma = numer /
//               denom. Multiplying v by gamma drops the remainder v mod denom; that remainder is
//               pushed onto a per-element arbitrary-precision integer (the "buffer", stored as
//               32-bit limbs), and log2(numer) bits are popped from it back into v, so the step
//               loses nothing and the inverse recovers x and v bit for bit.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace deepkern::momentum {

// ---------------------------------------------------------------------------------------------
// Float mode. `acc_t` is float for float16, bfloat16 and float32, and double for float64.

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void forward_step(scalar_t x, scalar_t v, scalar_t f, acc_t gamma,
                                         scalar_t* x_next, scalar_t* v_next) {
  const scalar_t v_new = static_cast<scalar_t>(gamma * static_cast<acc_t>(v) +
                                               (acc_t(1) - gamma) * static_cast<acc_t>(f));
  *v_next = v_new;
  *x_next = static_cast<scalar_t>(static_cast<acc_t>(x) + static_cast<acc_t>(v_new));
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void inverse_step(scalar_t x_next, scalar_t v_next, scalar_t f, acc_t gamma,
                                         scalar_t* x, scalar_t* v) {
  *x = static_cast<scalar_t>(static_cast<acc_t>(x_next) - static_cast<acc_t>(v_next));
  *v = static_cast<scalar_t>(
      (static_cast<acc_t>(v_next) - (acc_t(1) - gamma) * static_cast<acc_t>(f)) / gamma);
}

// `vjp` is J_f(x)^T applied to (1 - gamma) (grad_x_next + grad_v_next); the caller computes it
// with autograd because f is an arbitrary module.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void backward_step(scalar_t grad_x_next, scalar_t grad_v_next, scalar_t vjp,
                                          acc_t gamma, scalar_t* grad_x, scalar_t* grad_v) {
  const acc_t total = static_cast<acc_t>(grad_x_next) + static_cast<acc_t>(grad_v_next);
  *grad_x = static_cast<scalar_t>(static_cast<acc_t>(grad_x_next) + static_cast<acc_t>(vjp));
  *grad_v = static_cast<scalar_t>(gamma * total);
}

// ---------------------------------------------------------------------------------------------
// Exact mode.

// Fixed-point magnitudes stay below 2^61 and updates below 2^60, so no int64 sum below overflows;
// an element that leaves this range is counted as an error instead of wrapping silently.
constexpr int64_t kStateLimit = int64_t(1) << 61;
constexpr double kUpdateLimit = 1152921504606846976.0;  // 2^60

C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

C10_HOST_DEVICE inline int64_t floor_mod(int64_t a, int64_t b) {
  const int64_t r = a % b;
  return r < 0 ? r + b : r;
}

// buffer <- buffer * mul + add. Limbs are little-endian, `stride` apart. Returns the carry out
// of the top limb, which is zero whenever the caller sized the buffer by its growth bound.
C10_HOST_DEVICE inline uint32_t buffer_mul_add(uint32_t* limbs, int64_t stride, int64_t num_limbs,
                                               uint32_t mul, uint32_t add) {
  uint64_t carry = add;
  for (int64_t l = 0; l < num_limbs; ++l) {
    const uint64_t t = static_cast<uint64_t>(limbs[l * stride]) * mul + carry;
    limbs[l * stride] = static_cast<uint32_t>(t);
    carry = t >> 32;
  }
  return static_cast<uint32_t>(carry);
}

// buffer <- buffer / div (floor); returns buffer mod div. Long division from the top limb.
C10_HOST_DEVICE inline uint32_t buffer_divmod(uint32_t* limbs, int64_t stride, int64_t num_limbs,
                                              uint32_t div) {
  uint64_t rem = 0;
  for (int64_t l = num_limbs - 1; l >= 0; --l) {
    const uint64_t t = (rem << 32) | limbs[l * stride];
    limbs[l * stride] = static_cast<uint32_t>(t / div);
    rem = t % div;
  }
  return static_cast<uint32_t>(rem);
}

// The fixed-point update (1 - gamma) f, rounded half to even. A single multiply by a constant
// computed on the host, so CPU and GPU produce the same integer (no contraction is possible).
C10_HOST_DEVICE inline bool fixed_update(double f, double update_scale, int64_t* q) {
  const double scaled = ::rint(f * update_scale);
  if (!(scaled > -kUpdateLimit && scaled < kUpdateLimit)) {  // also catches NaN
    *q = 0;
    return false;
  }
  *q = static_cast<int64_t>(scaled);
  return true;
}

C10_HOST_DEVICE inline bool in_state_range(int64_t a) {
  return a > -kStateLimit && a < kStateLimit;
}

// One exact forward step for one element. Returns false when a value left the safe range (the
// caller counts these and the Python layer raises). `q` receives the update for the checksum.
//
// v * numer / denom is computed as floor((v numer + s) / denom), where s in [0, numer) is a
// digit popped from the buffer and the remainder of the division is pushed back onto it. The
// result is within one unit of the exact product, and the buffer grows by log2(denom / numer)
// bits. Writing v = a denom + r keeps every intermediate inside int64.
C10_HOST_DEVICE inline bool exact_forward_step(int64_t* x, int64_t* v, double f,
                                               double update_scale, uint32_t* limbs, int64_t stride,
                                               int64_t num_limbs, uint32_t numer, uint32_t denom,
                                               int64_t* q) {
  bool ok = fixed_update(f, update_scale, q) && in_state_range(*x) && in_state_range(*v);

  const int64_t high = floor_div(*v, denom);
  const int64_t low = floor_mod(*v, denom);
  const int64_t popped = buffer_divmod(limbs, stride, num_limbs, numer);
  const int64_t scaled_low = low * numer + popped;  // in [0, denom * numer)
  ok = (buffer_mul_add(limbs, stride, num_limbs, denom,
                       static_cast<uint32_t>(scaled_low % denom)) == 0) &&
       ok;

  if (ok) {
    *v = high * numer + scaled_low / denom + *q;
    *x = *x + *v;
    ok = in_state_range(*x) && in_state_range(*v);
  }
  return ok;
}

// The exact inverse of exact_forward_step, given f evaluated at the recovered x = x' - v'.
C10_HOST_DEVICE inline bool exact_inverse_step(int64_t* x, int64_t* v, double f,
                                               double update_scale, uint32_t* limbs, int64_t stride,
                                               int64_t num_limbs, uint32_t numer, uint32_t denom,
                                               int64_t* q) {
  bool ok = fixed_update(f, update_scale, q) && in_state_range(*x) && in_state_range(*v);
  if (!ok) return false;
  *x = *x - *v;
  const int64_t scaled_v = *v - *q;

  // scaled_v = high numer + floor(scaled_low / denom), whose second term lies in [0, numer).
  const int64_t high = floor_div(scaled_v, numer);
  const int64_t quotient_low = floor_mod(scaled_v, numer);
  const int64_t remainder = buffer_divmod(limbs, stride, num_limbs, denom);
  const int64_t scaled_low = quotient_low * denom + remainder;
  ok = buffer_mul_add(limbs, stride, num_limbs, numer, static_cast<uint32_t>(scaled_low % numer)) ==
       0;

  if (high >= kStateLimit / denom || high <= -(kStateLimit / denom)) return false;
  *v = high * denom + scaled_low / numer;
  return ok && in_state_range(*x) && in_state_range(*v);
}

// Position-sensitive checksum of the updates: sum over elements of q_i (2 i + 1) mod 2^64.
// Integer addition commutes, so any thread partition gives the same value.
C10_HOST_DEVICE inline uint64_t checksum_term(int64_t q, int64_t index) {
  return static_cast<uint64_t>(q) * (2 * static_cast<uint64_t>(index) + 1);
}

}  // namespace deepkern::momentum
