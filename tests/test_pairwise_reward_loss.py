"""pairwise_reward_loss against TRL's RewardTrainer formula."""

import pytest
import torch
import torch.nn.functional as F

from fastpeft.ops import pairwise_reward_loss


def trl_reward_loss(chosen, rejected, margin=None, center_coef=None):
    """trl/trainer/reward_trainer.py compute_loss (1.16), on the two score halves."""
    if margin is not None:
        loss = -F.logsigmoid(chosen - rejected - margin).mean()
    else:
        loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef is not None:
        loss += center_coef * torch.mean((chosen + rejected) ** 2)
    return loss


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_matches_trl(batch, margin, center_coef):
    chosen = torch.randn(batch, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(batch, dtype=torch.float64, requires_grad=True)
    if margin == "tensor":
        margin = torch.rand(batch, dtype=torch.float64)
    got = pairwise_reward_loss(chosen, rejected, margin, center_coef)
    want = trl_reward_loss(chosen, rejected, margin, center_coef or None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, (chosen, rejected))
    torch.testing.assert_close(grads, torch.autograd.grad(want, (chosen, rejected)))
    assert torch.autograd.gradcheck(lambda c, r: pairwise_reward_loss(c, r, margin, center_coef),
                                    (chosen, rejected))


def test_score_columns_and_empty_batch():
    chosen, rejected = torch.randn(5, 1), torch.randn(5, 1)
    torch.testing.assert_close(pairwise_reward_loss(chosen, rejected),
                               trl_reward_loss(chosen[:, 0], rejected[:, 0]))
    empty = pairwise_reward_loss(torch.zeros(0), torch.zeros(0))
    assert empty.dim() == 0 and empty.item() == 0.0


def test_known_value():
    # logsigmoid(0) = -log 2
    loss = pairwise_reward_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx(0.6931471805599453)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(3), torch.zeros(4)), r"rejected must have chosen's shape \(3,\), got \(4,\)"),
    ((torch.zeros(3), torch.zeros(3, dtype=torch.float64)), "rejected must have dtype torch.float32"),
    ((torch.zeros(3, 2), torch.zeros(3, 2)), r"chosen must be \[batch\] or \[batch, 1\]"),
    ((torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)), "chosen must have dtype"),
    ((torch.zeros(3), torch.zeros(3), torch.zeros(2)), r"margin must be \[3\]"),
    ((torch.zeros(3), torch.zeros(3), "1"), "margin must be None, a float or a tensor, got str"),
    ((torch.zeros(3), torch.zeros(3), None, -1.0), "center_coef must be a float >= 0, got -1.0"),
])
def test_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        pairwise_reward_loss(*args)
