"""dpo_loss against TRL's DPOTrainer formula (loss_type "sigmoid") and its logged rewards."""

import pytest
import torch
import torch.nn.functional as F

from fastpeft.ops import dpo_loss


def trl_dpo(pc, pr, rc, rr, beta):
    """trl/trainer/dpo_trainer.py (1.16): reverse-KL scores, "sigmoid" loss, logged metrics."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    loss = (-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))).mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return loss, {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "margins": (chosen_rewards - rejected_rewards).mean(),
        "accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }


@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl(batch, beta):
    pc, pr = (torch.randn(batch, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rc, rr = torch.randn(batch, dtype=torch.float64), torch.randn(batch, dtype=torch.float64)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    want_loss, want_stats = trl_dpo(pc, pr, rc, rr, beta)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert stats.keys() == want_stats.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], want_stats[key].to(stats[key].dtype), msg=key)
        assert not stats[key].requires_grad and stats[key].dim() == 0
    torch.testing.assert_close(torch.autograd.grad(loss, (pc, pr)),
                               torch.autograd.grad(want_loss, (pc, pr)))
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, beta)[0], (pc, pr))


def test_known_values_and_empty_batch():
    # policy == reference: loss log 2, every reward 0, no pair ranked right
    x = torch.tensor([-3.0, -5.0])
    loss, stats = dpo_loss(x, x, x, x)
    assert loss.item() == pytest.approx(0.6931471805599453)
    assert stats["accuracies"].item() == 0.0 and stats["margins"].item() == 0.0
    loss, stats = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]),
                           torch.tensor([-2.0]), beta=1.0)
    assert stats["margins"].item() == pytest.approx(3.0)
    assert stats["accuracies"].item() == 1.0
    empty = torch.zeros(0)
    loss, stats = dpo_loss(empty, empty, empty, empty)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("change, message", [
    ({1: torch.zeros(4)}, r"policy_rejected_logps must be \[3\] like policy_chosen_logps"),
    ({2: torch.zeros(3, dtype=torch.float64)}, "ref_chosen_logps must have dtype torch.float32"),
    ({0: torch.zeros(3, 1)}, "policy_chosen_logps must be 1-D"),
    ({3: [0.0, 0.0, 0.0]}, "ref_rejected_logps must be a torch.Tensor, got list"),
])
def test_bad_input(change, message):
    args = [torch.zeros(3) for _ in range(4)]
    for i, t in change.items():
        args[i] = t
    with pytest.raises(ValueError, match=message):
        dpo_loss(*args)


@pytest.mark.parametrize("beta", [0.0, -1.0, True])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be a float > 0"):
        dpo_loss(*(torch.zeros(2) for _ in range(4)), beta=beta)
