"""Triton kernels for fastpeft::adapter_bottleneck_triton and its backward.

h [M, D], w_down [R, D], b_down [R] or None, w_up [D, R], b_up [D] or None, residual [M, D]
or None (= h). Forward, two GEMM kernels (gemm.py):
  z = h Wd^T + bd                        bias in the epilogue; only z [M, R] is stored
  out = residual + scaling * (act(z) Wu^T + bu)
                                         act(z) formed per z tile as it is loaded (prologue);
                                         bias, scaling and the residual add in the epilogue
Backward (g = grad_out, a = act(z) recomputed from z), each piece only when asked for:
  gz = (scaling * g Wu) * act'(z)        one kernel: act'(z) loaded from z in the epilogue,
                                         which also writes row-block partial sums of gz
                                         (grad_b_down)
  grad_h = gz Wd (+ g when residual_is_h, in the epilogue)
  grad_w_up = scaling * g^T act(z)       act(z) formed per tile (prologue); the g^T tiles
                                         also give sum_rows(g) (grad_b_up = scaling * that)
  grad_w_down = gz^T h
CPU tensors run interpreted (bf16 upcast to fp32 there).
"""

from __future__ import annotations

import torch

from fastpeft.ops.triton.gemm import ACTIVATIONS, colsum, gemm, gemm_tn, upcast_for_interpreter

__all__ = ["adapter_bottleneck_triton_impl", "adapter_bottleneck_triton_backward_impl",
           "register"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"adapter_bottleneck_triton: {msg}")


def _check_like(name, tensor, h):
    _check(tensor.dtype == h.dtype, f"{name} dtype must be {h.dtype} (like h), got {tensor.dtype}")
    _check(tensor.device == h.device, f"{name} must be on {h.device} (like h), got {tensor.device}")


