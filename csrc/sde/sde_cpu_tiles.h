// The CPU kernels of the sde family, written for the compiler to vectorise: a tile of kLanes
// paths advances together, every per-path value stored lane-innermost ([coordinate][lane]), so
// each inner loop runs the shared per-element arithmetic of sde.h and philox.h across lanes.
// Included once per instruction-set tier by sde_cpu_<tier>.cpp, which names the namespace
// through DEEPKERN_CPU_TIER and compiles this with that tier's flags.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/philox.h"
#include "sde/sde.h"
#include "sde/sde_cpu_kernels.h"

#ifndef DEEPKERN_CPU_TIER
#error "define DEEPKERN_CPU_TIER before including sde_cpu_tiles.h"
#endif

namespace deepkern::sde::DEEPKERN_CPU_TIER {
namespace {

// Sixteen lanes fill one AVX-512 register of floats (two of doubles).
constexpr int64_t kLanes = 16;

// The four counter words of one Philox block for each lane, lane-innermost.
using BlockWords = uint32_t[4][kLanes];

// Philox4x32-10 on B blocks of kLanes counters at once, in place. Compilers widen the
// 32 x 32 -> 64-bit products to full 64-bit multiplies, so the vector tiers spell out the
// even/odd-lane unsigned multiplies; all tiers compute philox::round's bits. Several blocks in
// flight hide the multiplies' latency.
#if defined(__AVX512F__)
inline void mul_hi_lo(__m512i x, __m512i multiplier, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), multiplier);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

template <int B>
inline void philox_lanes(BlockWords* blocks, uint32_t key0, uint32_t key1) {
  static_assert(kLanes == 16, "one AVX-512 register per counter word");
  __m512i x[B][4];
  for (int b = 0; b < B; ++b) {
    for (int w = 0; w < 4; ++w) x[b][w] = _mm512_loadu_si512(blocks[b][w]);
  }
  const __m512i mul0 = _mm512_set1_epi64(philox::kMul0);
  const __m512i mul1 = _mm512_set1_epi64(philox::kMul1);
  for (uint32_t r = 0; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(key0 + r * philox::kWeyl0));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(key1 + r * philox::kWeyl1));
    for (int b = 0; b < B; ++b) {
      __m512i hi0, lo0, hi1, lo1;
      mul_hi_lo(x[b][0], mul0, &hi0, &lo0);
      mul_hi_lo(x[b][2], mul1, &hi1, &lo1);
      x[b][0] = _mm512_xor_si512(_mm512_xor_si512(hi1, x[b][1]), k0);
      x[b][2] = _mm512_xor_si512(_mm512_xor_si512(hi0, x[b][3]), k1);
      x[b][1] = lo1;
      x[b][3] = lo0;
    }
  }
  for (int b = 0; b < B; ++b) {
    for (int w = 0; w < 4; ++w) _mm512_storeu_si512(blocks[b][w], x[b][w]);
  }
}
#elif defined(__AVX2__)
inline void mul_hi_lo(__m256i x, __m256i multiplier, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(x, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), multiplier);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

