// CPU prefix_attention forward and backward: flash-style blocked attention over
// [prefix ; sequence] keys (the op is defined in torch_bindings.cpp), never building the
// [B, H, P + T, D] concat nor more than one block of scores per thread.
//
// The G = Hq / Hkv query heads that share a kv head are processed together: their rows of a
// block of n query positions are stacked ([G * n, D], row g * n + r is head g, position
// i0 + r), so each K / V block is read once per stacked block and the GEMMs are G times taller.
//
// Forward, parallel over (batch, kv head, query block): walk the prefix key blocks, then the
// sequence key blocks up to the diagonal (causal), skipping blocks that the key padding mask
// hides entirely; online softmax with a running max m, sum l and unnormalised output O per
// row. Saves lse = m + log l (+inf when no key is visible; the output is then 0).
//
// Backward, parallel over (batch, kv head), so that a unit owns dk / dv of its kv head (when
// there are too few of them for the threads, over query-block slices of them, each with its
// own dk / dv partial, summed after): per query block, delta = rowsum(dO * O), then per key
// block (the same walk)
//   p = exp(s - lse), dV += p^T dO, dp = dO V^T, ds = p (dp - delta),
//   dQ += scale ds K, dK += ds^T (scale q).
// The prefix grads go to a per-batch partial [B, Hkv, P, D], summed over the batch at the end
// when the prefix has batch 1 (no races, no atomics).
//
// q is scaled once as it is loaded (s = (scale q) . k). Blocks are converted to the
// accumulation type (fp32 for fp32 / bf16, fp64 for fp64) when they are not already in it.
// GEMMs go to the BLAS that libtorch_cpu links (MKL) on the blocks; the row passes (masking,
// max, exp, sums) use 64-byte GCC vectors in functions cloned per ISA.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/prefix_attention_checks.h"
#include "cpu/vec64.h"
#include "ops.h"

