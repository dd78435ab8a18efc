// Counter-based dropout mask shared by the CPU, CUDA and Triton kernels.
//
// Element i of a contiguous [M, K] tensor is kept when
//   philox4x32(counter = (i >> 2, 0, 0, 0) with the 64-bit i >> 2 split lo/hi into
//              c0/c1, key = (seed_lo, seed_hi))[i & 3] >= threshold(p)
// and kept elements are scaled by 1 / (1 - p). The same function lives in
// python/fastpeft/ops/reference.py (pure PyTorch) and ops/triton/philox.py, so
// every backend draws the same mask for the same seed, forward and backward.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTPEFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTPEFT_HOST_DEVICE inline
#endif

namespace fastpeft {

// Philox4x32 with 7 rounds: Random123 (Salmon et al., SC'11) shows it passes
// BigCrush; fewer rounds than the usual 10 keeps mask regeneration cheap.
constexpr int kPhiloxRounds = 7;
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t v[4];
};

FASTPEFT_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Four 32-bit random words for one 64-bit counter and a 64-bit seed.
FASTPEFT_HOST_DEVICE Philox4 philox4x32(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    uint32_t n0 = hi1 ^ c1 ^ k0;
    uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Keep threshold: a uniform 32-bit word r keeps its element when r >= threshold.
FASTPEFT_HOST_DEVICE uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Whether flat element `index` survives dropout for this seed.
FASTPEFT_HOST_DEVICE bool dropout_keep(uint64_t index, uint64_t seed, uint32_t threshold) {
  Philox4 r = philox4x32(index >> 2, seed);
  return r.v[index & 3] >= threshold;
}

}  // namespace fastpeft
