// Philox4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw (2011): a keyed
// bijection of a 128-bit counter, so any number in a stream can be computed directly from its
// address. Host and device share this code; CPU and GPU draw the same bits.
//
// Normals come from the Box-Muller transform in float32 with our own logarithm and sine and
// cosine polynomials, written with explicit fused multiply-adds: IEEE arithmetic plus correctly
// rounded fma, division and square root, so every CPU and GPU computes the same float for the
// same bits (provided the compiler does not contract other multiply-adds: the sde sources are
// built with contraction off). Straight-line, branch-free code also lets the CPU compiler
// vectorise a loop of these calls across paths.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace deepkern::philox {

struct Block {
  uint32_t v[4];
};

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

// One round of the Philox S-box on the four words of a counter, with this round's key.
C10_HOST_DEVICE C10_ALWAYS_INLINE void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                             uint32_t key0, uint32_t key1) {
  const uint64_t product0 = static_cast<uint64_t>(kMul0) * c0;
  const uint64_t product1 = static_cast<uint64_t>(kMul1) * c2;
  const uint32_t next0 = static_cast<uint32_t>(product1 >> 32) ^ c1 ^ key0;
  const uint32_t next2 = static_cast<uint32_t>(product0 >> 32) ^ c3 ^ key1;
  c1 = static_cast<uint32_t>(product1);
  c3 = static_cast<uint32_t>(product0);
  c0 = next0;
  c2 = next2;
}

// Ten rounds with the Weyl key schedule on one 128-bit counter.
C10_HOST_DEVICE C10_ALWAYS_INLINE Block philox4x32_10(Block counter, uint32_t key0, uint32_t key1) {
  for (int r = 0; r < 10; ++r) {
    round(counter.v[0], counter.v[1], counter.v[2], counter.v[3], key0 + r * kWeyl0,
          key1 + r * kWeyl1);
  }
  return counter;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t float_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float bits_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// log(u) for u = (bits >> 1) 2^-31 + 2^-32 in (0, 1], rounded to float. (31 bits go through a
// signed conversion, which every vector unit has.) With u = m 2^e and m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, whose series to s^9 is exact to
// float precision (the next term is below 2e-9 relative).
C10_HOST_DEVICE C10_ALWAYS_INLINE float log_open_uniform(uint32_t bits) {
  const float top = static_cast<float>(static_cast<int32_t>(bits >> 1));
  const float u = fmaf(top, 4.65661287e-10f, 2.32830644e-10f);  // 2^-31, 2^-32
  const uint32_t word = float_bits(u);
  const int32_t biased = static_cast<int32_t>(word >> 23);
  const float mantissa = bits_float((word & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool halve = mantissa > 1.41421356f;
  const float m = halve ? 0.5f * mantissa : mantissa;
  const float exponent = static_cast<float>(biased - 127 + (halve ? 1 : 0));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float series = fmaf(s2, 1.0f / 9.0f, 1.0f / 7.0f);
  series = fmaf(s2, series, 1.0f / 5.0f);
  series = fmaf(s2, series, 1.0f / 3.0f);
  series = fmaf(s2, series, 1.0f);
  const float log_m = 2.0f * s * series;
  return fmaf(exponent, 0.693147182f, log_m);
}

// sin and cos of 2 pi t, t = (bits >> 8) 2^-24 in [0, 1). The top two bits pick the quadrant;
// the rest, folded onto [0, 1/8] of a turn, feed Taylor polynomials of sin and cos on
// [0, pi/4], exact to float precision at degrees 9 and 10.
C10_HOST_DEVICE C10_ALWAYS_INLINE void sincos_turn(uint32_t bits, float* sine, float* cosine) {
  const uint32_t quadrant = bits >> 30;
  const int32_t within = static_cast<int32_t>((bits >> 8) & 0x003FFFFFu);
  const float r = static_cast<float>(within) * 2.38418579e-7f;  // 2^-22, exact
  const bool fold = r > 0.5f;
  const float x = (fold ? 1.0f - r : r) * 1.57079637f;  // in [0, pi/4]
  const float x2 = x * x;
  float sin_x = fmaf(x2, 2.75573192e-6f, -1.98412698e-4f);
  sin_x = fmaf(x2, sin_x, 8.33333333e-3f);
  sin_x = fmaf(x2, sin_x, -1.66666667e-1f);
  sin_x = fmaf(x2 * x, sin_x, x);
  float cos_x = fmaf(x2, -2.75573192e-7f, 2.48015873e-5f);
  cos_x = fmaf(x2, cos_x, -1.38888889e-3f);
  cos_x = fmaf(x2, cos_x, 4.16666667e-2f);
  cos_x = fmaf(x2, cos_x, -0.5f);
  cos_x = fmaf(x2, cos_x, 1.0f);
  // Within the quadrant: the folded half swaps sine and cosine.
  const float s = fold ? cos_x : sin_x;
  const float c = fold ? sin_x : cos_x;
  // Rotating by quadrant * pi/2 permutes and negates.
  const bool odd = (quadrant & 1u) != 0;
  const float rotated_sin = odd ? c : s;
  const float rotated_cos = odd ? -s : c;
  const bool back = quadrant >= 2;
  *sine = back ? -rotated_sin : rotated_sin;
  *cosine = back ? -rotated_cos : rotated_cos;
}

// Two standard normals from two 32-bit words, by the Box-Muller transform: radius from the
// first word (at most sqrt(64 log 2) = 6.66), angle from the second.
C10_HOST_DEVICE C10_ALWAYS_INLINE void box_muller(uint32_t radius_bits, uint32_t angle_bits,
                                                  float* z0, float* z1) {
  const float radius = sqrtf(-2.0f * log_open_uniform(radius_bits));
  float sine;
  float cosine;
  sincos_turn(angle_bits, &sine, &cosine);
  *z0 = radius * cosine;
  *z1 = radius * sine;
}

// Four standard normals from one Philox block.
C10_HOST_DEVICE C10_ALWAYS_INLINE void normals4(Block bits, float out[4]) {
  box_muller(bits.v[0], bits.v[1], &out[0], &out[1]);
  box_muller(bits.v[2], bits.v[3], &out[2], &out[3]);
}

}  // namespace deepkern::philox