// The Fortran BLAS that libtorch_cpu links and exports (MKL in the x86-64 wheels), as ATen's
// CPUBlas.cpp declares it (ATen's own cpublas::gemm is not exported). Weak, so that fastpeft
// still loads on a torch without them; the kernels then fail with a clear error.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastpeft {
namespace {

using vec64::load64;
using vec64::store64;
using vec64::Vec;
using vec64::vexp;

void check_blas() {
  TORCH_CHECK(sgemm_ != nullptr && dgemm_ != nullptr,
              "fastpeft: the CPU prefix_attention kernel calls the BLAS (sgemm_ / dgemm_) that "
              "libtorch_cpu exports, and this torch build does not export it");
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C (op = transpose when ta / tb), through the
// column-major BLAS as C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // head_dim 0: the BLAS would reject the leading dimensions
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    dgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
}

constexpr int64_t kBK = 64;  // keys per block (a multiple of every vector width)

// Query positions per block: 64, halved (down to 16) while the G-fold stacked rows pass 256.
int64_t query_block(int64_t G) {
  int64_t n = 64;
  while (n > 16 && n * G > 256) n /= 2;
  return n;
}

// Which leading keys of a key block each stacked row sees, and the padding mask's bias.
template <typename T>
struct RowMask {
  int64_t mb = 0;      // keys in the block
  bool diag = false;   // causal diagonal block: row r sees clamp(lim0 + r % n, 0, mb) keys
  int64_t lim0 = 0, n = 1;
  const T* bias = nullptr;  // 0 / -inf per key of the block (padding mask), or none
  int64_t limit(int64_t r) const {
    return diag ? std::clamp<int64_t>(lim0 + r % n, 0, mb) : mb;
  }
};

// Calls f(seq, j0, rowmask) for each key block that query positions [i0, i0 + n) may see: the
// prefix blocks (j0 in the prefix), then the sequence blocks (j0 in the sequence) up to the
// diagonal when causal, skipping those the padding mask hides entirely (cnt: prefix counts
// of visible keys of this batch row, bias: its 0 / -inf per key; both null without a mask).
template <typename T, typename F>
inline void for_each_key_block(int64_t P, int64_t T_, int64_t i0, int64_t n, bool causal,
                               const T* bias, const int64_t* cnt, F&& f) {
  for (int64_t j0 = 0; j0 < P; j0 += kBK) {
    RowMask<T> rm;
    rm.mb = std::min(kBK, P - j0);
    f(false, j0, rm);
  }
  const int64_t jend = causal ? std::min(T_, i0 + n) : T_;
  for (int64_t j0 = 0; j0 < jend; j0 += kBK) {
    RowMask<T> rm;
    rm.mb = std::min(kBK, T_ - j0);
    if (cnt != nullptr && cnt[j0 + rm.mb] == cnt[j0]) continue;
    // Row r is position i0 + r % n and sees sequence keys j <= i0 + r % n.
    rm.diag = causal && j0 + rm.mb - 1 > i0;
    rm.lim0 = i0 - j0 + 1;
    rm.n = n;
    rm.bias = bias != nullptr ? bias + j0 : nullptr;
    f(true, j0, rm);
  }
}

// ---- row passes over a score block S [R, kBK] (row stride kBK), vectorised ----------------

template <typename T>
__attribute__((always_inline)) inline Vec<T> iota_vec() {
  Vec<T> v;
  for (int i = 0; i < static_cast<int>(64 / sizeof(T)); ++i) v[i] = T(i);
  return v;
}

// s[c] for the first `len` columns (a multiple of the vector width, >= lim): the score plus
// the padding bias for c < lim, -inf from lim on.
template <typename T>
__attribute__((always_inline)) inline Vec<T> masked_scores(const T* s, const T* bias, int64_t c,
                                                           Vec<T> iota, Vec<T> limv) {
  Vec<T> x = load64(s + c);
  if (bias != nullptr) x += load64(bias + c);
  const Vec<T> ninf = Vec<T>{} - std::numeric_limits<T>::infinity();
  return (iota + T(c)) < limv ? x : ninf;
}

// Forward: one key block's scores S -> probabilities exp(s - m_new) in place (0 where
// hidden), with the running max m, sum l and the rows of O rescaled by exp(m_old - m_new).
template <typename T>
__attribute__((always_inline)) inline void fwd_softmax_body(T* S, int64_t R,
                                                            const RowMask<T>& rm, T* m, T* l,
                                                            T* O, int64_t D) {
  constexpr int W = 64 / sizeof(T);
  const T inf = std::numeric_limits<T>::infinity();
  const Vec<T> iota = iota_vec<T>();
  for (int64_t r = 0; r < R; ++r) {
    T* s = S + r * kBK;
    const int64_t lim = rm.limit(r);
    const int64_t len = (lim + W - 1) / W * W;
    const Vec<T> limv = Vec<T>{} + T(lim);
    Vec<T> vmax = Vec<T>{} - inf;
    for (int64_t c = 0; c < len; c += W) {
      const Vec<T> x = masked_scores(s, rm.bias, c, iota, limv);
      store64(s + c, x);
      vmax = x > vmax ? x : vmax;
    }
    T mx = -inf;
    for (int i = 0; i < W; ++i) mx = std::max(mx, vmax[i]);
    if (mx == -inf) {  // nothing visible in this block
      std::fill(s, s + kBK, T(0));
      continue;
    }
    const T mnew = std::max(m[r], mx);
    const T alpha = std::exp(m[r] - mnew);  // 0 for the first visible block (m = -inf)
    const Vec<T> mv = Vec<T>{} + mnew;
    Vec<T> vsum = Vec<T>{};
    for (int64_t c = 0; c < len; c += W) {
      const Vec<T> p = vexp(load64(s + c) - mv);
      store64(s + c, p);
      vsum += p;
    }
    std::fill(s + len, s + kBK, T(0));
    T sum = 0;
    for (int i = 0; i < W; ++i) sum += vsum[i];
    l[r] = l[r] * alpha + sum;
    m[r] = mnew;
    if (alpha != T(1)) {
      T* o = O + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
    }
  }
}

// Backward: scores S -> p = exp(s - lse) in place (0 where hidden or lse = +inf).
template <typename T>
__attribute__((always_inline)) inline void bwd_probs_body(T* S, int64_t R, const RowMask<T>& rm,
                                                          const T* lse) {
  constexpr int W = 64 / sizeof(T);
  const Vec<T> iota = iota_vec<T>();
  for (int64_t r = 0; r < R; ++r) {
    T* s = S + r * kBK;
    const int64_t lim = rm.limit(r);
    if (lim == 0 || lse[r] == std::numeric_limits<T>::infinity()) {
      std::fill(s, s + kBK, T(0));
      continue;
    }
    const int64_t len = (lim + W - 1) / W * W;
    const Vec<T> limv = Vec<T>{} + T(lim), lv = Vec<T>{} + lse[r];
    for (int64_t c = 0; c < len; c += W)
      store64(s + c, vexp(masked_scores(s, rm.bias, c, iota, limv) - lv));
    std::fill(s + len, s + kBK, T(0));
  }
}

// Backward: dP -> ds = p (dp - delta) in place.
template <typename T>
__attribute__((always_inline)) inline void bwd_dscores_body(T* dP, const T* S, int64_t R,
                                                            int64_t mb, const T* delta) {
  constexpr int W = 64 / sizeof(T);
  const int64_t len = (mb + W - 1) / W * W;
  for (int64_t r = 0; r < R; ++r) {
    const Vec<T> dl = Vec<T>{} + delta[r];
    T* dp = dP + r * kBK;
    const T* p = S + r * kBK;
    for (int64_t c = 0; c < len; c += W) store64(dp + c, load64(p + c) * (load64(dp + c) - dl));
  }
}

FASTPEFT_CPU_CLONES static void fwd_softmax(float* S, int64_t R, const RowMask<float>& rm,
                                            float* m, float* l, float* O, int64_t D) {
  fwd_softmax_body<float>(S, R, rm, m, l, O, D);
}
static void fwd_softmax(double* S, int64_t R, const RowMask<double>& rm, double* m, double* l,
                        double* O, int64_t D) {
  fwd_softmax_body<double>(S, R, rm, m, l, O, D);
}
FASTPEFT_CPU_CLONES static void bwd_probs(float* S, int64_t R, const RowMask<float>& rm,
                                          const float* lse) {
  bwd_probs_body<float>(S, R, rm, lse);
}
static void bwd_probs(double* S, int64_t R, const RowMask<double>& rm, const double* lse) {
  bwd_probs_body<double>(S, R, rm, lse);
}
FASTPEFT_CPU_CLONES static void bwd_dscores(float* dP, const float* S, int64_t R, int64_t mb,
                                            const float* delta) {
  bwd_dscores_body<float>(dP, S, R, mb, delta);
}
static void bwd_dscores(double* dP, const double* S, int64_t R, int64_t mb,
                        const double* delta) {
  bwd_dscores_body<double>(dP, S, R, mb, delta);
}

// ---- shared set-up --------------------------------------------------------------------------

struct Dims {
  int64_t B, Hq, Hkv, G, T, P, D, Bp;
  explicit Dims(const Tensor& q, const Tensor& k, const Tensor& prefix_k)
      : B(q.size(0)), Hq(q.size(1)), Hkv(k.size(1)), G(q.size(1) / k.size(1)), T(q.size(2)),
        P(prefix_k.size(2)), D(q.size(3)), Bp(prefix_k.size(0)) {}
};

// The padding mask per batch row as a bias (0 / -inf, row stride T + kBK so that a block's
// vector loads stay inside) and prefix counts of visible keys ([B, T + 1]) to skip blocks.
template <typename T>
struct PaddingMask {
  std::vector<T> bias;
  std::vector<int64_t> cnt;
  int64_t T_ = 0;
  bool on = false;
  PaddingMask(const std::optional<Tensor>& mask, int64_t B, int64_t T_in) : T_(T_in) {
    if (!mask.has_value()) return;
    on = true;
    const bool* mk = mask->data_ptr<bool>();
    bias.assign(static_cast<size_t>(B * (T_ + kBK)), -std::numeric_limits<T>::infinity());
    cnt.assign(static_cast<size_t>(B * (T_ + 1)), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < T_; ++j) {
        const bool vis = mk[b * T_ + j];
        bias[b * (T_ + kBK) + j] = vis ? T(0) : -std::numeric_limits<T>::infinity();
        cnt[b * (T_ + 1) + j + 1] = cnt[b * (T_ + 1) + j] + (vis ? 1 : 0);
      }
  }
  const T* bias_of(int64_t b) const { return on ? bias.data() + b * (T_ + kBK) : nullptr; }
  const int64_t* cnt_of(int64_t b) const { return on ? cnt.data() + b * (T_ + 1) : nullptr; }
};

template <typename dst_t, typename src_t>
inline void convert(const src_t* src, dst_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
}

// dst = mul * src in the accumulation type (the scaled q rows).
template <typename op_t, typename src_t>
inline void convert_scaled(const src_t* src, op_t* dst, int64_t n, op_t mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<op_t>(src[i]) * mul;
}

// A [rows, D] block in op_t: the data itself when it already is, else converted into buf.
template <typename op_t, typename scalar_t>
inline const op_t* block_in(const scalar_t* src, int64_t n, op_t* buf) {
  if constexpr (std::is_same_v<op_t, scalar_t>) {
    return src;
  } else {
    convert(src, buf, n);
    return buf;
  }
}

// ---- forward --------------------------------------------------------------------------------

template <typename scalar_t>
void forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                  const Tensor& prefix_v, const std::optional<Tensor>& attn_mask, bool causal,
                  double scale, Tensor& out, Tensor& lse) {
  using op_t = at::opmath_type<scalar_t>;
  const Dims d(q, k, prefix_k);
  const int64_t G = d.G, T = d.T, P = d.P, D = d.D, Hkv = d.Hkv;
  const int64_t nq = query_block(G), nqb = (T + nq - 1) / nq;
  const PaddingMask<op_t> pm(attn_mask, d.B, T);
  const scalar_t *Q = q.data_ptr<scalar_t>(), *K = k.data_ptr<scalar_t>();
  const scalar_t *V = v.data_ptr<scalar_t>(), *PK = prefix_k.data_ptr<scalar_t>();
  const scalar_t* PV = prefix_v.data_ptr<scalar_t>();
  scalar_t* OUT = out.data_ptr<scalar_t>();
  op_t* LSE = lse.data_ptr<op_t>();
  const op_t sc = static_cast<op_t>(scale);
  const op_t inf = std::numeric_limits<op_t>::infinity();

  at::parallel_for(0, d.B * Hkv * nqb, 1, [&](int64_t u0, int64_t u1) {
    const int64_t rmax = G * nq;
    std::vector<op_t> qs(rmax * D), s(rmax * kBK), o(rmax * D), m(rmax), l(rmax);
    std::vector<op_t> kc, vc;
    if constexpr (!std::is_same_v<op_t, scalar_t>) kc.resize(kBK * D), vc.resize(kBK * D);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / (Hkv * nqb), h = u / nqb % Hkv, i0 = u % nqb * nq;
      const int64_t n = std::min(nq, T - i0), R = G * n;
      const int64_t bp = d.Bp == 1 ? 0 : b;
      for (int64_t g = 0; g < G; ++g)
        convert_scaled(Q + ((b * d.Hq + h * G + g) * T + i0) * D, qs.data() + g * n * D, n * D,
                       sc);
      std::fill(m.begin(), m.begin() + R, -inf);
      std::fill(l.begin(), l.begin() + R, op_t(0));
      std::fill(o.begin(), o.begin() + R * D, op_t(0));
      const scalar_t* kseg[2] = {PK + (bp * Hkv + h) * P * D, K + (b * Hkv + h) * T * D};
      const scalar_t* vseg[2] = {PV + (bp * Hkv + h) * P * D, V + (b * Hkv + h) * T * D};
      for_each_key_block<op_t>(
          P, T, i0, n, causal, pm.bias_of(b), pm.cnt_of(b),
          [&](bool seq, int64_t j0, const RowMask<op_t>& rm) {
            const op_t* kb = block_in<op_t>(kseg[seq] + j0 * D, rm.mb * D, kc.data());
            const op_t* vb = block_in<op_t>(vseg[seq] + j0 * D, rm.mb * D, vc.data());
            gemm<op_t>(false, true, R, rm.mb, D, 1, qs.data(), D, kb, D, 0, s.data(), kBK);
            fwd_softmax(s.data(), R, rm, m.data(), l.data(), o.data(), D);
            gemm<op_t>(false, false, R, D, rm.mb, 1, s.data(), kBK, vb, D, 1, o.data(), D);
          });
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row0 = (b * d.Hq + h * G + g) * T + i0;
        for (int64_t r = 0; r < n; ++r) {
          const int64_t rr = g * n + r;
          const op_t inv = l[rr] > 0 ? op_t(1) / l[rr] : op_t(0);  // no key seen: out 0
          LSE[row0 + r] = l[rr] > 0 ? m[rr] + std::log(l[rr]) : inf;
          scalar_t* dst = OUT + (row0 + r) * D;
          const op_t* src = o.data() + rr * D;
          for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<scalar_t>(src[c] * inv);
        }
      }
    }
  });
}

