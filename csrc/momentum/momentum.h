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

// Fixed-point magnitudes stay below 2^52 and updates below 2^51: every value is then exact in a
// double, which makes the divisions below cheap, and no int64 sum can overflow. An element that
// leaves this range is counted as an error instead of wrapping silently.
constexpr int64_t kStateLimit = int64_t(1) << 52;
constexpr double kUpdateLimit = 2251799813685248.0;  // 2^51

// Division by a small constant (at most 2^16) through a floating-point reciprocal and one
// correction step: several times faster than a 64-bit integer division on both CPU and GPU,
// and exact for dividends below 2^49, where the estimate is off by at most one.
struct SmallDivisor {
  uint32_t value;
  double inverse;
};

inline SmallDivisor make_divisor(uint32_t value) { return {value, 1.0 / value}; }

// One branch-free correction of a quotient estimate: moves (q, r) one step towards
// 0 <= r < d in each direction. Data-dependent branches here would mispredict about half the
// time and cost more than the arithmetic.
C10_HOST_DEVICE C10_ALWAYS_INLINE void correct_quotient(int64_t* q, int64_t* r, int64_t d) {
  const int64_t below = *r >> 63;  // -1 when r < 0, else 0
  *q += below;
  *r += d & below;
  const int64_t above = ~((*r - d) >> 63);  // -1 when r >= d, else 0
  *q -= above;
  *r -= d & above;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint64_t divide(uint64_t t, SmallDivisor d, uint64_t* remainder) {
  // Through int64: a signed conversion is one instruction on x86-64, an unsigned one is not.
  const int64_t dividend = static_cast<int64_t>(t);
  int64_t q = static_cast<int64_t>(static_cast<double>(dividend) * d.inverse);
  int64_t r = dividend - q * static_cast<int64_t>(d.value);
  correct_quotient(&q, &r, d.value);
  *remainder = static_cast<uint64_t>(r);
  return static_cast<uint64_t>(q);
}

// Floor division of a signed value below 2^53 in magnitude (exact as a double): a = q d + r with
// 0 <= r < d. The reciprocal's error and the truncation put the estimate at most two away.
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t floor_divmod(int64_t a, SmallDivisor d,
                                                       int64_t* remainder) {
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * d.inverse);
  int64_t r = a - q * static_cast<int64_t>(d.value);
  correct_quotient(&q, &r, d.value);
  correct_quotient(&q, &r, d.value);
  *remainder = r;
  return q;
}

// out <- in / div (floor), returning in mod div: long division from the top limb. `in` has
// in_limbs limbs and `out` out_limbs, both `stride` apart. Limbs of out above in_limbs are
// zeroed; quotient limbs that do not fit in out must be zero, else *fits becomes false.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t buffer_divmod(const uint32_t* in, int64_t in_limbs,
                                                         uint32_t* out, int64_t out_limbs,
                                                         int64_t stride, SmallDivisor div,
                                                         bool* fits) {
  for (int64_t l = in_limbs; l < out_limbs; ++l) out[l * stride] = 0;
  uint64_t rem = 0;
  for (int64_t l = in_limbs - 1; l >= 0; --l) {
    const uint64_t q = divide((rem << 32) | in[l * stride], div, &rem);
    if (l < out_limbs) {
      out[l * stride] = static_cast<uint32_t>(q);
    } else {
      *fits = *fits && q == 0;
    }
  }
  return static_cast<uint32_t>(rem);
}

// buffer <- buffer * mul + add, in place. Returns the carry out of the top limb, which is zero
// whenever the caller sized the buffer by its growth bound.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t buffer_mul_add(uint32_t* limbs, int64_t num_limbs,
                                                          int64_t stride, uint32_t mul,
                                                          uint32_t add) {
  uint64_t carry = add;
  for (int64_t l = 0; l < num_limbs; ++l) {
    const uint64_t t = static_cast<uint64_t>(limbs[l * stride]) * mul + carry;
    limbs[l * stride] = static_cast<uint32_t>(t);
    carry = t >> 32;
  }
  return static_cast<uint32_t>(carry);
}

