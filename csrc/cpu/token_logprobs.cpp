// CPU token_logprobs forward and backward (semantics: csrc/torch_bindings.cpp, ops.h).
//
// Rows run in parallel (at::parallel_for). Each row is read once from memory in blocks of kB
// values: a block is copied into an L1 buffer of the accumulation type (fp32; fp64 for fp64
// logits), its max taken, and the running (max m of the raw logits, s = sum exp(d),
// t = sum exp(d) d with d = (z - m) / temperature) rescaled and extended: an online
// log-sum-exp over blocks, one exp per value. z - m is exact near the max, so the row's
// numbers do not lose the bits a large common offset / temperature would cost.
// Then logp = (z[token] - m) / T - log s, entropy = log s - t / s; stats keeps (m, log s, t / s).
// Backward: per block d = (z - m) / T, p = exp(d - log s) and
//   grad_z' = -p (g_logp + g_entropy (d - t / s)) + g_logp onehot(token),
// grad_logits = grad_z' / T, written in logits' dtype. Only the three stats per row are kept
// besides the logits. The row passes use 64-byte GCC vectors in functions cloned per ISA
// (as cpu/prefix_attention.cpp, whose Cephes exp this repeats).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/token_logprobs_checks.h"
#include "cpu/vec64.h"
#include "ops.h"

namespace fastpeft {
namespace {

using vec64::hmax;
using vec64::hsum;
using vec64::load64;
using vec64::store64;
using vec64::Vec;
using vec64::vexp;

constexpr int64_t kB = 1024;  // values per block (a multiple of every vector width)

template <typename S, typename T>
__attribute__((always_inline)) inline T to_acc(S v) {
  return static_cast<T>(static_cast<float>(v));
}
template <>
__attribute__((always_inline)) inline double to_acc<double, double>(double v) {
  return v;
}

// buf[0, n) = src[0, n), padded with -inf up to the vector width; returns the padded length.
template <typename S, typename T>
__attribute__((always_inline)) inline int64_t load_block(const S* src, int64_t n, T* buf) {
  constexpr int64_t W = 64 / sizeof(T);
  for (int64_t i = 0; i < n; ++i) buf[i] = to_acc<S, T>(src[i]);
  const int64_t np = (n + W - 1) / W * W;
  for (int64_t i = n; i < np; ++i) buf[i] = -std::numeric_limits<T>::infinity();
  return np;
}

// One row's forward: out = (m, log s, t / s) (t / s only when kEntropy, else 0).
template <bool kEntropy, typename S, typename T>
__attribute__((always_inline)) inline void fwd_row_body(const S* src, int64_t V, T inv_t,
                                                        T* out) {
  constexpr int64_t W = 64 / sizeof(T);
  alignas(64) T buf[kB];
  const T ninf = -std::numeric_limits<T>::infinity();
  const Vec<T> lowest = Vec<T>{} + std::numeric_limits<T>::lowest();
  T m = ninf, s = 0, t = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kB) {
    const int64_t np = load_block(src + j0, std::min(kB, V - j0), buf);
    Vec<T> mv = Vec<T>{} + ninf;
    for (int64_t c = 0; c < np; c += W) {
      const Vec<T> x = load64(buf + c);
      mv = x > mv ? x : mv;
    }
    const T mnew = std::max(m, hmax<T>(mv));
    if (mnew == ninf) continue;  // everything so far is -inf
    if (s > 0 && mnew > m) {     // rescale to the new max: t is relative to m
      const T dm = (m - mnew) * inv_t;
      const T alpha = std::exp(dm);
      if constexpr (kEntropy) t = alpha * (t + s * dm);
      s *= alpha;
    }
    m = mnew;
    const Vec<T> mvec = Vec<T>{} + m, itv = Vec<T>{} + inv_t;
    Vec<T> sv{}, tv{};
    for (int64_t c = 0; c < np; c += W) {
      const Vec<T> d = (load64(buf + c) - mvec) * itv;
      const Vec<T> e = vexp(d);
      sv += e;
      if constexpr (kEntropy) tv += e * (d < lowest ? lowest : d);  // 0 * -inf -> 0
    }
    s += hsum<T>(sv);
    if constexpr (kEntropy) t += hsum<T>(tv);
  }
  out[0] = m;
  out[1] = std::log(s);
  out[2] = kEntropy ? t / s : T(0);
}

// One row's backward: dst = (-p (gl + gh (d - e)) + gl onehot(tok)) * inv_t with
// d = (z - m) * inv_t, p = exp(d - log_s).
template <bool kEntropy, typename S, typename T>
__attribute__((always_inline)) inline void bwd_row_body(const S* src, int64_t V, int64_t tok,
                                                        T inv_t, T gl, T gh, T m, T log_s, T e,
                                                        S* dst) {
  constexpr int64_t W = 64 / sizeof(T);
  alignas(64) T buf[kB];
  const Vec<T> mv = Vec<T>{} + m, lsv = Vec<T>{} + log_s, ev = Vec<T>{} + e,
               glv = Vec<T>{} + gl, ghv = Vec<T>{} + gh, itv = Vec<T>{} + inv_t;
  for (int64_t j0 = 0; j0 < V; j0 += kB) {
    const int64_t n = std::min(kB, V - j0);
    const int64_t np = load_block(src + j0, n, buf);
    for (int64_t c = 0; c < np; c += W) {
      const Vec<T> d = (load64(buf + c) - mv) * itv;
      const Vec<T> p = vexp(d - lsv);
      Vec<T> coef = glv;
      if constexpr (kEntropy) coef += ghv * (d - ev);
      const Vec<T> g = Vec<T>{} - p * coef * itv;
      store64(buf + c, p > Vec<T>{} ? g : Vec<T>{});  // -inf logits: 0, not 0 * inf
    }
    if (tok >= j0 && tok < j0 + n) buf[tok - j0] += gl * inv_t;
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(dst + j0, buf, n * sizeof(T));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[j0 + i] = static_cast<S>(buf[i]);
    }
  }
}

