// Vectorised Philox dropout masks for the CPU LoRA passes.
//
// The mask is the one of csrc/common/philox.h (element i of a contiguous [M, K] tensor
// is kept iff philox4x32(i >> 2, seed)[i & 3] >= threshold); here the words of a
// contiguous run of counters are computed by an AVX-512 kernel where the CPU has it, else
// by a branch-free loop that GCC vectorises, cloned for x86-64-v4, AVX2 and the baseline,
// and written out directly as a mask of scale factors (1 / (1 - p) where kept, 0 where
// dropped) in element order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/philox.h"
#include "cpu/vec64.h"  // FASTPEFT_CPU_CLONES


namespace fastpeft::cpu {

// out[4 * i + lane] = scale if philox4x32(counter0 + i, seed)[lane] >= threshold else 0,
// for i in [0, n). Same arithmetic as philox4x32 in common/philox.h, written so that
// the loop over i vectorises (no branches, plain 32/64-bit integer arithmetic).
template <typename T>
__attribute__((always_inline)) inline void philox_mask_body(uint64_t counter0, uint64_t seed,
                                                             int64_t n, uint32_t threshold,
                                                             T scale, T* __restrict out) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed);
  const uint32_t seed_hi = static_cast<uint32_t>(seed >> 32);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t c = counter0 + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32);
    uint32_t c2 = 0, c3 = 0;
    uint32_t k0 = seed_lo, k1 = seed_hi;
#pragma GCC unroll 8
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c0 = n0;
      c1 = static_cast<uint32_t>(p1);
      c2 = n2;
      c3 = static_cast<uint32_t>(p0);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    out[4 * i + 0] = c0 >= threshold ? scale : T(0);
    out[4 * i + 1] = c1 >= threshold ? scale : T(0);
    out[4 * i + 2] = c2 >= threshold ? scale : T(0);
    out[4 * i + 3] = c3 >= threshold ? scale : T(0);
  }
}

FASTPEFT_CPU_CLONES static void philox_mask(uint64_t counter0, uint64_t seed, int64_t n,
                                            uint32_t threshold, float scale,
                                            float* __restrict out) {
  philox_mask_body<float>(counter0, seed, n, threshold, scale, out);
}

FASTPEFT_CPU_CLONES static void philox_mask(uint64_t counter0, uint64_t seed, int64_t n,
                                            uint32_t threshold, double scale,
                                            double* __restrict out) {
  philox_mask_body<double>(counter0, seed, n, threshold, scale, out);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTPEFT_AVX512_MASK 1
// The same mask with AVX-512 intrinsics (2.5x faster than GCC's vectorisation of the loop
// above, which widens to 64-bit lanes and shuffles): the Philox rounds on 16 x 32-bit
// lanes, two groups of 16 counters (128 elements) per step, the four words' keep bits
// interleaved into element order with pdep, the scale factors written with masked moves.
// Returns the number of counters done (a multiple of 32; the caller finishes the rest
// with philox_mask). Used when the CPU has AVX-512 (checked once at run time).
// hi, lo = the high and low words of a * b per 32-bit lane (the high words from two
// vpmuludq, on the even and the odd lanes).
__attribute__((target("avx512f,avx512bw,avx512dq,bmi2"))) inline void mulhilo_epu32(
    __m512i a, __m512i b, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mullo_epi32(a, b);
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512dq,bmi2"))) int64_t philox_mask_avx512(
    uint64_t counter0, uint64_t seed, int64_t n, uint32_t threshold, T scale, T* out) {
  constexpr int kPerVec = 64 / sizeof(T);  // elements per output vector
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  // kG groups of 16 counters per step, for instruction-level parallelism across groups.
  constexpr int kG = 2;
  int64_t i = 0;
  for (; i + 16 * kG <= n; i += 16 * kG) {
    const uint64_t c = counter0 + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(c) > 0xFFFFFFFFu - 16 * kG) break;  // the low word would carry
    __m512i c0[kG], c1[kG], c2[kG], c3[kG];
    for (int g = 0; g < kG; ++g) {
      c0[g] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c + 16 * g)), iota);
      c1[g] = _mm512_set1_epi32(static_cast<int>(c >> 32));
      c2[g] = c3[g] = _mm512_setzero_si512();
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      const __m512i k0v = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i k1v = _mm512_set1_epi32(static_cast<int>(k1));
      for (int g = 0; g < kG; ++g) {
        __m512i hi0, lo0, hi1, lo1;
        mulhilo_epu32(c0[g], m0, &hi0, &lo0);
        mulhilo_epu32(c2[g], m1, &hi1, &lo1);
        c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], k0v, 0x96);
        c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], k1v, 0x96);
        c1[g] = lo1;
        c3[g] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int g = 0; g < kG; ++g) {
      // Bit 4 j + w of `keep` = word w of counter j survives.
      const uint64_t keep =
          _pdep_u64(_mm512_cmpge_epu32_mask(c0[g], thr), 0x1111111111111111ull) |
          _pdep_u64(_mm512_cmpge_epu32_mask(c1[g], thr), 0x2222222222222222ull) |
          _pdep_u64(_mm512_cmpge_epu32_mask(c2[g], thr), 0x4444444444444444ull) |
          _pdep_u64(_mm512_cmpge_epu32_mask(c3[g], thr), 0x8888888888888888ull);
      T* o = out + 4 * (i + 16 * g);
      for (int q = 0; q < 64 / kPerVec; ++q) {
        const uint64_t bits = keep >> (q * kPerVec);
        if constexpr (std::is_same_v<T, float>)
          _mm512_storeu_ps(o + q * kPerVec, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits),
                                                                _mm512_set1_ps(scale)));
        else
          _mm512_storeu_pd(o + q * kPerVec, _mm512_maskz_mov_pd(static_cast<__mmask8>(bits),
                                                                _mm512_set1_pd(scale)));
      }
    }
  }
  return i;
}

inline bool has_avx512_mask() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
  return has;
}
#endif

// Fills buf (capacity >= count + 8) with the mask of flat elements [e0, e0 + count) and
// returns the pointer whose [0, count) entries are those elements' scale factors.
template <typename T>
inline const T* dropout_mask_run(uint64_t e0, int64_t count, uint64_t seed, uint32_t threshold,
                                 T scale, T* buf) {
  const uint64_t first = e0 >> 2;
  const uint64_t last = (e0 + static_cast<uint64_t>(count) + 3) >> 2;  // exclusive
  const int64_t n = static_cast<int64_t>(last - first);
  int64_t done = 0;
#ifdef FASTPEFT_AVX512_MASK
  if (has_avx512_mask()) done = philox_mask_avx512<T>(first, seed, n, threshold, scale, buf);
#endif
  philox_mask(first + static_cast<uint64_t>(done), seed, n - done, threshold, scale,
              buf + 4 * done);
  return buf + (e0 & 3);
}

// Elements per mask run: small enough that the mask stays in L1.
constexpr int64_t kMaskRun = 4096;

}  // namespace fastpeft::cpu
