"""ppo_value_loss: PPO's clipped value loss (TRL's formula), masked token mean. One fused
kernel computes the loss, vf_clipfrac and d loss / d values; the backward only scales that
saved gradient."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _ppo_validate, _validate, reference


def _check_args(values, old_values, returns, mask, clip):
    _validate.check_tensor("values", values)
    _validate.check_float_dtype(values, "values")
    _ppo_validate.check_same_shape("old_values", old_values, values, "values")
    _ppo_validate.check_same_shape("returns", returns, values, "values")
    mask = _ppo_validate.check_mask(mask, values, "values")
    return mask, _ppo_validate.check_float("clip", clip, 0.0)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`0.5 * masked_mean(max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2))`.

    Args:
        values: [...] the value head's predictions (the only input that gets a gradient).
        old_values, returns: same shape and dtype (constants).
        mask: same shape, bool (or 0/1).

    Returns (loss, stats): 0-dim tensors in values' dtype; stats = {"vf_clipfrac"}, the
    fraction of tokens where the clipped branch is strictly larger (TRL's vf_clipfrac). An
    empty mask gives 0 and a zero gradient.
    """
    mask, clip = _check_args(values, old_values, returns, mask, clip)
    op = _dispatch.kernel("ppo_value_loss", values.device, _eager)
    if op is None:
        return reference.ppo_value_loss(values, old_values, returns, mask, clip)
    loss, stats, _ = op(values.reshape(-1), old_values.detach().reshape(-1),
                        returns.detach().reshape(-1), mask.reshape(-1), clip)
    return loss, {"vf_clipfrac": stats[0]}


def _fake_forward(values, old_values, returns, mask, clip):
    torch._check(values.dim() == 1)
    return values.new_empty(()), values.new_empty(1), values.new_empty(values.shape)


if _ext.extension_loaded():
    _eager = _dispatch.register_loss_with_saved_grad("ppo_value_loss", _fake_forward)
