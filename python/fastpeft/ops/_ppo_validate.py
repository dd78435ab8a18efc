"""ValueError checks shared by the PPO ops' wrappers (ppo_policy_loss, ppo_value_loss, gae,
masked_whiten): each names the argument, the expected and the actual."""

import torch

from fastpeft.ops import _validate


def check_same_shape(name: str, t, x: torch.Tensor, x_name: str) -> None:
    _validate.check_tensor(name, t)
    _validate.check_like(name, t, x, x_name)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have {x_name}'s shape {tuple(x.shape)}, got {tuple(t.shape)}")


def check_mask(mask, x: torch.Tensor, x_name: str) -> torch.Tensor:
    """The mask as a bool tensor (nonzero = valid); bool, integer or floating input."""
    _validate.check_tensor("mask", mask)
    if mask.device != x.device:
        raise ValueError(f"mask must be on {x.device} like {x_name}, got {mask.device}")
    if mask.shape != x.shape:
        raise ValueError(f"mask must have {x_name}'s shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool (or integer / floating 0-1), got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_float(name: str, v, minimum: float | None = None) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"{name} must be a float, got {type(v).__name__}")
    if minimum is not None and not v >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return float(v)
