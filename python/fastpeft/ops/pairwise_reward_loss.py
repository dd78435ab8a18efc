"""pairwise_reward_loss: the Bradley-Terry loss of a reward model on (chosen, rejected) pairs,
as TRL's RewardTrainer computes it. A few elementwise ops on [batch] scores: plain PyTorch
(autograd and torch.compile as is), no kernel to fuse."""

import torch
import torch.nn.functional as F

from fastpeft.ops import _validate


def pairwise_reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """`mean(-logsigmoid(r_chosen - r_rejected - margin)) + center_coef * mean((r_c + r_r)^2)`.

    Args:
        chosen, rejected: [batch] (or [batch, 1]) reward scores of the preferred and the other
            completion of each pair.
        margin: None, a float, or [batch] margins (TRL's "margin" column).
        center_coef: TRL's center_rewards_coefficient (keeps rewards centred on zero).

    Returns the 0-dim mean loss (0 for an empty batch).
    """
    _validate.check_tensor("chosen", chosen)
    _validate.check_float_dtype(chosen, "chosen")
    _validate.check_tensor("rejected", rejected)
    _validate.check_like("rejected", rejected, chosen, "chosen")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"rejected must have chosen's shape {tuple(chosen.shape)}, got {tuple(rejected.shape)}"
        )
    chosen, rejected = _scores("chosen", chosen), _scores("rejected", rejected)
    diff = chosen - rejected
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            _validate.check_tensor("margin", margin)
            if margin.numel() != diff.numel() or margin.device != diff.device:
                raise ValueError(
                    f"margin must be [{diff.numel()}] on {diff.device}, got shape "
                    f"{tuple(margin.shape)} on {margin.device}"
                )
            margin = margin.reshape(-1).to(diff.dtype)
        elif not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise ValueError(f"margin must be None, a float or a tensor, got {type(margin).__name__}")
        diff = diff - margin
    if not isinstance(center_coef, (int, float)) or center_coef < 0:
        raise ValueError(f"center_coef must be a float >= 0, got {center_coef!r}")
    if diff.numel() == 0:
        return diff.sum()
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def _scores(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be [batch] or [batch, 1] scores, got shape {tuple(t.shape)}")
    return t
