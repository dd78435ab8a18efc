"""linear_token_logprobs: log p(token) per position from hidden states and the LM head,
without the full logits. The C++ kernel runs over row chunks (at most chunk_size x V logits at
a time) and keeps only the per-row log-sum-exp; the backward recomputes each chunk's logits,
softmax from the saved log-sum-exp, and accumulates dW in fp32."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, reference
from fastpeft.ops.linear_cross_entropy import check_lm_head_args, check_target_values


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`log_softmax(hidden @ weight^T / temperature)` at `tokens`, chunked over rows.

    Args:
        hidden: [..., H] hidden states; weight: [V, H] the LM head (no bias).
        tokens: [...] int64 in [0, V), aligned with hidden (no shift).
        temperature: > 0, divides the logits.
        chunk_size: rows per chunk; None picks one from N, V and H.

    Returns [...] log-probs in hidden's dtype.
    """
    check_lm_head_args(hidden, weight, tokens, "tokens", chunk_size)
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not temperature > 0):
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    check_target_values(tokens, weight.shape[0], "tokens")
    op = _dispatch.kernel("linear_token_logprobs", hidden.device, _eager)
    if op is None:
        return reference.linear_token_logprobs(hidden, weight, tokens, temperature, chunk_size)
    logp, _ = op(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
                 tokens.reshape(-1).contiguous(), float(temperature), chunk_size)
    return logp.view(tokens.shape)


def _fake_forward(hidden, weight, tokens, temperature, chunk_size):
    torch._check(hidden.dim() == 2 and weight.shape[1] == hidden.shape[1])
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return hidden.new_empty(hidden.shape[:1]), hidden.new_empty(hidden.shape[:1], dtype=acc)


def _fake_backward(grad_out, hidden, weight, tokens, lse, temperature, chunk_size, output_mask):
    return (hidden.new_empty(hidden.shape if output_mask[0] else (0,)),
            weight.new_empty(weight.shape if output_mask[1] else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, tokens, temperature, chunk_size = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, tokens, lse)
    ctx.temperature, ctx.chunk_size = temperature, chunk_size
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _):
        hidden, weight, tokens, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1])]
        gh, gw = backward_op(grad_out.contiguous(), hidden, weight, tokens, lse, ctx.temperature,
                             ctx.chunk_size, mask)
        return (gh if mask[0] else None, gw if mask[1] else None, None, None, None)

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "linear_token_logprobs", _fake_forward, _fake_backward, _setup_context, _make_backward,
        triton=False,
    )