template <int B>
inline void philox_lanes(BlockWords* blocks, uint32_t key0, uint32_t key1) {
  static_assert(kLanes == 16, "two AVX2 registers per counter word");
  __m256i x[B][2][4];
  for (int b = 0; b < B; ++b) {
    for (int half = 0; half < 2; ++half) {
      for (int w = 0; w < 4; ++w) {
        x[b][half][w] =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks[b][w] + 8 * half));
      }
    }
  }
  const __m256i mul0 = _mm256_set1_epi64x(philox::kMul0);
  const __m256i mul1 = _mm256_set1_epi64x(philox::kMul1);
  for (uint32_t r = 0; r < 10; ++r) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key0 + r * philox::kWeyl0));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key1 + r * philox::kWeyl1));
    for (int b = 0; b < B; ++b) {
      for (int half = 0; half < 2; ++half) {
        __m256i* v = x[b][half];
        __m256i hi0, lo0, hi1, lo1;
        mul_hi_lo(v[0], mul0, &hi0, &lo0);
        mul_hi_lo(v[2], mul1, &hi1, &lo1);
        v[0] = _mm256_xor_si256(_mm256_xor_si256(hi1, v[1]), k0);
        v[2] = _mm256_xor_si256(_mm256_xor_si256(hi0, v[3]), k1);
        v[1] = lo1;
        v[3] = lo0;
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    for (int half = 0; half < 2; ++half) {
      for (int w = 0; w < 4; ++w) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(blocks[b][w] + 8 * half), x[b][half][w]);
      }
    }
  }
}
#else
template <int B>
inline void philox_lanes(BlockWords* blocks, uint32_t key0, uint32_t key1) {
  for (uint32_t r = 0; r < 10; ++r) {
    const uint32_t round_key0 = key0 + r * philox::kWeyl0;
    const uint32_t round_key1 = key1 + r * philox::kWeyl1;
    for (int b = 0; b < B; ++b) {
      uint32_t (&c)[4][kLanes] = blocks[b];
      for (int64_t l = 0; l < kLanes; ++l) {
        philox::round(c[0][l], c[1][l], c[2][l], c[3][l], round_key0, round_key1);
      }
    }
  }
}
#endif

// Four rows of an affine map over the lanes at once, in the vector tiers: four independent
// chains of fused multiply-adds keep the FMA units busy where one row's chain would wait on
// each result. Each row sums bias + w_0 x_0 + w_1 x_1 + ... in order, as the scalar code does.
#if defined(__AVX512F__) || defined(__AVX2__)
template <typename T>
struct Simd;

#if defined(__AVX512F__)
template <>
struct Simd<float> {
  using Vector = __m512;
  static constexpr int64_t kWidth = 16;
  static Vector broadcast(float v) { return _mm512_set1_ps(v); }
  static Vector load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vector v) { _mm512_storeu_ps(p, v); }
  static Vector fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
};

template <>
struct Simd<double> {
  using Vector = __m512d;
  static constexpr int64_t kWidth = 8;
  static Vector broadcast(double v) { return _mm512_set1_pd(v); }
  static Vector load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, Vector v) { _mm512_storeu_pd(p, v); }
  static Vector fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_pd(a, b, c); }
};
#else
template <>
struct Simd<float> {
  using Vector = __m256;
  static constexpr int64_t kWidth = 8;
  static Vector broadcast(float v) { return _mm256_set1_ps(v); }
  static Vector load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vector v) { _mm256_storeu_ps(p, v); }
  static Vector fma(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
};

template <>
struct Simd<double> {
  using Vector = __m256d;
  static constexpr int64_t kWidth = 4;
  static Vector broadcast(double v) { return _mm256_set1_pd(v); }
  static Vector load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, Vector v) { _mm256_storeu_pd(p, v); }
  static Vector fma(Vector a, Vector b, Vector c) { return _mm256_fmadd_pd(a, b, c); }
};
#endif

constexpr bool kFourRowAffine = true;

template <typename T>
inline void affine_four_rows(const T* weights, const T* bias, const T* in, int64_t first,
                             int64_t width, T* rows) {
  using S = Simd<T>;
  static_assert(kLanes % S::kWidth == 0, "whole vectors of lanes");
  const T* w0 = weights + first * width;
  const T* w1 = w0 + width;
  const T* w2 = w1 + width;
  const T* w3 = w2 + width;
  for (int64_t base = 0; base < kLanes; base += S::kWidth) {
    typename S::Vector acc0 = S::broadcast(bias[first]);
    typename S::Vector acc1 = S::broadcast(bias[first + 1]);
    typename S::Vector acc2 = S::broadcast(bias[first + 2]);
    typename S::Vector acc3 = S::broadcast(bias[first + 3]);
    for (int64_t j = 0; j < width; ++j) {
      const typename S::Vector x = S::load(in + j * kLanes + base);
      acc0 = S::fma(S::broadcast(w0[j]), x, acc0);
      acc1 = S::fma(S::broadcast(w1[j]), x, acc1);
      acc2 = S::fma(S::broadcast(w2[j]), x, acc2);
      acc3 = S::fma(S::broadcast(w3[j]), x, acc3);
    }
    S::store(rows + first * kLanes + base, acc0);
    S::store(rows + (first + 1) * kLanes + base, acc1);
    S::store(rows + (first + 2) * kLanes + base, acc2);
    S::store(rows + (first + 3) * kLanes + base, acc3);
  }
}
#else
constexpr bool kFourRowAffine = false;