// ---- backward -------------------------------------------------------------------------------

// Query-block slices per (batch, kv head) in the backward. One unit per (batch, kv head) owns
// its dk / dv; when there are too few units to share the threads equally, each is cut into S
// slices of its query blocks, each slice accumulating its own dk / dv partial (summed after).
// S makes the unit count a multiple of the thread count, at most 4 (the partials' memory).
int64_t backward_slices(int64_t units, int64_t nqb, int64_t nthreads) {
  if (units == 0 || units % nthreads == 0 || units >= 4 * nthreads) return 1;
  const int64_t s = nthreads / std::gcd(units, nthreads);
  return std::max<int64_t>(1, std::min<int64_t>({s, 4, nqb}));
}

// The slice that query block qb belongs to: zigzag (0, 1, .., S-1, S-1, .., 0, 0, ..) so that
// the causal blocks' growing costs even out across the slices.
int64_t slice_of(int64_t qb, int64_t S) {
  const int64_t p = qb % (2 * S);
  return p < S ? p : 2 * S - 1 - p;
}

template <typename scalar_t>
void backward_impl(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& prefix_k, const Tensor& prefix_v,
                   const std::optional<Tensor>& attn_mask, const Tensor& out, const Tensor& lse,
                   bool causal, double scale, Tensor& dq, Tensor& dk, Tensor& dv,
                   Tensor& dpk_part, Tensor& dpv_part) {
  using op_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<op_t, scalar_t>;
  const Dims d(q, k, prefix_k);
  const int64_t G = d.G, T = d.T, P = d.P, D = d.D, Hkv = d.Hkv, nk = P + T;
  const int64_t nq = query_block(G), nqb = (T + nq - 1) / nq;
  const int64_t S = backward_slices(d.B * Hkv, nqb, std::max<int64_t>(at::get_num_threads(), 1));
  const PaddingMask<op_t> pm(attn_mask, d.B, T);
  const scalar_t *GO = grad_out.data_ptr<scalar_t>(), *Q = q.data_ptr<scalar_t>();
  const scalar_t *K = k.data_ptr<scalar_t>(), *V = v.data_ptr<scalar_t>();
  const scalar_t *PK = prefix_k.data_ptr<scalar_t>(), *PV = prefix_v.data_ptr<scalar_t>();
  const scalar_t* OUT = out.data_ptr<scalar_t>();
  const op_t* LSE = lse.data_ptr<op_t>();
  scalar_t *DQ = dq.data_ptr<scalar_t>(), *DK = dk.data_ptr<scalar_t>();
  scalar_t* DV = dv.data_ptr<scalar_t>();
  op_t *DPK = dpk_part.data_ptr<op_t>(), *DPV = dpv_part.data_ptr<op_t>();
  const op_t sc = static_cast<op_t>(scale);
  // With slices: each unit's dk and dv over [prefix ; sequence] keys, [units, 2, nk, D].
  std::vector<op_t> slice_parts(S > 1 ? static_cast<size_t>(d.B * Hkv * S * 2 * nk * D) : 0);

  // A (batch, kv head)'s dk / dv over [prefix ; sequence] -> dk, dv and the prefix partials.
  auto write_kv_grads = [&](int64_t b, int64_t h, const op_t* dka, const op_t* dva) {
    convert(dka + P * D, DK + (b * Hkv + h) * T * D, T * D);
    convert(dva + P * D, DV + (b * Hkv + h) * T * D, T * D);
    std::copy(dka, dka + P * D, DPK + (b * Hkv + h) * P * D);
    std::copy(dva, dva + P * D, DPV + (b * Hkv + h) * P * D);
  };

  at::parallel_for(0, d.B * Hkv * S, 1, [&](int64_t u0, int64_t u1) {
    const int64_t rmax = G * nq;
    std::vector<op_t> qs(rmax * D), gob(rmax * D), dqa(rmax * D), s(rmax * kBK), dp(rmax * kBK);
    std::vector<op_t> lr(rmax), delta(rmax), dka(nk * D), dva(nk * D), kc, vc;
    if constexpr (!kDirect) kc.resize(nk * D), vc.resize(nk * D);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / S / Hkv, h = u / S % Hkv, slice = u % S, bp = d.Bp == 1 ? 0 : b;
      const scalar_t* kseg[2] = {PK + (bp * Hkv + h) * P * D, K + (b * Hkv + h) * T * D};
      const scalar_t* vseg[2] = {PV + (bp * Hkv + h) * P * D, V + (b * Hkv + h) * T * D};
      // This kv head's keys / values in op_t, prefix rows first: converted once per unit.
      const op_t* kall[2];
      const op_t* vall[2];
      if constexpr (kDirect) {
        kall[0] = kseg[0], kall[1] = kseg[1], vall[0] = vseg[0], vall[1] = vseg[1];
      } else {
        convert(kseg[0], kc.data(), P * D), convert(kseg[1], kc.data() + P * D, T * D);
        convert(vseg[0], vc.data(), P * D), convert(vseg[1], vc.data() + P * D, T * D);
        kall[0] = kc.data(), kall[1] = kc.data() + P * D;
        vall[0] = vc.data(), vall[1] = vc.data() + P * D;
      }
      std::fill(dka.begin(), dka.end(), op_t(0));
      std::fill(dva.begin(), dva.end(), op_t(0));
      for (int64_t qb = 0; qb < nqb; ++qb) {
        if (slice_of(qb, S) != slice) continue;
        const int64_t i0 = qb * nq, n = std::min(nq, T - i0), R = G * n;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row0 = (b * d.Hq + h * G + g) * T + i0;
          convert_scaled(Q + row0 * D, qs.data() + g * n * D, n * D, sc);
          convert(GO + row0 * D, gob.data() + g * n * D, n * D);
          for (int64_t r = 0; r < n; ++r) {
            const op_t* go = gob.data() + (g * n + r) * D;
            const scalar_t* o = OUT + (row0 + r) * D;
            op_t acc = 0;
            for (int64_t c = 0; c < D; ++c) acc += go[c] * static_cast<op_t>(o[c]);
            delta[g * n + r] = acc;
            lr[g * n + r] = LSE[row0 + r];
          }
        }
        std::fill(dqa.begin(), dqa.begin() + R * D, op_t(0));
        for_each_key_block<op_t>(
            P, T, i0, n, causal, pm.bias_of(b), pm.cnt_of(b),
            [&](bool seq, int64_t j0, const RowMask<op_t>& rm) {
              const int64_t mb = rm.mb;
              const op_t* kb = kall[seq] + j0 * D;
              const op_t* vb = vall[seq] + j0 * D;
              op_t* dkb = dka.data() + (seq ? P + j0 : j0) * D;
              op_t* dvb = dva.data() + (seq ? P + j0 : j0) * D;
              gemm<op_t>(false, true, R, mb, D, 1, qs.data(), D, kb, D, 0, s.data(), kBK);
              bwd_probs(s.data(), R, rm, lr.data());
              gemm<op_t>(true, false, mb, D, R, 1, s.data(), kBK, gob.data(), D, 1, dvb, D);
              gemm<op_t>(false, true, R, mb, D, 1, gob.data(), D, vb, D, 0, dp.data(), kBK);
              bwd_dscores(dp.data(), s.data(), R, mb, delta.data());
              gemm<op_t>(false, false, R, D, mb, sc, dp.data(), kBK, kb, D, 1, dqa.data(), D);
              gemm<op_t>(true, false, mb, D, R, 1, dp.data(), kBK, qs.data(), D, 1, dkb, D);
            });
        for (int64_t g = 0; g < G; ++g)
          convert(dqa.data() + g * n * D, DQ + ((b * d.Hq + h * G + g) * T + i0) * D, n * D);
      }
      if (S == 1) {
        write_kv_grads(b, h, dka.data(), dva.data());
      } else {
        op_t* part = slice_parts.data() + u * 2 * nk * D;
        std::copy(dka.begin(), dka.end(), part);
        std::copy(dva.begin(), dva.end(), part + nk * D);
      }
    }
  });
  if (S == 1) return;
  // Sum the slices' partials of each (batch, kv head) into the first slice's.
  at::parallel_for(0, d.B * Hkv, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      op_t* sum = slice_parts.data() + u * S * 2 * nk * D;
      for (int64_t sl = 1; sl < S; ++sl) {
        const op_t* part = sum + sl * 2 * nk * D;
        for (int64_t i = 0; i < 2 * nk * D; ++i) sum[i] += part[i];
      }
      write_kv_grads(u / Hkv, u % Hkv, sum, sum + nk * D);
    }
  });
}

