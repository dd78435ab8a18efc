"""Triton kernels for fastpeft::ia3_linear_triton and its backward.

x [M, K], weight [N, K], bias [N] or None, l = scale: [K] (scale_input) or [N].
  scale_input:  y = (x * l) W^T + b      (l applied to each x tile as it is loaded: no scaled
                                          copy of x exists)
  !scale_input: y = (x W^T + b) * l      (bias, optional store of `unscaled` = x W^T + b, and
                                          the scaling in the GEMM epilogue)
Backward (g = grad_out), every piece only when its output_mask entry is on:
  scale_input:  one GEMM g W whose epilogue stores grad_x = gW * l and the per-row-block
                partial column sums of x * gW (grad_scale); one GEMM g^T x whose epilogue
                scales the columns by l (grad_weight) and whose A tiles give sum_rows(g)
                (grad_bias).
  !scale_input: grad_x = (g * l) W with g * l applied to each g tile as it is loaded;
                grad_scale = sum_rows(g * unscaled) (a column-sum kernel) when unscaled was
                kept, else from G = g^T x: grad_scale = rowsum(G * W) + bias * sum_rows(g),
                in the epilogue of the same GEMM that stores grad_weight = l[:, None] * G;
                grad_bias = l * sum_rows(g).
The kernels live in gemm.py. CPU tensors run interpreted (bf16 upcast to fp32 there).
"""

from __future__ import annotations

import torch

from fastpeft.ops.triton.gemm import colsum, gemm, gemm_tn, upcast_for_interpreter

__all__ = ["ia3_linear_triton_impl", "ia3_linear_triton_backward_impl", "register"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"ia3_linear_triton: {msg}")


def _check_like(name, tensor, ref, ref_name):
    _check(tensor.dtype == ref.dtype,
           f"{name} dtype must be {ref.dtype} (like {ref_name}), got {tensor.dtype}")
    _check(tensor.device == ref.device,
           f"{name} must be on {ref.device} (like {ref_name}), got {tensor.device}")


