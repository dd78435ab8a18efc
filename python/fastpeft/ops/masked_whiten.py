"""masked_whiten: TRL's whitening with the mean and unbiased variance over the masked entries,
two reductions and one elementwise pass in C++, differentiable (the backward recomputes from
x and the saved mean / rstd)."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, _ppo_validate, reference


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`(x - mean) * rsqrt(var + 1e-8)` (plus mean again when not shift_mean), with mean and
    unbiased variance over the entries where mask is true, applied to every entry (TRL's
    masked_whiten leaves the unmasked ones whitened too, not zeroed).

    Args:
        x: any shape; mask: the same shape, bool (or 0/1).

    The Bessel divisor is max(n - 1, 1): one masked entry gives var 0 (TRL: NaN), an empty
    mask mean 0 and var 0 (TRL: an error), never NaN. Differentiable in x (the statistics too).
    """
    _validate.check_tensor("x", x)
    _validate.check_float_dtype(x, "x")
    mask = _ppo_validate.check_mask(mask, x, "x")
    if not isinstance(shift_mean, bool):
        raise ValueError(f"shift_mean must be a bool, got {type(shift_mean).__name__}")
    op = _dispatch.kernel("masked_whiten", x.device, _eager)
    if op is None:
        return reference.masked_whiten(x, mask, shift_mean)
    out, _ = op(x.reshape(-1), mask.reshape(-1), shift_mean)
    return out.view(x.shape)


def _fake_forward(x, mask, shift_mean):
    torch._check(x.dim() == 1)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(4, dtype=stats_dtype)


def _fake_backward(grad_out, x, mask, stats, shift_mean):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, mask, shift_mean = inputs
    _, stats = output
    ctx.save_for_backward(x, mask, stats)
    ctx.shift_mean = shift_mean
    ctx.mark_non_differentiable(stats)


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_stats):
        x, mask, stats = ctx.saved_tensors
        g = None
        if ctx.needs_input_grad[0]:
            g = backward_op(grad_out.contiguous(), x, mask, stats, ctx.shift_mean)
        return g, None, None

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "masked_whiten", _fake_forward, _fake_backward, _setup_context, _make_backward,
        triton=False,
    )
