"""gae: generalized advantage estimation as one reverse scan per row in C++ (no Python loop
over time). Not differentiable: advantages and returns are targets."""

import math

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _ppo_validate, _validate, reference


def _check_args(rewards, values, mask, gamma, lam):
    _validate.check_tensor("rewards", rewards)
    if rewards.dim() < 1:
        raise ValueError(f"rewards must have at least 1 dim [..., T], got shape {tuple(rewards.shape)}")
    _validate.check_float_dtype(rewards, "rewards")
    _ppo_validate.check_same_shape("values", values, rewards, "rewards")
    mask = _ppo_validate.check_mask(mask, rewards, "rewards")
    return mask, _ppo_validate.check_float("gamma", gamma), _ppo_validate.check_float("lam", lam)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the last dim, TRL's PPO recursion
    `A_t = r_t + gamma V_{t+1} - V_t + gamma lam A_{t+1}`.

    Args:
        rewards, values: [..., T], same dtype.
        mask: [..., T] bool (or 0/1): the response tokens (right padding). Positions where it
            is 0 get advantage and return 0 and are skipped by the recursion (the running
            advantage and the next value pass through them), so the value after the last
            valid token is 0: no bootstrap.

    Returns (advantages, returns = advantages + values), [..., T] in rewards' dtype, computed
    in fp32 for bf16. No gradient flows (the inputs are detached).
    """
    mask, gamma, lam = _check_args(rewards, values, mask, gamma, lam)
    op = _dispatch.kernel("gae", rewards.device, None)
    if op is None:
        return reference.gae(rewards, values, mask, gamma, lam)
    shape, T = rewards.shape, rewards.shape[-1]
    rows = math.prod(shape[:-1])
    adv, ret = op(rewards.detach().reshape(rows, T), values.detach().reshape(rows, T),
                  mask.reshape(rows, T), gamma, lam)
    return adv.view(shape), ret.view(shape)


def _fake_forward(rewards, values, mask, gamma, lam):
    torch._check(rewards.dim() == 2)
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)


if _ext.extension_loaded():
    torch.library.register_fake("fastpeft::gae")(_fake_forward)
