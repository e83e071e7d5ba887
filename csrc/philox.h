// Counter-based random numbers for attention dropout, bit-identical to Triton's
// tl.rand(seed, offset): Philox-4x32 with 10 rounds, counter (offset_lo, offset_hi, 0, 0),
// key (seed_lo, seed_hi), first output word mapped to [0, 1) the way Triton maps it.
// Because the number depends only on (seed, offset), the backward pass regenerates the
// forward's dropout mask, and every backend drops the same elements for the same seed.
//
// Offset of attention element (b, h, i, j): ((b * H + h) * Nq + i) * L + j, j the global key.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SMCA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SMCA_HOST_DEVICE inline
#endif

namespace smca {

SMCA_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Uniform float in [0, 1) for (seed, offset).
SMCA_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace smca
