"""ia3_linear: peft's IA3 layer, (x * l) W^T + b (feed-forward) or (x W^T + b) * l (k, v), with the
scaling fused into the GEMM path: no scaled copy of x is made or saved."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, reference


def _check_args(x, weight, bias, scale, scale_input) -> int:
    _validate.check_linear(x, weight, bias)
    if not isinstance(scale_input, bool):
        raise ValueError(f"scale_input must be a bool, got {type(scale_input).__name__}")
    _validate.check_tensor("scale", scale)
    _validate.check_like("scale", scale, x)
    n = x.shape[-1] if scale_input else weight.shape[0]
    what = "in_features, scale_input=True" if scale_input else "out_features, scale_input=False"
    if scale.numel() != n or sum(d != 1 for d in scale.shape) > 1:
        raise ValueError(
            f"scale must hold {n} values ({what}) as [{n}] or peft's "
            f"{'[1, %d]' % n if scale_input else '[%d, 1]' % n}, got shape {tuple(scale.shape)}"
        )
    return n


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    scale_input: bool,
) -> torch.Tensor:
    """IA3 linear layer with peft's semantics.

    Args:
        x: [..., in_features]; weight: [out_features, in_features]; bias: [out_features] or None.
        scale: the learned vector l, in_features values when scale_input (peft's feed-forward
            layers: `(x * l) W^T + b`), else out_features values (k, v: `(x W^T + b) * l`, the
            bias scaled too). Shapes [n], [1, n] and [n, 1] are accepted.

    Returns [..., out_features]; gradients flow to x and l, and to weight / bias when they
    require grad. The backward keeps x (or, for scale_input=False with a frozen weight, the
    output, or the unscaled output, when that is what l's gradient needs), never a scaled copy.
    """
    _check_args(x, weight, bias, scale, scale_input)
    op = _dispatch.kernel("ia3_linear", x.device, _eager)
    if op is None:
        return reference.ia3_linear(x, weight, bias, scale, scale_input)
    l = scale.reshape(-1)
    # For (x W^T + b) * l with a frozen W, l's gradient is colsum(grad * (x W^T + b)). On the
    # CPU the autograd formula keeps the output y and divides colsum(grad * y) by l (the
    # forward is then a single GEMM with l folded into W); elsewhere (a check for l == 0
    # would synchronize the GPU) and under torch.compile the op also returns x W^T + b
    # (M x out) to keep instead. Neither recomputes a GEMM from x.
    keep_unscaled = (
        not scale_input and torch.is_grad_enabled() and l.requires_grad
        and not weight.requires_grad
        and (x.device.type != "cpu" or torch.compiler.is_compiling())
    )
    lead = x.shape[:-1]
    y, _ = op(
        x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias, l.contiguous(),
        scale_input, keep_unscaled,
    )
    return y.view(*lead, weight.shape[0])


def _fake_forward(x, weight, bias, scale, scale_input, keep_unscaled):
    torch._check(x.dim() == 2 and weight.shape[1] == x.shape[1])
    unscaled_shape = (x.shape[0], weight.shape[0]) if keep_unscaled and not scale_input else (0,)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(unscaled_shape)


def _fake_backward(grad_out, x, weight, bias, scale, unscaled, scale_input, mask):
    m, n, k = grad_out.shape[0], weight.shape[0], weight.shape[1]
    shapes = ((m, k), weight.shape, (n,), scale.shape)
    return tuple(weight.new_empty(s if on else (0,)) for s, on in zip(shapes, mask))


# The smallest |l| by which y may be divided to recover x W^T + b (well inside the normal range
# of fp32 / bf16, so y = (x W^T + b) * l keeps its relative precision).
_MIN_DIVISOR = 1e-12


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, scale_input, keep_unscaled = inputs
    y, unscaled = output
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    has_unscaled = keep_unscaled and not scale_input
    # (x W^T + b) * l, frozen W, no unscaled output: keep y itself (x W^T + b = y / l) when
    # every |l| is far from 0 and underflow (checked here on the CPU only: it needs the
    # values). Otherwise x, for G = g^T x.
    ctx.divide_by_scale = (
        not scale_input and not has_unscaled and need_l and not need_w
        and scale.device.type == "cpu" and not torch.compiler.is_compiling()
        and bool((scale.abs() >= _MIN_DIVISOR).all())
    )
    # x is needed for grad_weight, and for grad_scale unless an unscaled output replaces it.
    keep_x = need_w or (need_l and not has_unscaled and not ctx.divide_by_scale)
    kept_output = unscaled if has_unscaled else (y if ctx.divide_by_scale else x.new_empty(0))
    ctx.save_for_backward(x if keep_x else x.new_empty(0), weight, bias, scale, kept_output)
    ctx.scale_input, ctx.has_bias = scale_input, bias is not None
    ctx.mark_non_differentiable(unscaled)


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_unscaled):
        x, weight, bias, scale, unscaled = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and ctx.has_bias, need[3]]
        grads = backward_op(
            grad_y.contiguous(), x, weight, bias if ctx.has_bias else None, scale, unscaled,
            ctx.scale_input, mask,
        )
        if ctx.divide_by_scale:  # colsum(g * y) / l = colsum(g * (x W^T + b))
            grads = (*grads[:3], grads[3] / scale)
        return (*(g if m else None for g, m in zip(grads, mask)), None, None)

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "ia3_linear", _fake_forward, _fake_backward, _setup_context, _make_backward
    )
