// Counter-based Gaussian noise, bit-compatible with noprop/ops/philox.py and Triton's tl.randn4x.
//
// normal4(seed, counter): Philox-4x32 with 10 rounds, key (seed_lo32, seed_hi32), counter
// (counter_lo32, counter_hi32, 0, 0); the four outputs are bit-cast to int32, negatives folded with
// ~x and scaled by 4.6566127342e-10 into u0..u3 in [0, 1); Box-Muller on (u0, u1) and (u2, u3)
// (u0, u2 clamped to >= 1e-7) gives four normals, lanes 0..3 =
//   r01·cos(2π·u1), r01·sin(2π·u1), r23·cos(2π·u3), r23·sin(2π·u3),  r = sqrt(-2·log(u)),
// Triton's randn4x order. A noise tensor is rows x d; element (r, j) is lane j % 4 of counter
// r·Q + j / 4, Q = ceil(d / 4) (noise_quads): one Philox call per four neighbouring columns. The
// backward regenerates the forward's ε from the seed instead of storing it.
//
// Host-and-device so the generator can be checked against the Python spec without a GPU. Do not
// compile with --use_fast_math: logf/cosf/sinf/sqrtf must be the accurate versions to match the spec.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NOPROP_HD __host__ __device__ __forceinline__
#else
#define NOPROP_HD inline
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace noprop_cuda {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kIntToUnit = 4.6566127342e-10f;  // (2^23 - 1) / 2^23 * 2^-31, as Triton
constexpr float kTwoPi = 6.283185307179586f;

NOPROP_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four Philox-4x32-10 outputs for one counter.
NOPROP_HD void philox_4x32_10(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = umulhi32(kPhiloxRoundB, c2) ^ c1 ^ k0;
    const uint32_t n2 = umulhi32(kPhiloxRoundA, c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * c2;
    c3 = kPhiloxRoundA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// uint32 -> [0, 1) exactly as Triton's uint_to_uniform_float for 32-bit draws.
NOPROP_HD float uint_to_unit(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;  // == -s - 1: keeps the value in [0, 2^31)
  return static_cast<float>(s) * kIntToUnit;
}

// Triton's pair_uniform_to_normal: (r·cos θ, r·sin θ), r = sqrt(-2·log(max(ua, 1e-7))), θ = 2π·ub.
// cosf and sinf are called separately (nvcc may merge them into sincosf, whose results are the same).
NOPROP_HD void box_muller(float ua, float ub, float& n_cos, float& n_sin) {
  ua = ua < 1.0e-7f ? 1.0e-7f : ua;
  const float th = kTwoPi * ub;
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(ua));
  n_cos = r * cosf(th);
  n_sin = r * sinf(th);
#else
  const float r = std::sqrt(-2.0f * std::log(ua));
  n_cos = r * std::cos(th);
  n_sin = r * std::sin(th);
#endif
}

// Four standard normals (lanes 0..3, Triton's randn4x order) for Philox counter `counter`.
struct Normal4 {
  float v[4];
};

NOPROP_HD Normal4 philox_normal4(uint64_t seed, uint64_t counter) {
  uint32_t x[4];
  philox_4x32_10(seed, counter, x);
  Normal4 n;
  box_muller(uint_to_unit(x[0]), uint_to_unit(x[1]), n.v[0], n.v[1]);
  box_muller(uint_to_unit(x[2]), uint_to_unit(x[3]), n.v[2], n.v[3]);
  return n;
}

// Philox counters per noise row of d columns: Q = ceil(d / 4).
NOPROP_HD int64_t noise_quads(int64_t d) { return (d + 3) / 4; }

}  // namespace noprop_cuda
