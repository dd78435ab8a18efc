"""What the RLHF stages need from a causal LM beyond its loss: the final hidden states of the
given tokens (through the model's own forward, so fastpeft's adapters, prompt learning and
prefix tuning all apply), per-token log-probs from them through the fused
linear_token_logprobs (the [batch, seq, vocab] logits are never built), and a scalar head (the
reward model's score, PPO's value) on the same backbone."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpeft.fused_loss import _head_weight, _lm_parts


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, LM head) of a causal LM; a clear error for anything else."""
    parts = _lm_parts(model)
    if parts is None:
        raise ValueError(f"expected a causal LM (a *ForCausalLM with a base model and an LM "
                         f"head), got {type(model).__name__}")
    return parts


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"{type(model).__name__}.config has no hidden_size / n_embd / d_model")


def final_hidden(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq, hidden] last hidden states (after the final norm) of `input_ids`.

    The model's own forward runs (its pre-forward hooks add prompt-learning tokens, the
    adapters apply, disable_adapter is honoured) with logits_to_keep=1, so the LM head only
    maps one position; the backbone's output is taken with a forward hook. Positions that
    prompt learning prepends are dropped, so position t is input_ids[:, t]."""
    backbone, _ = lm_parts(model)
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else
                        output.last_hidden_state)

    handle = backbone.register_forward_hook(grab)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the backbone of {type(model).__name__} ran {len(captured)} times "
                           "in one forward; expected once")
    hidden = captured[0]
    extra = hidden.shape[1] - input_ids.shape[1]
    return hidden[:, extra:] if extra > 0 else hidden


def token_logprobs_from_hidden(model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens) at each position of `hidden` [..., H] (tokens [...] aligned, no shift),
    through linear_token_logprobs on the LM head's weight; an LM head that carries an adapter
    or a bias maps the hidden states itself and token_logprobs reads its logits."""
    from fastpeft.ops import linear_token_logprobs, token_logprobs
    from fastpeft.tuners.base import autocast_like

    _, head = lm_parts(model)
    weight = _head_weight(head)
    if weight is None:
        return token_logprobs(head(hidden), tokens, temperature=temperature)
    hidden, weight = autocast_like(hidden, weight)
    return linear_token_logprobs(hidden, weight, tokens, temperature=temperature)


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor, temperature: float = 1.0,
                        hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled tokens: ([batch, seq-1] log p(labels[:, 1:]) with 0
    where labels is -100, [batch, seq-1] bool mask). `hidden` (final_hidden) may be passed in
    to share one forward."""
    if hidden is None:
        hidden = final_hidden(model, input_ids, attention_mask)
    targets = labels[:, 1:]
    mask = targets != -100
    logp = token_logprobs_from_hidden(model, hidden[:, :-1], targets.clamp(min=0), temperature)
    return logp * mask, mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch] index of the last non-pad position of each row (right or left padding); 0 for
    an all-pad row."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


class ScalarHead(nn.Module):
    """A linear map hidden -> 1 on the backbone's final hidden states: the reward model's score
    and PPO's value head. fp32 weights (it is small and trained from scratch); inputs are cast
    to them. A pairwise (Bradley-Terry) loss only sees score differences, so a reward head has
    no bias (as transformers' *ForSequenceClassification score); a value head has one."""

    def __init__(self, hidden_size: int, std: float | None = None, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=bias)
        with torch.no_grad():
            std = std if std is not None else 1 / math.sqrt(hidden_size + 1)
            self.linear.weight.normal_(0.0, std)
            if bias:
                self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [...] scores in fp32."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def sequence_scores(model: nn.Module, head: ScalarHead, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch] head scores at the last non-pad token of each row."""
    hidden = final_hidden(model, input_ids, attention_mask)
    last = last_token_index(attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last])


__all__ = ["ScalarHead", "completion_logprobs", "final_hidden", "hidden_size",
           "last_token_index", "lm_parts", "sequence_scores", "token_logprobs_from_hidden"]
