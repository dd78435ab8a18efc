"""linear_cross_entropy: the mean cross entropy of hidden @ weight^T (the LM head) without the
full logits. The C++ kernel runs over row chunks (at most chunk_size x V logits at a time) and,
when a gradient is needed, computes d(loss)/d(hidden) and d(loss)/d(weight) chunk by chunk in
the same pass, so the backward only scales them by grad_loss (no logits are recomputed)."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, reference


def check_lm_head_args(hidden, weight, targets, targets_name, chunk_size) -> None:
    """The checks linear_cross_entropy and linear_token_logprobs share."""
    _validate.check_tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(
            f"hidden must have at least 1 dim [..., hidden], got shape {tuple(hidden.shape)}"
        )
    _validate.check_float_dtype(hidden, "hidden")
    _validate.check_tensor("weight", weight, 2)
    _validate.check_like("weight", weight, hidden, "hidden")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [vocab > 0, {hidden.shape[-1]}] to match hidden's last dim, "
            f"got {tuple(weight.shape)}"
        )
    _validate.check_tensor(targets_name, targets)
    if targets.dtype != torch.int64:
        raise ValueError(f"{targets_name} must have dtype torch.int64, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(
            f"{targets_name} must be on {hidden.device} like hidden, got {targets.device}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{targets_name} must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_target_values(targets, vocab, targets_name, ignore_index=None) -> None:
    """Values in [0, vocab) (or ignore_index). On the CPU in eager mode only (free there); the
    C++ kernels check on every device."""
    if targets.device.type != "cpu" or targets.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (targets < 0) | (targets >= vocab)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if bool(bad.any()):
        allowed = f"[0, {vocab})"
        if ignore_index is not None:
            allowed += f" or ignore_index ({ignore_index})"
        raise ValueError(f"{targets_name} must be in {allowed}, got {int(targets[bad][0])}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross entropy of the logits `hidden @ weight^T` against `labels`, chunked.

    Args:
        hidden: [..., H] hidden states; weight: [V, H] the LM head (no bias).
        labels: [...] int64, already aligned with hidden (no shift), ignore_index skipped.
        chunk_size: rows per chunk (at most chunk_size x V logits exist at a time); None picks
            one from N, V and H.

    Returns the 0-dim mean over the labels that are not ignored; 0 (with zero gradients) when
    all are.
    """
    check_lm_head_args(hidden, weight, labels, "labels", chunk_size)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_target_values(labels, weight.shape[0], "labels", ignore_index)
    op = _dispatch.kernel("linear_cross_entropy", hidden.device, _eager)
    if op is None:
        return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size)
    grad = torch.is_grad_enabled()
    mask = [grad and hidden.requires_grad, grad and weight.requires_grad]
    loss, _, _ = op(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
                    labels.reshape(-1).contiguous(), ignore_index, chunk_size, mask)
    return loss


def _fake_forward(hidden, weight, labels, ignore_index, chunk_size, grad_mask):
    torch._check(hidden.dim() == 2 and weight.shape[1] == hidden.shape[1])
    return (hidden.new_empty(()), hidden.new_empty(hidden.shape if grad_mask[0] else (0,)),
            weight.new_empty(weight.shape if grad_mask[1] else (0,)))


def _fake_backward(grad_loss, grad_hidden, grad_weight, output_mask):
    return (grad_hidden.new_empty(grad_hidden.shape if output_mask[0] else (0,)),
            grad_weight.new_empty(grad_weight.shape if output_mask[1] else (0,)))


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.grad_mask = inputs[5]
    ctx.mark_non_differentiable(grad_hidden, grad_weight)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        for i, name in ((0, "hidden"), (1, "weight")):
            if need[i] and not ctx.grad_mask[i]:
                raise RuntimeError(
                    f"linear_cross_entropy: a gradient for {name} is needed but the forward ran "
                    f"with grad_mask {list(ctx.grad_mask)}; call fastpeft.ops.linear_cross_entropy "
                    "(it sets the mask from requires_grad and grad mode)"
                )
        mask = [bool(need[0]), bool(need[1])]
        gh, gw = backward_op(grad_loss, grad_hidden, grad_weight, mask)
        return (gh if mask[0] else None, gw if mask[1] else None, None, None, None, None)

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "linear_cross_entropy", _fake_forward, _fake_backward, _setup_context, _make_backward,
        triton=False,
    )