// Never called: the generic tier has no vector FMA to keep busy.
template <typename T>
inline void affine_four_rows(const T*, const T*, const T*, int64_t, int64_t, T*) {}
#endif

// The state and scratch of one tile of paths. Lanes past the end of a range run on zeros and
// are never stored.
template <typename T>
class Tile {
 public:
  explicit Tile(const Problem<T>& p)
      : p_(p),
        blocks_((p.dim + 3) / 4),
        x_(p.dim * kLanes),
        z_(4 * blocks_ * kLanes),
        noise_(p.dim * kLanes),
        mu_(p.dim * kLanes),
        hidden_(std::max<int64_t>(p.hidden, 1) * kLanes) {}

  // Lane l starts from row rows[l] of `start` (rows may repeat).
  void load(const T* start, const int64_t* rows, int64_t count) {
    std::fill(x_.begin(), x_.end(), T(0));
    for (int64_t l = 0; l < count; ++l) {
      for (int64_t i = 0; i < p_.dim; ++i) x_[i * kLanes + l] = start[rows[l] * p_.dim + i];
    }
  }

  // Lane l's state into out[l * stride .. + dim), for the first `count` lanes.
  void store(T* out, int64_t stride, int64_t count) const {
    for (int64_t l = 0; l < count; ++l) {
      for (int64_t i = 0; i < p_.dim; ++i) out[l * stride + i] = x_[i * kLanes + l];
    }
  }

  T value(int64_t i, int64_t l) const { return x_[i * kLanes + l]; }

  // The normals of step `step` of paths first_path + l, as draw_normals() in sde.h draws them.
  void draw(int64_t first_path, int64_t step) {
    uint32_t source_lo[kLanes];
    uint32_t source_hi[kLanes];
    float sign[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t path = static_cast<uint64_t>(first_path + l);
      const uint64_t source = p_.antithetic ? path >> 1 : path;
      source_lo[l] = static_cast<uint32_t>(source);
      source_hi[l] = static_cast<uint32_t>(source >> 32);
      sign[l] = p_.antithetic && (path & 1) ? -1.0f : 1.0f;
    }
    int64_t block = 0;
    for (; block + 2 <= blocks_; block += 2)
      draw_blocks<2>(block, step, source_lo, source_hi, sign);
    if (block < blocks_) draw_blocks<1>(block, step, source_lo, source_hi, sign);
  }

