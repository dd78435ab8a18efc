"""adapter_bottleneck: the Houlsby / Pfeiffer bottleneck adapter,
residual + scaling * (act(h Wd^T + bd) Wu^T + bu), keeping only the small pre-activation
(and h) for the backward."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, reference


def _check_args(h, w_down, b_down, w_up, b_up, scaling, residual) -> None:
    _validate.check_tensor("h", h)
    if h.dim() < 1:
        raise ValueError(f"h must have at least 1 dim [..., hidden], got shape {tuple(h.shape)}")
    _validate.check_float_dtype(h, "h")
    d = h.shape[-1]
    _validate.check_tensor("w_down", w_down, 2)
    _validate.check_like("w_down", w_down, h, "h")
    if w_down.shape[1] != d:
        raise ValueError(
            f"w_down must be [bottleneck, {d}] to match h's last dim, got {tuple(w_down.shape)}"
        )
    r = w_down.shape[0]
    _validate.check_tensor("w_up", w_up, 2)
    _validate.check_like("w_up", w_up, h, "h")
    if tuple(w_up.shape) != (d, r):
        raise ValueError(f"w_up must be [{d}, {r}] (hidden, bottleneck), got {tuple(w_up.shape)}")
    for name, b, n in (("b_down", b_down, r), ("b_up", b_up, d)):
        if b is not None:
            _validate.check_tensor(name, b, 1)
            _validate.check_like(name, b, h, "h")
            if b.shape[0] != n:
                raise ValueError(f"{name} must be [{n}], got {tuple(b.shape)}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ValueError(f"scaling must be a float, got {type(scaling).__name__}")
    if residual is not None:
        _validate.check_tensor("residual", residual)
        _validate.check_like("residual", residual, h, "h")
        if residual.shape != h.shape:
            raise ValueError(
                f"residual must have h's shape {tuple(h.shape)}, got {tuple(residual.shape)}"
            )


def adapter_bottleneck(
    h: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
    scaling: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bottleneck adapter: `residual + scaling * (act(h Wd^T + bd) Wu^T + bu)`.

    Args:
        h: [..., hidden]; w_down: [bottleneck, hidden]; w_up: [hidden, bottleneck]
            (nn.Linear layouts); b_down / b_up: their biases or None.
        activation: "relu", "gelu" (erf), "gelu_tanh" (also "gelu_new", "gelu_pytorch_tanh"),
            "silu" (also "swish").
        residual: [..., hidden] added to the output; None means h itself.

    Returns [..., hidden]. Only h and the pre-activation [..., bottleneck] are kept for the
    backward (the unfused module also keeps act(z) and its output's inputs).
    """
    act = reference.canonical_activation(activation)
    _check_args(h, w_down, b_down, w_up, b_up, scaling, residual)
    op = _dispatch.kernel("adapter_bottleneck", h.device, _eager)
    if op is None:
        return reference.adapter_bottleneck(h, w_down, b_down, w_up, b_up, act, scaling, residual)
    lead, d = h.shape[:-1], h.shape[-1]
    out, _ = op(
        h.reshape(-1, d).contiguous(), w_down.contiguous(), b_down, w_up.contiguous(), b_up, act,
        float(scaling), None if residual is None else residual.reshape(-1, d).contiguous(),
    )
    return out.view(*lead, d)


def _fake_forward(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    torch._check(h.dim() == 2 and w_down.shape[1] == h.shape[1])
    return h.new_empty(h.shape), h.new_empty(h.shape[0], w_down.shape[0])


def _fake_backward(grad_out, h, w_down, w_up, z, activation, scaling, residual_is_h, mask):
    shapes = (h.shape, w_down.shape, w_down.shape[:1], w_up.shape, w_up.shape[:1])
    return tuple(h.new_empty(s if on else (0,)) for s, on in zip(shapes, mask))


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, activation, scaling, residual = inputs
    _, z = output
    ctx.save_for_backward(h, w_down, w_up, z)
    ctx.activation, ctx.scaling = activation, scaling
    ctx.residual_is_h = residual is None
    ctx.has_bias = (b_down is not None, b_up is not None)
    ctx.mark_non_differentiable(z)


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_z):
        h, w_down, w_up, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and ctx.has_bias[0], need[3],
                need[4] and ctx.has_bias[1]]
        grad_out = grad_out.contiguous()
        grads = backward_op(
            grad_out, h, w_down, w_up, z, ctx.activation, ctx.scaling, ctx.residual_is_h, mask
        )
        grad_residual = grad_out if need[7] and not ctx.residual_is_h else None
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, grad_residual)

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "adapter_bottleneck", _fake_forward, _fake_backward, _setup_context, _make_backward
    )