// The per-ISA clones (non-template functions; GCC's target_clones does not take templates).
#define FASTPEFT_TL_ROW_FNS(S, T, CLONES)                                                    \
  CLONES static void fwd_row(const S* src, int64_t V, T inv_t, bool entropy, T* out) {      \
    if (entropy) {                                                                           \
      fwd_row_body<true, S, T>(src, V, inv_t, out);                                          \
    } else {                                                                                 \
      fwd_row_body<false, S, T>(src, V, inv_t, out);                                         \
    }                                                                                        \
  }                                                                                          \
  CLONES static void bwd_row(const S* src, int64_t V, int64_t tok, T inv_t, T gl, T gh,      \
                             bool entropy, const T* st, S* dst) {                            \
    if (entropy) {                                                                           \
      bwd_row_body<true, S, T>(src, V, tok, inv_t, gl, gh, st[0], st[1], st[2], dst);        \
    } else {                                                                                 \
      bwd_row_body<false, S, T>(src, V, tok, inv_t, gl, gh, st[0], st[1], st[2], dst);       \
    }                                                                                        \
  }
FASTPEFT_TL_ROW_FNS(float, float, FASTPEFT_CPU_CLONES)
FASTPEFT_TL_ROW_FNS(c10::BFloat16, float, FASTPEFT_CPU_CLONES)
FASTPEFT_TL_ROW_FNS(double, double, )
#undef FASTPEFT_TL_ROW_FNS

void check_cpu(const Tensor& logits, const Tensor& tokens) {
  TORCH_CHECK(logits.device().is_cpu(), "fastpeft: token_logprobs (CPU) needs CPU tensors, got ",
              "logits on ", logits.device());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "fastpeft: token_logprobs (CPU) supports float32, bfloat16 and float64 logits, got ",
              dt);
  // Out-of-range tokens would read outside the row: refuse them (cheap next to [N, V]).
  const int64_t V = logits.size(1);
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < V, "fastpeft: tokens must be in [0, ", V,
                ") (the vocab of logits), got ", tok[i], " at position ", i);
  }
}

// Rows per parallel task: about 32k values.
int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> token_logprobs_cpu(const Tensor& logits_in,
                                                      const Tensor& tokens_in,
                                                      double temperature, bool return_entropy) {
  check_token_logprobs_args(logits_in, tokens_in, temperature);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor logits = logits_in.contiguous();
  const Tensor tokens = tokens_in.contiguous();
  check_cpu(logits, tokens);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor logp = at::empty({N}, logits.options());
  Tensor entropy = at::empty({return_entropy ? N : 0}, logits.options());
  Tensor stats = at::empty({N, 3}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "token_logprobs_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* tok = tokens.data_ptr<int64_t>();
    scalar_t* lp = logp.data_ptr<scalar_t>();
    scalar_t* ent = return_entropy ? entropy.data_ptr<scalar_t>() : nullptr;
    T* st = stats.data_ptr<T>();
    const T inv_t = static_cast<T>(1.0 / temperature);
    at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = z + r * V;
        T* out = st + 3 * r;
        fwd_row(row, V, inv_t, return_entropy, out);
        lp[r] = static_cast<scalar_t>((to_acc<scalar_t, T>(row[tok[r]]) - out[0]) * inv_t -
                                      out[1]);
        if (return_entropy) ent[r] = static_cast<scalar_t>(out[1] - out[2]);
      }
    });
  });
  return {logp, entropy, stats};
}

Tensor token_logprobs_backward_cpu(const Tensor& grad_logp_in,
                                   const std::optional<Tensor>& grad_entropy_in,
                                   const Tensor& logits_in, const Tensor& tokens_in,
                                   const Tensor& stats_in, double temperature) {
  check_token_logprobs_backward_args(grad_logp_in, grad_entropy_in, logits_in, tokens_in,
                                     stats_in, temperature);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor logits = logits_in.contiguous();
  const Tensor tokens = tokens_in.contiguous();
  check_cpu(logits, tokens);
  const Tensor grad_logp = grad_logp_in.contiguous();
  const Tensor stats = stats_in.contiguous();
  const bool has_ge = grad_entropy_in.has_value();
  const Tensor grad_entropy = has_ge ? grad_entropy_in->contiguous() : Tensor();
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor grad = at::empty({N, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND(
      at::kBFloat16, logits.scalar_type(), "token_logprobs_backward_cpu", [&] {
        using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const scalar_t* z = logits.data_ptr<scalar_t>();
        const int64_t* tok = tokens.data_ptr<int64_t>();
        const scalar_t* gl = grad_logp.data_ptr<scalar_t>();
        const scalar_t* gh = has_ge ? grad_entropy.data_ptr<scalar_t>() : nullptr;
        const T* st = stats.data_ptr<T>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        const T inv_t = static_cast<T>(1.0 / temperature);
        at::parallel_for(0, N, grain(V), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const T glr = to_acc<scalar_t, T>(gl[r]);
            const T ghr = has_ge ? to_acc<scalar_t, T>(gh[r]) : T(0);
            bwd_row(z + r * V, V, tok[r], inv_t, glr, ghr, has_ge && ghr != T(0), st + 3 * r,
                    out + r * V);
          }
        });
      });
  return grad;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("token_logprobs", &fastpeft::token_logprobs_cpu);
  m.impl("token_logprobs_backward", &fastpeft::token_logprobs_backward_cpu);
}
