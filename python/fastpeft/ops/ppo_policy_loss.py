"""ppo_policy_loss: PPO's clipped surrogate (TRL's formula) plus an optional KL penalty, masked
token mean. One fused kernel computes the loss, its stats and d loss / d logprobs; the backward
only scales that saved gradient."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _ppo_validate, _validate, reference

KL_ESTIMATORS = ("k1", "k2", "k3")
STATS = ("clipfrac", "approx_kl", "ratio_mean", "kl_mean")


def _check_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ref_logprobs,
                kl_coef, kl_estimator):
    _validate.check_tensor("logprobs", logprobs)
    _validate.check_float_dtype(logprobs, "logprobs")
    _ppo_validate.check_same_shape("old_logprobs", old_logprobs, logprobs, "logprobs")
    _ppo_validate.check_same_shape("advantages", advantages, logprobs, "logprobs")
    if ref_logprobs is not None:
        _ppo_validate.check_same_shape("ref_logprobs", ref_logprobs, logprobs, "logprobs")
    mask = _ppo_validate.check_mask(mask, logprobs, "logprobs")
    clip_low = _ppo_validate.check_float("clip_low", clip_low, 0.0)
    clip_high = _ppo_validate.check_float("clip_high", clip_high, 0.0)
    kl_coef = _ppo_validate.check_float("kl_coef", kl_coef)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of k1, k2, k3, got {kl_estimator!r}")
    if ref_logprobs is None and kl_coef != 0.0:
        raise ValueError(f"kl_coef {kl_coef} needs ref_logprobs, got None")
    return mask, clip_low, clip_high, kl_coef


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss, `masked_mean(max(-A r, -A clamp(r, 1 - clip_low,
    1 + clip_high)) + kl_coef * KL)` with `r = exp(logprobs - old_logprobs)`.

    Args:
        logprobs: [...] log-probs of the taken tokens under the policy (the only input that
            gets a gradient; old_logprobs, advantages and ref_logprobs are constants).
        old_logprobs, advantages, ref_logprobs: same shape and dtype as logprobs.
        mask: same shape, bool (or 0/1): the tokens that count.
        kl_estimator: per-token KL(policy || ref) with d = logprobs - ref_logprobs:
            "k1" d, "k2" 0.5 d^2, "k3" exp(-d) + d - 1. Only used with ref_logprobs
            (kl_coef != 0 without ref_logprobs is an error).

    Returns (loss, stats): 0-dim tensors in logprobs' dtype; stats holds clipfrac (fraction
    of tokens where the clipped branch is strictly larger, as TRL's pg_clipfrac), approx_kl
    (0.5 * masked mean of (logprobs - old)^2), ratio_mean and kl_mean (0 without ref), all
    masked means (TRL's approxkl and ratio mean run over the padding too). An empty mask gives
    0 for all of them and a zero gradient.
    """
    mask, clip_low, clip_high, kl_coef = _check_args(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ref_logprobs, kl_coef,
        kl_estimator)
    op = _dispatch.kernel("ppo_policy_loss", logprobs.device, _eager)
    if op is None:
        return reference.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low,
                                         clip_high, ref_logprobs, kl_coef, kl_estimator)
    ref = None if ref_logprobs is None else ref_logprobs.detach().reshape(-1)
    loss, stats, _ = op(
        logprobs.reshape(-1), old_logprobs.detach().reshape(-1), advantages.detach().reshape(-1),
        mask.reshape(-1), ref, clip_low, clip_high, kl_coef, kl_estimator,
    )
    return loss, dict(zip(STATS, stats.unbind(0)))


def _fake_forward(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                  kl_coef, kl_estimator):
    torch._check(logprobs.dim() == 1)
    return logprobs.new_empty(()), logprobs.new_empty(4), logprobs.new_empty(logprobs.shape)


if _ext.extension_loaded():
    _eager = _dispatch.register_loss_with_saved_grad("ppo_policy_loss", _fake_forward)
