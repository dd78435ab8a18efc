// Vectorised Philox dropout masks and small row-major GEMMs for the CPU LoRA kernels.
//
// The mask is the one of csrc/common/philox.h (element i of a contiguous [M, K] tensor
// is kept iff philox4x32(i >> 2, seed)[i & 3] >= threshold); here the words of a
// contiguous run of counters are computed by a branch-free loop that GCC vectorises,
// cloned for x86-64-v4 (AVX-512), AVX2 and the baseline, and written out directly as a
// mask of scale factors (1 / (1 - p) where kept, 0 where dropped) in element order.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>

#include "common/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define FASTPEFT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FASTPEFT_CPU_CLONES
#endif

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

// Fills buf (capacity >= count + 8) with the mask of flat elements [e0, e0 + count) and
// returns the pointer whose [0, count) entries are those elements' scale factors.
template <typename T>
inline const T* dropout_mask_run(uint64_t e0, int64_t count, uint64_t seed, uint32_t threshold,
                                 T scale, T* buf) {
  const uint64_t first = e0 >> 2;
  const uint64_t last = (e0 + static_cast<uint64_t>(count) + 3) >> 2;  // exclusive
  philox_mask(first, seed, static_cast<int64_t>(last - first), threshold, scale, buf);
  return buf + (e0 & 3);
}

// out[m, n] = (bias ? bias[n] : 0) + sum_j t[m * ldt + j] * bt[j * N + n] for m < rows,
// n < N: the rank-r update y = bias + t (scaling B)^T of the forward, register-blocked
// 4 rows x 64 columns (MKL's sgemm is slower on this k = r shape).
FASTPEFT_CPU_CLONES static void rank_r_update(int64_t rows, int64_t N, int64_t r,
                                              const float* __restrict t, int64_t ldt,
                                              const float* __restrict bt,
                                              const float* __restrict bias,
                                              float* __restrict out, int64_t ldo) {
  constexpr int RM = 4, CN = 64;
  int64_t m = 0;
  for (; m + RM <= rows; m += RM) {
    int64_t n = 0;
    for (; n + CN <= N; n += CN) {
      float acc[RM][CN];
      for (int i = 0; i < RM; ++i)
        for (int l = 0; l < CN; ++l) acc[i][l] = bias != nullptr ? bias[n + l] : 0.f;
      for (int64_t j = 0; j < r; ++j) {
        const float* b = bt + j * N + n;
        for (int i = 0; i < RM; ++i) {
          const float tv = t[(m + i) * ldt + j];
          for (int l = 0; l < CN; ++l) acc[i][l] += tv * b[l];
        }
      }
      for (int i = 0; i < RM; ++i)
        for (int l = 0; l < CN; ++l) out[(m + i) * ldo + n + l] = acc[i][l];
    }
    for (; n < N; ++n)
      for (int i = 0; i < RM; ++i) {
        float a = bias != nullptr ? bias[n] : 0.f;
        for (int64_t j = 0; j < r; ++j) a += t[(m + i) * ldt + j] * bt[j * N + n];
        out[(m + i) * ldo + n] = a;
      }
  }
  for (; m < rows; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float a = bias != nullptr ? bias[n] : 0.f;
      for (int64_t j = 0; j < r; ++j) a += t[m * ldt + j] * bt[j * N + n];
      out[m * ldo + n] = a;
    }
}

// Elements per mask run: small enough that the mask stays in L1.
constexpr int64_t kMaskRun = 4096;

// ---------------------------------------------------------------------------------------
// Small row-major GEMMs inside the per-thread row-block loops:
//   C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C, with row strides lda, ldb, ldc.
// They go straight to the BLAS that torch links (MKL's sgemm_/dgemm_ are exported by
// libtorch_cpu; single-threaded when called inside a parallel region) and fall back to
// ATen on tensors wrapping the buffers when that symbol is not there.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

template <typename T>
inline void gemm_rm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                         const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                         int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor ct = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor at_ = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                           : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor bt = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(ct, at_, bt);
    if (alpha != T(1)) ct.mul_(alpha);
  } else {
    ct.addmm_(at_, bt, beta, alpha);
  }
}

template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kIntMax = 2147483647;
  const bool fits = m < kIntMax && n < kIntMax && k < kIntMax && lda < kIntMax &&
                    ldb < kIntMax && ldc < kIntMax;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ildb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    if (fits && sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (fits && dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
      return;
    }
  }
  gemm_rm_aten<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace fastpeft::cpu
