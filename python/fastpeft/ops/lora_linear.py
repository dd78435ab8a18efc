"""lora_linear: x W^T + b + scaling * (dropout(x) A^T) B^T, fused, with the dropout mask
regenerated in the backward from a seed instead of stored."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, reference


def _check_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p) -> None:
    _validate.check_linear(x, weight, bias)
    _validate.check_tensor("lora_a", lora_a, 2)
    _validate.check_like("lora_a", lora_a, x)
    _validate.check_tensor("lora_b", lora_b, 2)
    _validate.check_like("lora_b", lora_b, x)
    r = lora_a.shape[0]
    if lora_a.shape[1] != x.shape[-1]:
        raise ValueError(
            f"lora_a must be [r, {x.shape[-1]}] to match x's last dim, got {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (weight.shape[0], r):
        raise ValueError(
            f"lora_b must be [{weight.shape[0]}, {r}] (out_features, r), got {tuple(lora_b.shape)}"
        )
    if not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling must be a float, got {type(scaling).__name__}")
    _validate.check_dropout(dropout_p)


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator (torch.manual_seed reproduces it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """LoRA linear layer: `x W^T + b + scaling * (dropout(x) A^T) B^T`.

    Args:
        x: [..., in_features].
        weight: [out_features, in_features]; bias: [out_features] or None.
        lora_a: [r, in_features]; lora_b: [out_features, r] (peft's layouts).
        scaling: lora_alpha / r (or / sqrt(r) for rsLoRA).
        dropout_p: dropout on the LoRA branch's input, applied only when training.

    Returns [..., out_features]. Gradients flow to x, lora_a, lora_b, and to weight and bias
    when they require grad. The dropout mask is drawn from a seed taken from torch's default
    generator and regenerated in the backward; neither it nor dropout(x) is stored.
    """
    _check_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed() if p > 0.0 else torch.zeros(1, dtype=torch.int64)
    op = _dispatch.kernel("lora_linear", x.device, _eager)
    if op is None:
        return reference.lora_linear(
            x, weight, bias, lora_a, lora_b, float(scaling), p, True, int(seed.item())
        )
    lead = x.shape[:-1]
    y, _ = op(
        x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias,
        lora_a.contiguous(), lora_b.contiguous(), float(scaling), p, seed,
    )
    return y.view(*lead, weight.shape[0])


def _fake_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    torch._check(x.dim() == 2 and weight.shape[1] == x.shape[1])
    torch._check(lora_a.shape[1] == x.shape[1] and lora_b.shape[1] == lora_a.shape[0])
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


def _fake_backward(grad_out, x, weight, lora_a, lora_b, lora_t, scaling, dropout_p, seed, mask):
    return grads_like(x, weight, lora_a, lora_b, mask)


def grads_like(x, weight, lora_a, lora_b, mask):
    """Empty (grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b); [0] where mask is off."""
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(s if m else (0,)) for s, m in zip(shapes, mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    _, lora_t = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, lora_t, seed)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.mark_non_differentiable(lora_t)


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_t):
        x, weight, lora_a, lora_b, lora_t, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
        grads = backward_op(
            grad_y.contiguous(), x, weight, lora_a, lora_b, lora_t,
            ctx.scaling, ctx.dropout_p, seed, mask,
        )
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, None)

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "lora_linear", _fake_forward, _fake_backward, _setup_context, _make_backward
    )
