"""dpo_loss: the sigmoid DPO loss on sequence log-probs of the policy and the reference, with
TRL's reward statistics. Elementwise on [batch]: plain PyTorch, no kernel to fuse."""

import torch
import torch.nn.functional as F

from fastpeft.ops import _validate

_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`mean(-logsigmoid(beta * ((pc - rc) - (pr - rr))))` (TRL's loss_type "sigmoid").

    Args:
        policy_chosen_logps, policy_rejected_logps: [batch] summed completion log-probs of the
            policy (the only inputs that get gradients in training).
        ref_chosen_logps, ref_rejected_logps: [batch], the same under the reference model.
        beta: the KL strength.

    Returns:
        (loss, stats): the 0-dim mean loss (0 for an empty batch) and 0-dim detached means, as
        TRL logs them: "rewards_chosen" (beta * (pc - rc)), "rewards_rejected", "margins"
        (their difference) and "accuracies" (fraction with rewards_chosen > rewards_rejected).
    """
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    first = tensors[0]
    _validate.check_tensor(_NAMES[0], first, 1)
    _validate.check_float_dtype(first, _NAMES[0])
    for name, t in zip(_NAMES[1:], tensors[1:]):
        _validate.check_tensor(name, t, 1)
        _validate.check_like(name, t, first, _NAMES[0])
        if t.shape != first.shape:
            raise ValueError(f"{name} must be [{first.shape[0]}] like {_NAMES[0]}, "
                             f"got {tuple(t.shape)}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta <= 0:
        raise ValueError(f"beta must be a float > 0, got {beta!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    loss = losses.mean() if losses.numel() else losses.sum()
    with torch.no_grad():
        chosen = beta * chosen_logratios
        rejected = beta * rejected_logratios
        stats = {
            "rewards_chosen": _mean(chosen),
            "rewards_rejected": _mean(rejected),
            "margins": _mean(chosen - rejected),
            "accuracies": _mean((chosen > rejected).to(chosen.dtype)),
        }
    return loss, stats


def _mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean() if t.numel() else t.sum()
