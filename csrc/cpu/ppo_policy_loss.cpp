// CPU ppo_policy_loss (semantics: csrc/torch_bindings.cpp, common/ppo_math.h): one pass over
// the tokens computes every token's term and d term / d logprobs, the loss and the four stats
// (chunked partial sums in double, added in a fixed order); the mask count comes first so the
// gradient is written already divided by it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/ppo_math.h"
#include "cpu/chunked_sum.h"
#include "cpu/vec64.h"
#include "ops.h"

namespace fastpeft {
namespace {

// The fp32 fast path over [b, e): 16 tokens per step in GCC vectors (cpu/vec64.h: ~1 ulp exp),
// the same formulas as policy_token, masked-out lanes selected away (they may hold inf / NaN).
// Adds the loss's and the stats' sums to acc (per-lane fp32 over at most one 64K chunk, then
// double) and returns where it stopped; the caller's scalar loop does the tail.
FASTPEFT_CPU_CLONES
int64_t policy_chunk_f32(const float* lp, const float* old, const float* adv, const float* ref,
                         const bool* mask, float* grad, int64_t b, int64_t e, float clip_low,
                         float clip_high, float kl_coef, KlEstimator est, float inv,
                         std::array<double, 5>& acc) {
  using V = vec64::Vec<float>;
  constexpr int64_t W = 64 / sizeof(float);
  const V zero{}, one = V{} + 1.0f, lo = V{} + (1.0f - clip_low), hi = V{} + (1.0f + clip_high);
  V s_term{}, s_clip{}, s_sq{}, s_ratio{}, s_kl{};
  int64_t i = b;
  for (; i + W <= e; i += W) {
    V m;
    for (int j = 0; j < W; ++j) m[j] = mask[i + j] ? 1.0f : 0.0f;
    const auto valid = m > zero;
    const V l = vec64::load64(lp + i), a = vec64::load64(adv + i);
    const V diff = l - vec64::load64(old + i);
    const V ratio = vec64::vexp(diff);
    const V pg1 = -a * ratio;
    V c = ratio < lo ? lo : ratio;
    c = c > hi ? hi : c;
    const V pg2 = -a * c;
    const auto clipped = pg2 > pg1;
    V term = clipped ? pg2 : pg1;
    V dterm = clipped ? zero : pg1;
    V kl = zero;
    if (est != KlEstimator::kNone) {
      const V d = l - vec64::load64(ref + i);
      V dkl;
      if (est == KlEstimator::kK1) {
        kl = d;
        dkl = one;
      } else if (est == KlEstimator::kK2) {
        kl = 0.5f * d * d;
        dkl = d;
      } else {
        const V ex = vec64::vexp(-d);
        kl = ex + d - 1.0f;
        dkl = 1.0f - ex;
      }
      term += kl_coef * kl;
      dterm += kl_coef * dkl;
    }
    vec64::store64(grad + i, valid ? dterm * inv : zero);
    s_term += valid ? term : zero;
    s_clip += (valid & clipped) ? one : zero;
    s_sq += valid ? diff * diff : zero;
    s_ratio += valid ? ratio : zero;
    s_kl += valid ? kl : zero;
  }
  acc[0] += vec64::hsum<float>(s_term);
  acc[1] += vec64::hsum<float>(s_clip);
  acc[2] += vec64::hsum<float>(s_sq);
  acc[3] += vec64::hsum<float>(s_ratio);
  acc[4] += vec64::hsum<float>(s_kl);
  return i;
}

// No fast path for bf16 / fp64: the scalar loop does all of [b, e).
template <typename S>
int64_t policy_chunk_fast(const S*, const S*, const S*, const S*, const bool*, S*, int64_t b,
                          int64_t, float, float, float, KlEstimator, float,
                          std::array<double, 5>&) {
  return b;
}
inline int64_t policy_chunk_fast(const float* lp, const float* old, const float* adv,
                                 const float* ref, const bool* mask, float* grad, int64_t b,
                                 int64_t e, float lo, float hi, float kc, KlEstimator est,
                                 float inv, std::array<double, 5>& acc) {
  return policy_chunk_f32(lp, old, adv, ref, mask, grad, b, e, lo, hi, kc, est, inv, acc);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_cpu(
    const Tensor& logprobs_in, const Tensor& old_in, const Tensor& adv_in, const Tensor& mask_in,
    const std::optional<Tensor>& ref_in, double clip_low, double clip_high, double kl_coef,
    c10::string_view kl_estimator) {
  check_policy_loss_args(logprobs_in, old_in, adv_in, mask_in, ref_in);
  TORCH_CHECK(logprobs_in.device().is_cpu(), "fastpeft: ppo_policy_loss_cpu needs CPU tensors, got ",
              logprobs_in.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  const KlEstimator est = parse_kl_estimator(
      std::string_view(kl_estimator.data(), kl_estimator.size()), ref_in.has_value());
  const Tensor logprobs = logprobs_in.contiguous(), old = old_in.contiguous();
  const Tensor adv = adv_in.contiguous(), mask = mask_in.contiguous();
  const Tensor ref = ref_in.has_value() ? ref_in->contiguous() : logprobs;
  const int64_t N = logprobs.numel();
  Tensor grad = at::empty({N}, logprobs.options());
  Tensor loss = at::empty({}, logprobs.options());
  Tensor stats = at::empty({4}, logprobs.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logprobs.scalar_type(), "ppo_policy_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t *lp = logprobs.const_data_ptr<scalar_t>(), *op = old.const_data_ptr<scalar_t>();
    const scalar_t *ap = adv.const_data_ptr<scalar_t>(), *rp = ref.const_data_ptr<scalar_t>();
    const bool* mp = mask.const_data_ptr<bool>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const int64_t n = count_true(mp, N);
    const T inv = n > 0 ? T(1) / T(n) : T(0);
    const auto s = chunked_sum<5>(N, [&](int64_t b, int64_t e, std::array<double, 5>& acc) {
      // Local accumulators (kept in registers: acc would be re-read around every store to gp).
      double term = 0, clipped = 0, sq = 0, ratio = 0, kl = 0;
      const scalar_t *__restrict__ lpr = lp, *__restrict__ opr = op, *__restrict__ apr = ap;
      const scalar_t* __restrict__ rpr = rp;
      const bool* __restrict__ mpr = mp;
      scalar_t* __restrict__ gpr = gp;
      const T lo = T(clip_low), hi = T(clip_high), kc = T(kl_coef);
      int64_t i = policy_chunk_fast(lpr, opr, apr, rpr, mpr, gpr, b, e, float(clip_low),
                                    float(clip_high), float(kl_coef), est, float(inv), acc);
      for (; i < e; ++i) {
        if (!mpr[i]) {
          gpr[i] = scalar_t(0);
          continue;
        }
        const auto p = policy_token<T>(T(lpr[i]), T(opr[i]), T(apr[i]), T(rpr[i]), lo, hi, kc, est);
        gpr[i] = static_cast<scalar_t>(p.dterm * inv);
        term += p.term;
        clipped += p.clipped ? 1.0 : 0.0;
        sq += static_cast<double>(p.diff) * p.diff;
        ratio += p.ratio;
        kl += p.kl;
      }
      acc[0] += term;
      acc[1] += clipped;
      acc[2] += sq;
      acc[3] += ratio;
      acc[4] += kl;
    });
    const double dinv = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
    loss.fill_(s[0] * dinv);
    scalar_t* st = stats.mutable_data_ptr<scalar_t>();
    st[0] = static_cast<scalar_t>(s[1] * dinv);
    st[1] = static_cast<scalar_t>(0.5 * s[2] * dinv);
    st[2] = static_cast<scalar_t>(s[3] * dinv);
    st[3] = static_cast<scalar_t>(s[4] * dinv);
  });
  return {loss, stats, grad};
}

// grad_loss * grad, threaded like the forward (from 64K elements on).
Tensor ppo_loss_backward_cpu(const Tensor& grad_loss, const Tensor& grad_in) {
  check_loss_backward_args(grad_loss, grad_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  const Tensor grad = grad_in.contiguous();
  const int64_t N = grad.numel();
  Tensor out = at::empty({N}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "ppo_loss_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T g = T(grad_loss.item<scalar_t>());
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, kSumChunk, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) op[i] = static_cast<scalar_t>(T(gp[i]) * g);
    });
  });
  return out;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("ppo_policy_loss", &fastpeft::ppo_policy_loss_cpu);
  m.impl("ppo_policy_loss_backward", &fastpeft::ppo_loss_backward_cpu);
}
