// Philox4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw (2011): a keyed
// bijection of a 128-bit counter, so any number in a stream can be computed directly from its
// address. Host and device share this code; CPU and GPU draw the same bits.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace deepkern::philox {

struct Block {
  uint32_t v[4];
};

C10_HOST_DEVICE inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Ten rounds of the Philox S-box and key schedule on one 128-bit counter.
C10_HOST_DEVICE inline Block philox4x32_10(Block counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0 = 0;
    uint32_t hi1 = 0;
    const uint32_t lo0 = mulhilo(kMul0, counter.v[0], &hi0);
    const uint32_t lo1 = mulhilo(kMul1, counter.v[2], &hi1);
    counter = Block{{hi1 ^ counter.v[1] ^ key0, lo1, hi0 ^ counter.v[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// A uniform double in the open interval (0, 1): never 0, so its logarithm is finite.
C10_HOST_DEVICE inline double open_uniform(uint32_t bits) {
  return (static_cast<double>(bits) + 0.5) * 2.3283064365386963e-10;  // 2^-32
}

// Four standard normals from one Philox block, by the Box-Muller transform on two pairs.
C10_HOST_DEVICE inline void normals4(Block bits, double out[4]) {
  constexpr double kTwoPi = 6.283185307179586;
  for (int pair = 0; pair < 2; ++pair) {
    const double radius = ::sqrt(-2.0 * ::log(open_uniform(bits.v[2 * pair])));
    const double angle = kTwoPi * open_uniform(bits.v[2 * pair + 1]);
    out[2 * pair] = radius * ::cos(angle);
    out[2 * pair + 1] = radius * ::sin(angle);
  }
}

}  // namespace deepkern::philox