  // Normals 4 first .. 4 (first + B) - 1 of every lane (those below dim).
  template <int B>
  void draw_blocks(int64_t first, int64_t step, const uint32_t* source_lo,
                   const uint32_t* source_hi, const float* sign) {
    BlockWords words[B];
    for (int b = 0; b < B; ++b) {
      for (int64_t l = 0; l < kLanes; ++l) {
        words[b][0][l] = source_lo[l];
        words[b][1][l] = source_hi[l];
        words[b][2][l] = static_cast<uint32_t>(step);
        words[b][3][l] = static_cast<uint32_t>(first + b);
      }
    }
    philox_lanes<B>(words, p_.key0, p_.key1);
    for (int b = 0; b < B; ++b) {
      // Each pair of words gives two normals; a pair wholly past dim is not transformed.
      for (int pair = 0; pair < 2 && 4 * (first + b) + 2 * pair < p_.dim; ++pair) {
        const uint32_t* radius_bits = words[b][2 * pair];
        const uint32_t* angle_bits = words[b][2 * pair + 1];
        float* z = z_.data() + (4 * (first + b) + 2 * pair) * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) {
          float cosine_normal, sine_normal;
          philox::box_muller(radius_bits[l], angle_bits[l], &cosine_normal, &sine_normal);
          z[l] = sign[l] * cosine_normal;
          z[kLanes + l] = sign[l] * sine_normal;
        }
      }
    }
  }

  // Normal i of lane l from the last draw().
  float normal(int64_t i, int64_t l) const { return z_[i * kLanes + l]; }

  // One Euler-Maruyama step of every lane, as euler_step() in sde.h computes it.
  void step(int64_t first_path, int64_t step) {
    draw(first_path, step);
    diffuse();
    if (p_.drift_kind == kZeroDrift) {
      // mu = 0 makes fused(mu, h, v) exactly v.
      for (int64_t n = 0; n < p_.dim * kLanes; ++n) x_[n] = x_[n] + p_.sqrt_h * noise_[n];
      return;
    }
    drift();
    for (int64_t n = 0; n < p_.dim * kLanes; ++n) x_[n] = update(x_[n], mu_[n], noise_[n], p_);
  }

 private:
  // noise = Sigma z.
  void diffuse() {
    const int64_t d = p_.dim;
    if (p_.sigma_kind == kTriangularSigma) {
      for (int64_t i = 0; i < d; ++i) {
        T acc[kLanes] = {};
        for (int64_t j = 0; j <= i; ++j) {
          const T s = p_.sigma[i * d + j];
          const float* z = z_.data() + j * kLanes;
          for (int64_t l = 0; l < kLanes; ++l) acc[l] = fused(s, static_cast<T>(z[l]), acc[l]);
        }
        std::copy(acc, acc + kLanes, noise_.data() + i * kLanes);
      }
      return;
    }
    for (int64_t i = 0; i < d; ++i) {
      const T s = p_.sigma[p_.sigma_kind == kDiagonalSigma ? i : 0];
      const float* z = z_.data() + i * kLanes;
      T* out = noise_.data() + i * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) out[l] = s * static_cast<T>(z[l]);
    }
  }

  // rows[r] = bias[r] + sum_j weights[r, j] in[j], for `count` rows over `width` inputs.
  // Kept out of line: compiled on its own it vectorises across lanes, where inlined into the
  // step loop compilers have been seen to vectorise the wrong loop.
  // The vector tiers take rows four at a time (see affine_four_rows); plain loops over several
  // rows get vectorised across rows by GCC 12 instead of across lanes.
  __attribute__((noinline)) static void affine(const T* weights, const T* bias, const T* in,
                                               int64_t count, int64_t width, T* rows) {
    int64_t r = 0;
    if constexpr (kFourRowAffine) {
      for (; r + 4 <= count; r += 4) affine_four_rows(weights, bias, in, r, width, rows);
    }
    for (; r < count; ++r) {
      // A local accumulator, which cannot alias the inputs, stays in registers.
      T acc[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) acc[l] = bias[r];
      for (int64_t j = 0; j < width; ++j) {
        const T w = weights[r * width + j];
        const T* input = in + j * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) acc[l] = fused(w, input[l], acc[l]);
      }
      std::copy(acc, acc + kLanes, rows + r * kLanes);
    }
  }

  void drift() {
    if (p_.drift_kind == kLinearDrift) {
      affine(p_.matrix, p_.bias, x_.data(), p_.dim, p_.dim, mu_.data());
      return;
    }
    affine(p_.matrix, p_.bias, x_.data(), p_.hidden, p_.dim, hidden_.data());
    activate_all();
    affine(p_.out_matrix, p_.out_bias, hidden_.data(), p_.dim, p_.hidden, mu_.data());
  }

  void activate_all() {
    const int64_t n = p_.hidden * kLanes;
    T* h = hidden_.data();
    switch (p_.activation) {
      case kTanh:
        for (int64_t k = 0; k < n; ++k) h[k] = activate(kTanh, h[k]);
        break;
      case kRelu:
        for (int64_t k = 0; k < n; ++k) h[k] = activate(kRelu, h[k]);
        break;
      case kSoftplus:
        for (int64_t k = 0; k < n; ++k) h[k] = activate(kSoftplus, h[k]);
        break;
      default:
        for (int64_t k = 0; k < n; ++k) h[k] = activate(kSine, h[k]);
    }
  }

  const Problem<T>& p_;
  int64_t blocks_;
  std::vector<T> x_;
  std::vector<float> z_;
  std::vector<T> noise_;
  std::vector<T> mu_;
  std::vector<T> hidden_;
};