at::ScalarType lse_dtype(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<Tensor, Tensor> prefix_attention_cpu(const Tensor& q_in, const Tensor& k_in,
                                                const Tensor& v_in, const Tensor& prefix_k_in,
                                                const Tensor& prefix_v_in,
                                                const std::optional<Tensor>& attn_mask_in,
                                                bool causal, double scale) {
  check_prefix_attention_args(q_in, k_in, v_in, prefix_k_in, prefix_v_in, attn_mask_in);
  TORCH_CHECK(q_in.device().is_cpu(), "fastpeft: prefix_attention_cpu needs CPU tensors, got q on ",
              q_in.device());
  check_blas();
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor prefix_k = prefix_k_in.contiguous(), prefix_v = prefix_v_in.contiguous();
  std::optional<Tensor> attn_mask;
  if (attn_mask_in.has_value()) attn_mask = attn_mask_in->contiguous();
  Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefix_attention_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse);
  });
  return {out, lse};
}

Grads5 prefix_attention_backward_cpu(const Tensor& grad_out_in, const Tensor& q_in,
                                     const Tensor& k_in, const Tensor& v_in,
                                     const Tensor& prefix_k_in, const Tensor& prefix_v_in,
                                     const std::optional<Tensor>& attn_mask_in,
                                     const Tensor& out_in, const Tensor& lse_in, bool causal,
                                     double scale) {
  check_prefix_attention_args(q_in, k_in, v_in, prefix_k_in, prefix_v_in, attn_mask_in);
  check_prefix_attention_backward_args(grad_out_in, q_in, out_in, lse_in);
  TORCH_CHECK(q_in.device().is_cpu(),
              "fastpeft: prefix_attention_backward_cpu needs CPU tensors, got q on ",
              q_in.device());
  check_blas();
  const Tensor grad_out = grad_out_in.contiguous(), q = q_in.contiguous();
  const Tensor k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor prefix_k = prefix_k_in.contiguous(), prefix_v = prefix_v_in.contiguous();
  const Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  std::optional<Tensor> attn_mask;
  if (attn_mask_in.has_value()) attn_mask = attn_mask_in->contiguous();
  Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  // Prefix grads per batch row in the accumulation type, summed over the batch below when
  // the prefix is shared (batch 1).
  const auto part_opts = q.options().dtype(lse_dtype(q));
  Tensor dpk_part = at::empty({q.size(0), k.size(1), prefix_k.size(2), q.size(3)}, part_opts);
  Tensor dpv_part = at::empty_like(dpk_part);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefix_attention_backward_cpu",
                                 [&] {
                                   backward_impl<scalar_t>(grad_out, q, k, v, prefix_k, prefix_v,
                                                           attn_mask, out, lse, causal, scale,
                                                           dq, dk, dv, dpk_part, dpv_part);
                                 });
  const bool shared = prefix_k.size(0) == 1 && q.size(0) != 1;
  Tensor dpk = shared ? dpk_part.sum(0, /*keepdim=*/true) : dpk_part;
  Tensor dpv = shared ? dpv_part.sum(0, /*keepdim=*/true) : dpv_part;
  return {dq, dk, dv, dpk.to(q.scalar_type()), dpv.to(q.scalar_type())};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("prefix_attention", &fastpeft::prefix_attention_cpu);
  m.impl("prefix_attention_backward", &fastpeft::prefix_attention_backward_cpu);
}
