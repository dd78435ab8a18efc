// The per-token math of the PPO ops and their input checks, shared by the CPU and CUDA kernels
// (semantics: csrc/torch_bindings.cpp and python/fastpeft/ops/reference.py).
#pragma once

#include <cmath>
#include <string_view>

#include <c10/macros/Macros.h>

#include "common/checks.h"

namespace fastpeft {

enum class KlEstimator { kNone, kK1, kK2, kK3 };

// "k1" / "k2" / "k3"; kNone when there is no reference log-prob tensor.
inline KlEstimator parse_kl_estimator(std::string_view name, bool has_ref) {
  KlEstimator est = KlEstimator::kNone;
  if (name == "k1") {
    est = KlEstimator::kK1;
  } else if (name == "k2") {
    est = KlEstimator::kK2;
  } else if (name == "k3") {
    est = KlEstimator::kK3;
  } else {
    TORCH_CHECK(false, "fastpeft: kl_estimator must be one of k1, k2, k3, got '",
                std::string(name), "'");
  }
  return has_ref ? est : KlEstimator::kNone;
}

C10_HOST_DEVICE inline float exp_(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_(double x) { return ::exp(x); }

// One token of the clipped surrogate, r = exp(logp - old):
//   term = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)) + kl_coef * kl,
//   dterm = d term / d logp: -A r where the unclipped branch is taken, 0 where the clipped one
//   is (strictly larger), plus kl_coef * d kl / d logp.
template <typename T>
struct PolicyToken {
  T term, dterm, ratio, diff, kl;
  bool clipped;
};

template <typename T>
C10_HOST_DEVICE inline PolicyToken<T> policy_token(T logp, T old, T adv, T ref, T clip_low,
                                                   T clip_high, T kl_coef, KlEstimator est) {
  PolicyToken<T> p;
  p.diff = logp - old;
  p.ratio = exp_(p.diff);
  const T pg1 = -adv * p.ratio;
  T clamped = p.ratio < T(1) - clip_low ? T(1) - clip_low : p.ratio;
  clamped = clamped > T(1) + clip_high ? T(1) + clip_high : clamped;
  const T pg2 = -adv * clamped;
  // Branch-free selects (which branch wins is data-dependent, and mispredicts cost more than
  // the math): term = max(pg1, pg2), dterm = pg1 unless pg2 is strictly larger.
  p.clipped = pg2 > pg1;
  p.term = pg2 > pg1 ? pg2 : pg1;
  p.dterm = pg1 * T(pg2 > pg1 ? 0 : 1);
  p.kl = T(0);
  if (est != KlEstimator::kNone) {
    const T d = logp - ref;
    T dkl;
    if (est == KlEstimator::kK1) {
      p.kl = d;
      dkl = T(1);
    } else if (est == KlEstimator::kK2) {
      p.kl = T(0.5) * d * d;
      dkl = d;
    } else {  // k3 = exp(ref - logp) - (ref - logp) - 1
      const T e = exp_(-d);
      p.kl = e + d - T(1);
      dkl = T(1) - e;
    }
    p.term += kl_coef * p.kl;
    p.dterm += kl_coef * dkl;
  }
  return p;
}

// One token of the clipped value loss: term = max((v - R)^2, (clamp(v, old +- clip) - R)^2),
// dterm = 0.5 d term / d v (the loss is 0.5 * mean): v - R unless the clipped branch is larger.
template <typename T>
struct ValueToken {
  T term, dterm;
  bool clipped;
};

template <typename T>
C10_HOST_DEVICE inline ValueToken<T> value_token(T v, T old, T ret, T clip) {
  ValueToken<T> p;
  T vc = v < old - clip ? old - clip : v;
  vc = vc > old + clip ? old + clip : vc;
  const T l1 = (v - ret) * (v - ret);
  const T l2 = (vc - ret) * (vc - ret);
  p.clipped = l2 > l1;
  p.term = p.clipped ? l2 : l1;
  p.dterm = p.clipped ? T(0) : v - ret;
  return p;
}

// Tensors of one shape [N] (or [B, T] for gae) like `ref`, a bool mask of that shape.
inline void check_like_shape(const at::Tensor& ref, const at::Tensor& t, const char* name,
                             const char* ref_name) {
  check_same_device_dtype(ref, t, name, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastpeft: ", name, " must have ", ref_name, "'s shape ",
              ref.sizes(), ", got ", t.sizes());
}

inline void check_mask(const at::Tensor& ref, const at::Tensor& mask, const char* ref_name) {
  TORCH_CHECK(mask.device() == ref.device(), "fastpeft: mask must be on ", ref.device(), " like ",
              ref_name, ", got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "fastpeft: mask must have dtype bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == ref.sizes(), "fastpeft: mask must have ", ref_name, "'s shape ",
              ref.sizes(), ", got ", mask.sizes());
}

inline void check_ppo_dtype(const at::Tensor& x, const char* name, const char* op) {
  const auto dt = x.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble ||
                  (x.is_cuda() && dt == at::kHalf);
  TORCH_CHECK(ok, "fastpeft: ", op, " supports float32, bfloat16, float64 (and float16 on CUDA) ",
              name, ", got ", dt);
}

inline void check_policy_loss_args(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                   const at::Tensor& advantages, const at::Tensor& mask,
                                   const std::optional<at::Tensor>& ref_logprobs) {
  check_dim(logprobs, 1, "logprobs", "[tokens]");
  check_ppo_dtype(logprobs, "logprobs", "ppo_policy_loss");
  check_like_shape(logprobs, old_logprobs, "old_logprobs", "logprobs");
  check_like_shape(logprobs, advantages, "advantages", "logprobs");
  if (ref_logprobs.has_value()) check_like_shape(logprobs, *ref_logprobs, "ref_logprobs", "logprobs");
  check_mask(logprobs, mask, "logprobs");
}

inline void check_value_loss_args(const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& mask) {
  check_dim(values, 1, "values", "[tokens]");
  check_ppo_dtype(values, "values", "ppo_value_loss");
  check_like_shape(values, old_values, "old_values", "values");
  check_like_shape(values, returns, "returns", "values");
  check_mask(values, mask, "values");
}

// grad_loss (0-dim) and the saved per-token gradient [N].
inline void check_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_dim(grad, 1, "grad", "[tokens]");
  check_same_device_dtype(grad, grad_loss, "grad_loss", "grad");
  TORCH_CHECK(grad_loss.numel() == 1, "fastpeft: grad_loss must have one element, got shape ",
              grad_loss.sizes());
}

inline void check_gae_args(const at::Tensor& rewards, const at::Tensor& values,
                           const at::Tensor& mask) {
  check_dim(rewards, 2, "rewards", "[rows, T]");
  check_ppo_dtype(rewards, "rewards", "gae");
  check_like_shape(rewards, values, "values", "rewards");
  check_mask(rewards, mask, "rewards");
}

inline void check_whiten_args(const at::Tensor& x, const at::Tensor& mask) {
  check_dim(x, 1, "x", "[N]");
  check_ppo_dtype(x, "x", "masked_whiten");
  check_mask(x, mask, "x");
}

// stats of masked_whiten: [mean, rstd, 1 / max(n, 1), 1 / max(n - 1, 1)] in fp32 (fp64 for fp64).
inline void check_whiten_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& mask, const at::Tensor& stats) {
  check_whiten_args(x, mask);
  check_like_shape(x, grad_out, "grad_out", "x");
  TORCH_CHECK(stats.device() == x.device() && stats.dim() == 1 && stats.size(0) == 4,
              "fastpeft: stats must be [4] on ", x.device(), ", got ", stats.sizes(), " on ",
              stats.device());
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.scalar_type() == want, "fastpeft: stats must have dtype ", want, ", got ",
              stats.scalar_type());
}

// GAE over one row of T steps, backwards: delta_t = r_t + gamma * V_next - V_t,
// A_t = delta_t + gamma * lam * A_next, returns A_t + V_t. Positions where mask is false get 0
// and are skipped (V_next and A_next pass through them); the value after the row's end is 0.
// acc_t is the accumulation type (fp32 for bf16 / fp16).
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void gae_row(const scalar_t* rewards, const scalar_t* values,
                                    const bool* mask, int64_t T, acc_t gamma, acc_t lam,
                                    scalar_t* adv, scalar_t* ret) {
  const acc_t gl = gamma * lam;
  acc_t next_value = 0, last = 0;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (!mask[t]) {
      adv[t] = scalar_t(0);
      ret[t] = scalar_t(0);
      continue;
    }
    const acc_t v = acc_t(values[t]);
    last = (acc_t(rewards[t]) + gamma * next_value - v) + gl * last;
    next_value = v;
    adv[t] = static_cast<scalar_t>(last);
    ret[t] = static_cast<scalar_t>(last + v);
  }
}

}  // namespace fastpeft
