// Counter-based Gaussian noise, bit-compatible with noprop/ops/philox.py and Triton's tl.randn.
//
// ε(seed, offset): Philox-4x32 with 10 rounds, key (seed_lo32, seed_hi32), counter
// (offset_lo32, offset_hi32, 0, 0); the first two outputs are bit-cast to int32, negatives folded
// with ~x, scaled by 4.6566127342e-10 into [0, 1), u1 clamped to >= 1e-7, and Box-Muller's cosine
// branch gives one normal per offset. Every op's noise tensor draws element i with offset i, so the
// backward regenerates the forward's ε instead of storing it.
//
// Host-and-device so the generator can be checked against the Python spec without a GPU. Do not
// compile with --use_fast_math: logf/cosf/sqrtf must be the accurate versions to match the spec.
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

// The first two of the four Philox-4x32-10 outputs (the only ones the spec uses).
NOPROP_HD void philox_4x32_10(uint64_t seed, uint64_t offset, uint32_t& out0, uint32_t& out1) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
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
  out0 = c0;
  out1 = c1;
}

// uint32 -> [0, 1) exactly as Triton's uint_to_uniform_float for 32-bit draws.
NOPROP_HD float uint_to_unit(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;  // == -s - 1: keeps the value in [0, 2^31)
  return static_cast<float>(s) * kIntToUnit;
}

// One standard normal for element `offset` of a noise tensor drawn with `seed`.
NOPROP_HD float philox_randn(uint64_t seed, uint64_t offset) {
  uint32_t i1, i2;
  philox_4x32_10(seed, offset, i1, i2);
  float u1 = uint_to_unit(i1);
  const float u2 = uint_to_unit(i2);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(kTwoPi * u2);
#else
  const float r = std::sqrt(-2.0f * std::log(u1));
  return r * std::cos(kTwoPi * u2);
#endif
}

}  // namespace noprop_cuda
