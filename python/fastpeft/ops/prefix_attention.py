"""prefix_attention: softmax attention over [prefix ; keys] without materializing the concat:
the kernel behind prefix tuning and P-tuning v2 (no KV-cache trick, so it works with gradient
checkpointing and any cache class)."""

import torch

from fastpeft import _ext
from fastpeft.ops import _dispatch, _validate, reference


def _check_args(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale) -> torch.Tensor | None:
    """Validate; returns attn_mask as a bool tensor (or None)."""
    layouts = {"q": "[batch, q_heads, seq, head_dim]", "k": "[batch, kv_heads, seq, head_dim]",
               "v": "[batch, kv_heads, seq, head_dim]",
               "prefix_k": "[batch or 1, kv_heads, prefix_len, head_dim]",
               "prefix_v": "[batch or 1, kv_heads, prefix_len, head_dim]"}
    tensors = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in tensors.items():
        _validate.check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layouts[name]}, got shape {tuple(t.shape)}")
        if name == "q":
            _validate.check_float_dtype(q, "q")
        else:
            _validate.check_like(name, t, q, "q")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k must be [{B}, kv_heads, {T}, {D}] to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q_heads ({Hq}) must be a multiple of kv_heads ({Hkv})")
    Bp = prefix_k.shape[0]
    if Bp not in (1, B) or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        raise ValueError(
            f"prefix_k must be [{B} or 1, {Hkv}, prefix_len, {D}], got {tuple(prefix_k.shape)}"
        )
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(
            f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, "
            f"got {tuple(prefix_v.shape)}"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")
    if attn_mask is None:
        return None
    _validate.check_tensor("attn_mask", attn_mask)
    if attn_mask.dtype.is_floating_point or attn_mask.is_complex():
        raise ValueError(
            f"attn_mask must be a bool (or 0/1 integer) key padding mask, got {attn_mask.dtype}"
        )
    if tuple(attn_mask.shape) != (B, T):
        raise ValueError(f"attn_mask must be [{B}, {T}] (batch, seq), got {tuple(attn_mask.shape)}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on {q.device} like q, got {attn_mask.device}")
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask != 0


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q over [prefix ; sequence keys], the concat never materialized.

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] with Hq a multiple of Hkv (GQA: query head h
            reads kv head h // (Hq // Hkv), as transformers' repeat_kv).
        prefix_k, prefix_v: [B or 1, Hkv, P, D]; visible to every query. With batch 1 the
            prefix is shared and its gradients are summed over the batch.
        attn_mask: [B, T] key padding mask, True (or 1) = attend; None = all keys.
        causal: query i sees sequence keys j <= i (the prefix always).
        scale: softmax scale, default 1 / sqrt(D).

    Returns [B, Hq, T, D]. Gradients flow to q, k, v, prefix_k and prefix_v. Queries at padded
    positions get finite values (they still see the prefix).
    """
    attn_mask = _check_args(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    op = _dispatch.kernel("prefix_attention", q.device, _eager)
    if op is None:
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    out, _ = op(
        q.contiguous(), k.contiguous(), v.contiguous(), prefix_k.contiguous(),
        prefix_v.contiguous(), None if attn_mask is None else attn_mask.contiguous(),
        causal, scale,
    )
    return out


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    torch._check(q.dim() == 4 and k.dim() == 4)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q))


def _fake_backward(grad_out, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, attn_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attn_mask, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, attn_mask, out, lse = ctx.saved_tensors
        grads = backward_op(
            grad_out.contiguous(), q, k, v, prefix_k, prefix_v, attn_mask, out, lse,
            ctx.causal, ctx.scale,
        )
        need = ctx.needs_input_grad
        return (*(g if n else None for g, n in zip(grads, need[:5])), None, None, None)

    return backward


if _ext.extension_loaded():
    _eager = _dispatch.register(
        "prefix_attention", _fake_forward, _fake_backward, _setup_context, _make_backward
    )