// The fixed-point update (1 - gamma) f, rounded half to even. A single multiply by a constant
// computed on the host, so CPU and GPU produce the same integer (no contraction is possible).
C10_HOST_DEVICE C10_ALWAYS_INLINE bool fixed_update(double f, double update_scale, int64_t* q) {
  const double scaled = ::rint(f * update_scale);
  if (!(scaled > -kUpdateLimit && scaled < kUpdateLimit)) {  // also catches NaN
    *q = 0;
    return false;
  }
  *q = static_cast<int64_t>(scaled);
  return true;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE bool in_state_range(int64_t a) {
  return a > -kStateLimit && a < kStateLimit;
}

// The buffer of one element: read from `in` (in_limbs limbs), written to `out` (out_limbs).
struct BufferView {
  const uint32_t* in;
  int64_t in_limbs;
  uint32_t* out;
  int64_t out_limbs;
  int64_t stride;
};

// The step functions are forced inline: as calls they pass the buffer view through the stack
// once per element, and the resulting store-forwarding stalls cost more than the arithmetic.
//
// One exact forward step for one element. Returns false when a value left the safe range (the
// caller counts these and the Python layer raises). `q` receives the update for the checksum.
//
// v * numer / denom is computed as floor((v numer + s) / denom), where s in [0, numer) is a
// digit popped from the buffer and the remainder of the division is pushed back onto it. The
// result is within one unit of the exact product, and the buffer grows by log2(denom / numer)
// bits. Writing v = a denom + r keeps every intermediate inside int64.
C10_HOST_DEVICE C10_ALWAYS_INLINE bool exact_forward_step(int64_t* x, int64_t* v, double f,
                                                          double update_scale, BufferView buffer,
                                                          SmallDivisor numer, SmallDivisor denom,
                                                          int64_t* q) {
  bool ok = fixed_update(f, update_scale, q) && in_state_range(*x) && in_state_range(*v);

  int64_t low = 0;
  const int64_t high = floor_divmod(*v, denom, &low);
  const int64_t popped = buffer_divmod(buffer.in, buffer.in_limbs, buffer.out, buffer.out_limbs,
                                       buffer.stride, numer, &ok);
  uint64_t pushed = 0;
  const uint64_t low_quotient = divide(low * numer.value + popped, denom, &pushed);
  ok = (buffer_mul_add(buffer.out, buffer.out_limbs, buffer.stride, denom.value,
                       static_cast<uint32_t>(pushed)) == 0) &&
       ok;

  if (ok) {
    *v = high * numer.value + static_cast<int64_t>(low_quotient) + *q;
    *x = *x + *v;
    ok = in_state_range(*x) && in_state_range(*v);
  }
  return ok;
}

// The exact inverse of exact_forward_step, given f evaluated at the recovered x = x' - v'.
C10_HOST_DEVICE C10_ALWAYS_INLINE bool exact_inverse_step(int64_t* x, int64_t* v, double f,
                                                          double update_scale, BufferView buffer,
                                                          SmallDivisor numer, SmallDivisor denom,
                                                          int64_t* q) {
  bool ok = fixed_update(f, update_scale, q) && in_state_range(*x) && in_state_range(*v);
  if (!ok) return false;
  *x = *x - *v;

  // v' - q = high numer + floor(scaled_low / denom), whose second term lies in [0, numer).
  int64_t low_quotient = 0;
  const int64_t high = floor_divmod(*v - *q, numer, &low_quotient);
  const uint64_t pushed = buffer_divmod(buffer.in, buffer.in_limbs, buffer.out, buffer.out_limbs,
                                        buffer.stride, denom, &ok);
  uint64_t popped = 0;
  const uint64_t low = divide(low_quotient * denom.value + pushed, numer, &popped);
  ok = (buffer_mul_add(buffer.out, buffer.out_limbs, buffer.stride, numer.value,
                       static_cast<uint32_t>(popped)) == 0) &&
       ok;

  const int64_t high_limit = kStateLimit / denom.value;
  if (high >= high_limit || high <= -high_limit) return false;
  *v = high * denom.value + static_cast<int64_t>(low);
  return ok && in_state_range(*x) && in_state_range(*v);
}

// Position-sensitive checksum of the updates: sum over elements of q_i (2 i + 1) mod 2^64.
// Integer addition commutes, so any thread partition gives the same value.
C10_HOST_DEVICE inline uint64_t checksum_term(int64_t q, int64_t index) {
  return static_cast<uint64_t>(q) * (2 * static_cast<uint64_t>(index) + 1);
}

}  // namespace deepkern::momentum
