// Register-blocked rank-r kernels of the CPU LoRA passes (the products with the small
// factors A [r, K] and B [N, r]).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/dropout.h"  // FASTPEFT_CPU_CLONES

namespace fastpeft::cpu {

// MKL runs these skinny shapes (one side r = 16 wide) at well under half
// its big-GEMM rate; these register-blocked loops run near the FMA peak. They use GCC
// vector extensions for one 64-byte vector (a zmm register in the x86-64-v4 clone, two
// ymm / four xmm in the others), so the rank-r side is padded to rp, a multiple of it.
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
__attribute__((always_inline)) inline typename Vec64<T>::type load64(const T* p) {
  typename Vec64<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
__attribute__((always_inline)) inline void store64(T* p, typename Vec64<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// Both products of a row block `a` [rows, n] (row stride lda) with rank-r factors, in one
// pass over a:
//   p[i, :]  = sum_c a[i, c] * f[c, :]      (kP: the shrink, e.g. g = grad_out (scaling B))
//   q[c, :] += sum_i a[i, c] * u[i, :]      (kQ: the outer update, e.g. grad_out^T t)
// f [n, rp], u and p [rows, rp], q [n, rp]; all with row stride rp, zero-padded past r.
// A tile is RM rows x one vector, streaming over all n columns (f and q stay in L2). a comes
// from memory in rows too short for the hardware prefetcher to run ahead of, so while a tile
// runs over its rows it prefetches the next tile's (npf of them, from a + RM * lda on).
template <typename T, int RM, bool kP, bool kQ>
__attribute__((always_inline)) inline void rank_r_tile(int64_t n, const T* a, int64_t lda,
                                                       int npf, const T* f, const T* u, T* p,
                                                       T* q, int64_t rp) {
  using V = typename Vec64<T>::type;
  constexpr int W = 64 / sizeof(T);
  for (int64_t j = 0; j < rp; j += W) {
    V pacc[RM], uv[RM];
    for (int i = 0; i < RM; ++i) {
      if constexpr (kP) pacc[i] = load64(p + i * rp + j);
      if constexpr (kQ) uv[i] = load64(u + i * rp + j);
    }
    auto column = [&](int64_t c) __attribute__((always_inline)) {
      V fv, qv;
      if constexpr (kP) fv = load64(f + c * rp + j);
      if constexpr (kQ) qv = load64(q + c * rp + j);
      for (int i = 0; i < RM; ++i) {
        const T v = a[i * lda + c];
        if constexpr (kP) pacc[i] += v * fv;
        if constexpr (kQ) qv += v * uv[i];
      }
      if constexpr (kQ) store64(q + c * rp + j, qv);
    };
    const int prefetch_rows = j == 0 ? npf : 0;  // the first sweep over a prefetches
    int64_t c = 0;
    for (; c + W <= n; c += W) {  // one cache line of each row per step
      for (int i = 0; i < prefetch_rows; ++i) __builtin_prefetch(a + (RM + i) * lda + c, 0, 3);
      for (int k = 0; k < W; ++k) column(c + k);
    }
    for (; c < n; ++c) column(c);
    if constexpr (kP)
      for (int i = 0; i < RM; ++i) store64(p + i * rp + j, pacc[i]);
  }
}

// Tiles of RM rows from row m while they fit, each prefetching the rows of the tile after
// it; returns the first row not done.
template <typename T, int RM, bool kP, bool kQ>
__attribute__((always_inline)) inline int64_t rank_r_tiles(int64_t m, int64_t rows, int64_t n,
                                                           const T* a, int64_t lda, const T* f,
                                                           const T* u, T* p, T* q,
                                                           int64_t rp) {
  for (; m + RM <= rows; m += RM) {
    const int npf = static_cast<int>(std::min<int64_t>(RM, rows - m - RM));
    rank_r_tile<T, RM, kP, kQ>(n, a + m * lda, lda, npf, f, u + m * rp, p + m * rp, q, rp);
  }
  return m;
}

// 8-row tiles (each f / q vector loaded from L2 serves 8 rows of a), then 4, then single
// rows for the block's remainder.
template <typename T, bool kP, bool kQ>
__attribute__((always_inline)) inline void rank_r_pass_body(int64_t rows, int64_t n,
                                                            const T* a, int64_t lda,
                                                            const T* f, const T* u, T* p, T* q,
                                                            int64_t rp) {
  if constexpr (kP)
    for (int64_t i = 0; i < rows * rp; ++i) p[i] = T(0);
  int64_t m = rank_r_tiles<T, 8, kP, kQ>(0, rows, n, a, lda, f, u, p, q, rp);
  m = rank_r_tiles<T, 4, kP, kQ>(m, rows, n, a, lda, f, u, p, q, rp);
  rank_r_tiles<T, 1, kP, kQ>(m, rows, n, a, lda, f, u, p, q, rp);
}

template <typename T>
__attribute__((always_inline)) inline void rank_r_pass_dispatch(int64_t rows, int64_t n,
                                                                const T* a, int64_t lda,
                                                                const T* f, const T* u, T* p,
                                                                T* q, int64_t rp) {
  if (p != nullptr && q != nullptr)
    rank_r_pass_body<T, true, true>(rows, n, a, lda, f, u, p, q, rp);
  else if (p != nullptr)
    rank_r_pass_body<T, true, false>(rows, n, a, lda, f, u, p, q, rp);
  else if (q != nullptr)
    rank_r_pass_body<T, false, true>(rows, n, a, lda, f, u, p, q, rp);
}

// p (when not null) = a f and q (when not null) += a^T u, as above.
FASTPEFT_CPU_CLONES static void rank_r_pass(int64_t rows, int64_t n, const float* a, int64_t lda,
                                            const float* f, const float* u, float* p, float* q,
                                            int64_t rp) {
  rank_r_pass_dispatch<float>(rows, n, a, lda, f, u, p, q, rp);
}
FASTPEFT_CPU_CLONES static void rank_r_pass(int64_t rows, int64_t n, const double* a,
                                            int64_t lda, const double* f, const double* u,
                                            double* p, double* q, int64_t rp) {
  rank_r_pass_dispatch<double>(rows, n, a, lda, f, u, p, q, rp);
}

// The expand: out[i, c] = (bias ? bias[c] : 0) + sum_j t[i, j] * b[j, c] for i < rows,
// c < n (t [rows, r] with row stride ldt, b [r, n] contiguous, out with row stride ldo):
// the forward's y = bias + t (scaling B)^T and the backward's h = g A. Register-blocked
// RM rows x CV vectors; a tile of RM rows covers all n columns and prefetches (for
// writing) the out rows of the next tile (npf of them).
template <typename T, int RM, int CV>
__attribute__((always_inline)) inline void rank_r_expand_cols(int64_t c, int64_t r,
                                                              const T* t, int64_t ldt,
                                                              const T* b, int64_t n,
                                                              const T* bias, T* out,
                                                              int64_t ldo) {
  using V = typename Vec64<T>::type;
  constexpr int W = 64 / sizeof(T);
  V acc[RM][CV];
  for (int l = 0; l < CV; ++l) {
    const V b0 = bias != nullptr ? load64(bias + c + l * W) : V{};
    for (int i = 0; i < RM; ++i) acc[i][l] = b0;
  }
  for (int64_t j = 0; j < r; ++j) {
    V bv[CV];
    for (int l = 0; l < CV; ++l) bv[l] = load64(b + j * n + c + l * W);
    for (int i = 0; i < RM; ++i) {
      const T tv = t[i * ldt + j];
      for (int l = 0; l < CV; ++l) acc[i][l] += tv * bv[l];
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int l = 0; l < CV; ++l) store64(out + i * ldo + c + l * W, acc[i][l]);
}

template <typename T, int RM>
__attribute__((always_inline)) inline void rank_r_expand_rows(int64_t n, int64_t r, const T* t,
                                                              int64_t ldt, const T* b,
                                                              const T* bias, T* out,
                                                              int64_t ldo, int npf) {
  constexpr int W = 64 / sizeof(T), CV = 4;
  int64_t c = 0;
  for (; c + CV * W <= n; c += CV * W) {
    for (int i = 0; i < npf; ++i)
      for (int l = 0; l < CV; ++l) __builtin_prefetch(out + (RM + i) * ldo + c + l * W, 1, 3);
    rank_r_expand_cols<T, RM, CV>(c, r, t, ldt, b, n, bias, out, ldo);
  }
  for (; c + W <= n; c += W) rank_r_expand_cols<T, RM, 1>(c, r, t, ldt, b, n, bias, out, ldo);
  for (; c < n; ++c)
    for (int i = 0; i < RM; ++i) {
      T acc = bias != nullptr ? bias[c] : T(0);
      for (int64_t j = 0; j < r; ++j) acc += t[i * ldt + j] * b[j * n + c];
      out[i * ldo + c] = acc;
    }
}

template <typename T>
__attribute__((always_inline)) inline void rank_r_expand_body(int64_t rows, int64_t n,
                                                              int64_t r, const T* t,
                                                              int64_t ldt, const T* b,
                                                              const T* bias, T* out,
                                                              int64_t ldo) {
  constexpr int RM = 4;
  int64_t m = 0;
  for (; m + RM <= rows; m += RM) {
    const int npf = static_cast<int>(std::min<int64_t>(RM, rows - m - RM));
    rank_r_expand_rows<T, RM>(n, r, t + m * ldt, ldt, b, bias, out + m * ldo, ldo, npf);
  }
  for (; m < rows; ++m)
    rank_r_expand_rows<T, 1>(n, r, t + m * ldt, ldt, b, bias, out + m * ldo, ldo, 0);
}

FASTPEFT_CPU_CLONES static void rank_r_expand(int64_t rows, int64_t n, int64_t r,
                                              const float* t, int64_t ldt, const float* b,
                                              const float* bias, float* out, int64_t ldo) {
  rank_r_expand_body<float>(rows, n, r, t, ldt, b, bias, out, ldo);
}
FASTPEFT_CPU_CLONES static void rank_r_expand(int64_t rows, int64_t n, int64_t r,
                                              const double* t, int64_t ldt, const double* b,
                                              const double* bias, double* out, int64_t ldo) {
  rank_r_expand_body<double>(rows, n, r, t, ldt, b, bias, out, ldo);
}

}  // namespace fastpeft::cpu