def _check_args(h, w_down, b_down, w_up, b_up, activation, residual):
    _check(activation in ACTIVATIONS,
           f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    _check(h.dim() == 2, f"h must be 2-D [M, hidden], got shape {tuple(h.shape)}")
    _check(h.dtype in _SUPPORTED, f"h dtype must be one of {_SUPPORTED}, got {h.dtype}")
    M, D = h.shape
    _check(w_down.dim() == 2 and w_down.shape[1] == D,
           f"w_down must be [bottleneck, {D}], got shape {tuple(w_down.shape)}")
    R = w_down.shape[0]
    _check(tuple(w_up.shape) == (D, R),
           f"w_up must be [{D}, {R}] (hidden, bottleneck), got shape {tuple(w_up.shape)}")
    named = [("w_down", w_down, None), ("w_up", w_up, None), ("b_down", b_down, (R,)),
             ("b_up", b_up, (D,)), ("residual", residual, (M, D))]
    for name, tensor, shape in named:
        if tensor is None:
            continue
        _check_like(name, tensor, h)
        if shape is not None:
            _check(tuple(tensor.shape) == shape,
                   f"{name} must be {list(shape)}, got shape {tuple(tensor.shape)}")
    return M, D, R


def _upcast(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]


def _contig(t):
    return t.contiguous() if t is not None else None


# ----------------------------------------------------------------------------------------
# Host functions (the op implementations)
# ----------------------------------------------------------------------------------------


def adapter_bottleneck_triton_impl(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    """(out, z): z = h Wd^T + bd [M, R], out = residual + scaling * (act(z) Wu^T + bu)."""
    _check_args(h, w_down, b_down, w_up, b_up, activation, residual)
    up = upcast_for_interpreter(h.device, h.dtype)
    if up is not None:
        args = _upcast((h, w_down, b_down, w_up, b_up, residual), up)
        out, z = _forward(*args, activation, float(scaling), round_z_to=h.dtype)
        return out.to(h.dtype), z.to(h.dtype)
    args = (h.contiguous(), w_down.contiguous(), _contig(b_down), w_up.contiguous(),
            _contig(b_up), _contig(residual))
    return _forward(*args, activation, float(scaling))


def _forward(h, w_down, b_down, w_up, b_up, residual, activation, scaling, round_z_to=None):
    z, _, _ = gemm(h, w_down, b_trans=True, bias=b_down)
    if round_z_to is not None:  # the up GEMM reads z as stored (bf16, upcast runs)
        z = z.to(round_z_to).to(z.dtype)
    out, _, _ = gemm(z, w_up, b_trans=True, a_act=True, act=activation, bias=b_up,
                     alpha=scaling, aux=h if residual is None else residual, aux_op=2)
    return out, z


def adapter_bottleneck_triton_backward_impl(grad_out, h, w_down, w_up, z, activation, scaling,
                                            residual_is_h, output_mask):
    """(grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up); empty where the mask is off."""
    M, D, R = _check_args(h, w_down, None, w_up, None, activation, None)
    _check_like("grad_out", grad_out, h)
    _check_like("z", z, h)
    _check(tuple(grad_out.shape) == (M, D),
           f"grad_out must be [{M}, {D}], got shape {tuple(grad_out.shape)}")
    _check(tuple(z.shape) == (M, R), f"z must be [{M}, {R}], got shape {tuple(z.shape)}")
    output_mask = [bool(v) for v in output_mask]
    _check(len(output_mask) == 5, f"output_mask must have 5 entries, got {len(output_mask)}")
    dtype = h.dtype
    up = upcast_for_interpreter(h.device, dtype)
    if up is not None:
        outs = adapter_bottleneck_triton_backward_impl(
            *_upcast((grad_out, h, w_down, w_up, z), up), activation, scaling, residual_is_h,
            output_mask)
        return tuple(o.to(dtype) for o in outs)

    need_h, need_wd, need_bd, need_wu, need_bu = output_mask
    g, h, w_down, w_up, z = (t.contiguous() for t in (grad_out, h, w_down, w_up, z))
    scaling = float(scaling)

    def empty():
        return h.new_empty(0)

    grad_h = grad_wd = grad_bd = grad_wu = grad_bu = None
    if need_h or need_wd or need_bd:
        # gz = (scaling * g Wu) * act'(z), with its column sums (grad_b_down) from the tiles.
        gz, _, gz_sum = gemm(g, w_up, b_trans=False, alpha=scaling, aux=z, aux_op=1,
                             act=activation, colsum=1 if need_bd else 0,
                             store=need_h or need_wd)
        if need_bd:
            grad_bd = gz_sum.to(dtype)
        if need_h:  # grad_h = gz Wd (+ g)
            grad_h, _, _ = gemm(gz, w_down, b_trans=False, aux=g if residual_is_h else None,
                                aux_op=2 if residual_is_h else 0)
        if need_wd:
            grad_wd, _, _ = gemm_tn(gz, h)
    if need_wu:  # scaling * g^T act(z), and sum_rows(g) from the same g tiles
        grad_wu, _, g_sum = gemm_tn(g, z, b_act=True, act=activation, alpha=scaling,
                                    asum=need_bu)
    elif need_bu:
        g_sum = colsum(g)
    if need_bu:
        grad_bu = (g_sum * scaling).to(dtype)

    return (grad_h if need_h else empty(), grad_wd if need_wd else empty(),
            grad_bd if need_bd else empty(), grad_wu if need_wu else empty(),
            grad_bu if need_bu else empty())


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------

_registered = False


def register() -> None:
    """Register the host functions as the CPU (interpreted) and CUDA kernels of
    fastpeft::adapter_bottleneck_triton and fastpeft::adapter_bottleneck_triton_backward
    (schemas from fastpeft._C, which must be loaded). Idempotent."""
    global _registered
    if _registered:
        return
    torch.library.register_kernel(
        "fastpeft::adapter_bottleneck_triton", ("cpu", "cuda"), adapter_bottleneck_triton_impl)
    torch.library.register_kernel(
        "fastpeft::adapter_bottleneck_triton_backward", ("cpu", "cuda"),
        adapter_bottleneck_triton_backward_impl)
    _registered = True