template <typename T>
void euler(const Problem<T>& p, const EulerJob<T>& job, int64_t begin, int64_t end) {
  const int64_t d = p.dim;
  Tile<T> tile(p);
  int64_t rows[kLanes];
  for (int64_t first = begin; first < end; first += kLanes) {
    const int64_t count = std::min(kLanes, end - first);
    for (int64_t l = 0; l < count; ++l) rows[l] = first + l;
    tile.load(job.start, rows, count);
    if (job.save_every == 0) {
      for (int64_t k = 0; k < job.steps; ++k) tile.step(first, job.first_step + k);
      tile.store(job.out + first * d, d, count);
      continue;
    }
    T* saved = job.out + first * job.saves * d;
    tile.store(saved, job.saves * d, count);
    for (int64_t k = 0; k < job.steps; ++k) {
      tile.step(first, job.first_step + k);
      if ((k + 1) % job.save_every == 0) {
        tile.store(saved + ((k + 1) / job.save_every) * d, job.saves * d, count);
      }
    }
  }
}

// Rows are (step, path) pairs in step-major order, as the output [steps, paths, dim] lays them.
template <typename T>
void normals(const Problem<T>& p, const NormalsJob<T>& job, int64_t begin, int64_t end) {
  const int64_t d = p.dim;
  Tile<T> tile(p);
  int64_t row = begin;
  while (row < end) {
    // A tile covers consecutive paths of one step.
    const int64_t step = row / job.paths;
    const int64_t path = row % job.paths;
    const int64_t count = std::min({kLanes, end - row, job.paths - path});
    tile.draw(path, job.first_step + step);
    for (int64_t l = 0; l < count; ++l) {
      for (int64_t i = 0; i < d; ++i) job.out[(row + l) * d + i] = tile.normal(i, l);
    }
    row += count;
  }
}

template <typename T>
void monte_carlo(const Problem<T>& p, const MonteCarloJob<T>& job, int64_t begin, int64_t end) {
  const int64_t d = p.dim;
  Tile<T> tile(p);
  const int64_t rows[kLanes] = {};
  std::vector<T> terminal(d);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t s = task / job.chunks;
    const int64_t first = (task % job.chunks) * job.chunk_paths;
    const int64_t last = std::min(job.paths, first + job.chunk_paths);
    Moments moments{0.0, 0.0, 0.0};
    for (int64_t m = first; m < last; m += kLanes) {
      const int64_t count = std::min(kLanes, last - m);
      tile.load(job.start + s * d, rows, kLanes);
      for (int64_t k = 0; k < job.steps; ++k) tile.step(s * job.paths + m, k);
      // Paths join the moments in order, as the per-path loop adds them.
      for (int64_t l = 0; l < count; ++l) {
        for (int64_t i = 0; i < d; ++i) terminal[i] = tile.value(i, l);
        moments.add(functional(job.functional, terminal.data(), d, job.weights, job.offset,
                               job.log_coordinates));
      }
    }
    job.partial[task] = moments;
  }
}

}  // namespace

template <typename T>
CpuKernels<T> cpu_kernels() {
  return CpuKernels<T>{&euler<T>, &normals<T>, &monte_carlo<T>};
}

template CpuKernels<float> cpu_kernels<float>();
template CpuKernels<double> cpu_kernels<double>();

}  // namespace deepkern::sde::DEEPKERN_CPU_TIER