def _check_weight_scale(ref, ref_name, weight, bias, scale, scale_input):
    _check(ref.dtype in _SUPPORTED, f"{ref_name} dtype must be one of {_SUPPORTED}, got {ref.dtype}")
    _check(weight.dim() == 2, f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    _check_like("weight", weight, ref, ref_name)
    N, K = weight.shape
    n = K if scale_input else N
    _check(scale.dim() == 1 and scale.shape[0] == n,
           f"scale must be [{n}] ({'in' if scale_input else 'out'}_features, "
           f"scale_input={scale_input}), got shape {tuple(scale.shape)}")
    _check_like("scale", scale, ref, ref_name)
    if bias is not None:
        _check(tuple(bias.shape) == (N,), f"bias must be [{N}], got shape {tuple(bias.shape)}")
        _check_like("bias", bias, ref, ref_name)
    return N, K


def _upcast(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]


# ----------------------------------------------------------------------------------------
# Host functions (the op implementations)
# ----------------------------------------------------------------------------------------


def ia3_linear_triton_impl(x, weight, bias, scale, scale_input, keep_unscaled):
    """(y, unscaled); unscaled = x W^T + b when !scale_input and keep_unscaled, else empty."""
    _check(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    N, K = _check_weight_scale(x, "x", weight, bias, scale, scale_input)
    _check(x.shape[1] == K, f"weight must be [N, {x.shape[1]}] to match x, got "
           f"shape {tuple(weight.shape)}")
    up = upcast_for_interpreter(x.device, x.dtype)
    if up is not None:
        outs = ia3_linear_triton_impl(*_upcast((x, weight, bias, scale), up), scale_input,
                                      keep_unscaled)
        return tuple(o.to(x.dtype) for o in outs)
    x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    keep = bool(keep_unscaled) and not scale_input
    if scale_input:
        y, _, _ = gemm(x, weight, b_trans=True, a_scale=scale, bias=bias)
        return y, x.new_empty(0)
    y, pre, _ = gemm(x, weight, b_trans=True, bias=bias, store_pre=keep, c_scale=scale)
    return y, (pre if keep else x.new_empty(0))


def ia3_linear_triton_backward_impl(grad_out, x, weight, bias, scale, unscaled, scale_input,
                                    output_mask):
    """(grad_x, grad_weight, grad_bias, grad_scale); an empty tensor where the mask is off."""
    output_mask = [bool(v) for v in output_mask]
    _check(len(output_mask) == 4, f"output_mask must have 4 entries, got {len(output_mask)}")
    need_x, need_w, need_b, need_l = output_mask
    _check(grad_out.dim() == 2, f"grad_out must be 2-D [M, N], got shape {tuple(grad_out.shape)}")
    N, K = _check_weight_scale(grad_out, "grad_out", weight, bias, scale, scale_input)
    M = grad_out.shape[0]
    _check(grad_out.shape[1] == N, f"grad_out must be [M, {N}], got shape {tuple(grad_out.shape)}")
    has_unscaled = unscaled.dim() == 2
    if has_unscaled:
        _check(not scale_input, "unscaled is only used with scale_input=False")
        _check_like("unscaled", unscaled, grad_out, "grad_out")
        _check(tuple(unscaled.shape) == (M, N),
               f"unscaled must be [{M}, {N}], got shape {tuple(unscaled.shape)}")
    # x feeds grad_weight, and grad_scale unless unscaled replaces it (scale_input: always).
    uses_x = need_w or (need_l and (scale_input or not has_unscaled))
    if uses_x:
        _check_like("x", x, grad_out, "grad_out")
        _check(tuple(x.shape) == (M, K), f"x must be [{M}, {K}] (it is needed for grad_weight "
               f"/ grad_scale), got shape {tuple(x.shape)}")

    dtype = grad_out.dtype
    up = upcast_for_interpreter(grad_out.device, dtype)
    if up is not None:
        outs = ia3_linear_triton_backward_impl(
            *_upcast((grad_out, x, weight, bias, scale, unscaled), up), scale_input, output_mask)
        return tuple(o.to(dtype) for o in outs)

    g, weight, scale = grad_out.contiguous(), weight.contiguous(), scale.contiguous()
    x = x.contiguous() if uses_x else x
    bias = bias.contiguous() if bias is not None else None

    def empty():
        return grad_out.new_empty(0)

    grad_x = grad_w = grad_b = grad_l = None
    g_sum = None  # fp32 sum_rows(g), [N]
    if scale_input:
        if need_x or need_l:
            # gW = g W; grad_x = gW * l; grad_scale = sum_rows(x * gW) from the same tiles.
            grad_x, _, l_sum = gemm(g, weight, b_trans=False, c_scale=scale,
                                    aux=x if need_l else None, colsum=2 if need_l else 0,
                                    store=need_x)
            grad_l = l_sum.to(dtype) if need_l else None
        if need_w:
            grad_w, _, g_sum = gemm_tn(g, x, col_scale=scale, asum=need_b)
    else:
        if need_x:  # grad_x = (g * l) W, g * l formed per tile
            grad_x, _, _ = gemm(g, weight, b_trans=False, a_scale=scale)
        via_g = need_l and not has_unscaled  # grad_scale from G = g^T x
        if need_w or via_g:
            want_g_sum = need_b or (via_g and bias is not None)
            grad_w, dotw, g_sum = gemm_tn(g, x, row_scale=scale, w=weight if via_g else None,
                                          asum=want_g_sum, store=need_w)
            if via_g:
                grad_l = dotw if bias is None else dotw + bias.float() * g_sum
                grad_l = grad_l.to(dtype)
        if need_l and has_unscaled:
            grad_l = colsum(g, unscaled.contiguous()).to(dtype)
    if need_b:
        if g_sum is None:
            g_sum = colsum(g)
        grad_b = (g_sum if scale_input else g_sum * scale.float()).to(dtype)

    return (grad_x if need_x else empty(), grad_w if need_w else empty(),
            grad_b if need_b else empty(), grad_l if need_l else empty())


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------

_registered = False


def register() -> None:
    """Register the host functions as the CPU (interpreted) and CUDA kernels of
    fastpeft::ia3_linear_triton and fastpeft::ia3_linear_triton_backward (schemas from
    fastpeft._C, which must be loaded). Idempotent."""
    global _registered
    if _registered:
        return
    torch.library.register_kernel(
        "fastpeft::ia3_linear_triton", ("cpu", "cuda"), ia3_linear_triton_impl)
    torch.library.register_kernel(
        "fastpeft::ia3_linear_triton_backward", ("cpu", "cuda"), ia3_linear_triton_backward_impl)
    _registered = True
