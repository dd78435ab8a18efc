"""Shared plumbing of the PPO op tests: seeded inputs, the TRL formulas copied verbatim from
TRL's PPOTrainer / trl.core (the installed trl 1.16 no longer ships them), and the
kernel-vs-reference comparison for ops returning (loss, stats)."""

import torch

from _tolerance import assert_close_to_reference


def randn(shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def right_padded_mask(shape, seed, min_len=0):
    """[..., T] bool, each row valid for a random prefix length in [min_len, T]."""
    g = torch.Generator().manual_seed(seed)
    T = shape[-1]
    lead = shape[:-1]
    lengths = torch.randint(min_len, T + 1, lead, generator=g)
    return torch.arange(T) < lengths.unsqueeze(-1)


def random_mask(shape, seed, p=0.7):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


# ---- TRL's own formulas (trl/trainer/ppo_trainer.py and trl/core.py, up to trl 0.x) --------

def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_policy_loss(new_logprobs, mb_logprobs, mb_advantage, padding_mask, cliprange):
    """PPOTrainer.train's policy loss; padding_mask is True at padding."""
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return pg_loss, pg_clipfrac


def trl_value_loss(vpred, mb_values, mb_return, padding_mask_p1, cliprange_value):
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    return vf_loss, vf_clipfrac


def trl_gae(rewards, values, padding_mask_p1, gamma, lam):
    """PPOTrainer.train's advantage loop (values and rewards zeroed at padding first)."""
    values = torch.masked_fill(values, padding_mask_p1, 0)
    rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


def compare_loss(kernel, reference, tensors, rest, dtype, stat_names, grad_scale=1.0):
    """(loss, stats) of kernel in dtype vs the fp64 reference vs the reference in dtype, and
    the gradient of the first tensor (grad_scale * d loss)."""
    def run(fn, ts):
        x = ts[0].detach().clone().requires_grad_(True)
        loss, stats = fn(x, *ts[1:], *rest)
        (g,) = torch.autograd.grad(loss * grad_scale, x)
        return loss.detach(), {k: v.detach() for k, v in stats.items()}, g

    cast = lambda d: [t.to(d) if t is not None and t.is_floating_point() else t for t in tensors]
    out = run(kernel, cast(dtype))
    ref64 = run(reference, cast(torch.float64))
    plain = run(reference, cast(dtype))
    assert out[0].dtype == dtype and out[0].shape == ()
    assert_close_to_reference(out[0], ref64[0], plain[0], "loss")
    assert sorted(out[1]) == sorted(stat_names)
    for k in stat_names:
        assert out[1][k].shape == () and out[1][k].dtype == dtype, k
        assert_close_to_reference(out[1][k], ref64[1][k], plain[1][k], k)
    assert out[2].dtype == dtype and out[2].shape == tensors[0].shape
    assert_close_to_reference(out[2], ref64[2], plain[2], "grad")
    return out
