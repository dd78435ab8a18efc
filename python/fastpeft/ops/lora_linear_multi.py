"""lora_linear_multi: several LoRA adapters in one batch, chosen per row (id -1 = base only).

This is the mixed-adapter batch of peft's `adapter_names=` (BGMV / SGMV style): one base GEMM
for the whole batch and rank-r work only on each adapter's own rows.
"""

from collections.abc import Sequence

import torch

from fastpeft import _ext
from fastpeft.ops import _backend, _validate, reference
from fastpeft.ops.lora_linear import grads_like


def _as_scalings(scalings, n: int, device: torch.device) -> torch.Tensor:
    s = torch.as_tensor(scalings, dtype=torch.float32)
    if s.shape != (n,):
        raise ValueError(f"scalings must have {n} entries (one per adapter), got shape {tuple(s.shape)}")
    return s.to(device)


def _as_adapter_ids(adapter_ids, x: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row ids with x's leading shape; a [batch] vector is broadcast over the sequence."""
    ids = torch.as_tensor(adapter_ids)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"adapter_ids must be an integer tensor, got dtype {ids.dtype}")
    lead = x.shape[:-1]
    if ids.shape != lead:
        if x.dim() >= 3 and ids.shape == lead[:1]:
            ids = ids.view(-1, *([1] * (len(lead) - 1))).expand(lead)
        else:
            raise ValueError(
                f"adapter_ids must have shape {tuple(lead)} (x's leading dims) or "
                f"{tuple(lead[:1])} (one per batch row), got {tuple(ids.shape)}"
            )
    if ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_ids must be in [-1, {n}) for {n} adapters, got {bad}")
    return ids.to(device=x.device, dtype=torch.int64)


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    adapter_ids: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """LoRA linear with a per-row adapter choice.

    Args:
        x: [..., in_features].
        weight, bias: the shared base layer.
        lora_a: [n, r, in_features] and lora_b: [n, out_features, r]: n stacked adapters.
        scalings: n floats, one scaling per adapter.
        adapter_ids: x's leading shape (or [batch]): the adapter of each row, -1 for base only.
    """
    _validate.check_linear(x, weight, bias)
    _validate.check_tensor("lora_a", lora_a, 3)
    _validate.check_like("lora_a", lora_a, x)
    _validate.check_tensor("lora_b", lora_b, 3)
    _validate.check_like("lora_b", lora_b, x)
    n, r, k = lora_a.shape
    if k != x.shape[-1]:
        raise ValueError(
            f"lora_a must be [n_adapters, r, {x.shape[-1]}] to match x's last dim, "
            f"got {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (n, weight.shape[0], r):
        raise ValueError(
            f"lora_b must be [{n}, {weight.shape[0]}, {r}] (n_adapters, out_features, r), "
            f"got {tuple(lora_b.shape)}"
        )
    s = _as_scalings(scalings, n, x.device)
    ids = _as_adapter_ids(adapter_ids, x, n)
    if _backend.implementation("lora_linear_multi", x.device) == "reference":
        return reference.lora_linear_multi(x, weight, bias, lora_a, lora_b, s, ids)
    _ext.require_extension()
    y, _ = torch.ops.fastpeft.lora_linear_multi(
        x.reshape(-1, k).contiguous(), weight.contiguous(), bias, lora_a.contiguous(),
        lora_b.contiguous(), s, ids.reshape(-1).contiguous(),
    )
    return y.view(*x.shape[:-1], weight.shape[0])


def _fake_forward(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    torch._check(x.dim() == 2 and weight.shape[1] == x.shape[1])
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[1])


def _fake_backward(grad_out, x, weight, lora_a, lora_b, scalings, adapter_ids, lora_t, mask):
    return grads_like(x, weight, lora_a, lora_b, mask)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scalings, adapter_ids = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scalings, adapter_ids, output[1])
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, grad_t):
    x, weight, lora_a, lora_b, scalings, adapter_ids, lora_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
    grads = torch.ops.fastpeft.lora_linear_multi_backward(
        grad_y.contiguous(), x, weight, lora_a, lora_b, scalings, adapter_ids, lora_t, mask
    )
    return (*(g if m else None for g, m in zip(grads, mask)), None, None)


if _ext.extension_loaded():
    torch.library.register_fake("fastpeft::lora_linear_multi")(_fake_forward)
    torch.library.register_fake("fastpeft::lora_linear_multi_backward")(_fake_backward)
    torch.library.register_autograd(
        "fastpeft::lora_linear_multi", _backward, setup_context=_setup_context
    )
