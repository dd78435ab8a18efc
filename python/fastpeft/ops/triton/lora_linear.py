"""Triton kernels for fastpeft::lora_linear_triton and its backward.

Semantics: docs/lora_linear_contract.md. Layouts: x [M, K], weight [N, K], bias [N] or None,
lora_a [r, K], lora_b [N, r]; t = dropout(x) A^T [M, r]; y = x W^T + b + scaling * t B^T.

Kernels
- _lora_shrink_kernel:   t = dropout(x) A^T, the dropout mask regenerated from the seed
                         (Philox, philox.py); r padded to a power of two >= 16 for tl.dot.
- _lora_fwd_kernel:      per [BM, BN] tile of y, ONE fp32 accumulator: sum_k x W^T, then
                         (scaling * t) B^T accumulated into it, then + bias; y stored once.
- _lora_dx_kernel:       per [BM, BK] tile of grad_x, one accumulator: sum_n grad_out W, plus
                         scaling * (g A) * keep / (1 - p) with the mask regenerated for (m, k).
- _lora_grad_a_kernel:   grad_lora_a = scaling * g^T dropout(x), mask regenerated (optionally
                         split over M into fp32 partials summed on the host).
g = grad_out B, grad_lora_b = scaling * grad_out^T t, grad_weight and grad_bias use torch.

CPU tensors run the kernels under the Triton interpreter (numpy; slow, for tests), CUDA
tensors run them compiled. With TRITON_INTERPRET=1 set before triton was imported, every
@triton.jit function is interpreted (triton's own mode); without it, CPU launches interpret
the compiled-mode kernels in a scoped way (see _launch_kernel).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

from fastpeft.ops.triton.philox import _seed_arg, dropout_keep, dropout_threshold

__all__ = [
    "lora_linear_triton_impl",
    "lora_linear_triton_backward_impl",
    "register",
]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    M, K, RANK,
    seed, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """t[m, :] = sum_k dropout(x)[m, k] A[:, k]  (t in t_ptr's dtype)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < RANK
    row = offs_m.to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        idx = row[:, None] + offs_k[None, :]
        x = tl.load(x_ptr + idx, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(idx, seed, threshold), x, tl.zeros_like(x))
        a = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None],
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # A^T tile [BK, BR]
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * RANK + offs_r[None, :]
    tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program pid over an [M, N] output in grouped order:
    GROUP_M row blocks in a row share their column blocks' operand tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, y_ptr,
    M, N, K, RANK,
    scaling,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y tile = x W^T + (scaling * t) B^T + bias, all in one fp32 accumulator."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < RANK
    x_row = offs_m.to(tl.int64) * K
    w_row = offs_n.to(tl.int64) * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + x_row[:, None] + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_row[None, :] + offs_k[:, None],
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0)  # W^T tile [BK, BN]
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    # LoRA tile into the same accumulator: acc += (scaling * t) B^T.
    t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * RANK + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    t = (t.to(tl.float32) * scaling).to(t_ptr.dtype.element_ty)
    bt = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * RANK + offs_r[:, None],
                 mask=n_mask[None, :] & r_mask[:, None], other=0.0)  # B^T tile [BR, BN]
    acc = tl.dot(t, bt, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_dx_kernel(
    go_ptr, w_ptr, g_ptr, a_ptr, gx_ptr,
    M, N, K, RANK,
    lora_scale, seed, threshold,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grad_x tile = grad_out W + lora_scale * (g A) * keep  (lora_scale = scaling / (1 - p))."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    k_mask = offs_k < K
    r_mask = offs_r < RANK
    go_row = offs_m.to(tl.int64) * N

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        go = tl.load(go_ptr + go_row[:, None] + offs_n[None, :],
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # W tile [BN, BK]
        acc = tl.dot(go, w, acc, input_precision=DOT_PRECISION)

    g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * RANK + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # A tile [BR, BK]
    lora = tl.dot(g, a, input_precision=DOT_PRECISION) * lora_scale
    if HAS_DROPOUT:
        idx = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        lora = tl.where(dropout_keep(idx, seed, threshold), lora, tl.zeros_like(lora))
    acc = acc + lora
    gx_ptrs = gx_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_grad_a_kernel(
    g_ptr, x_ptr, out_ptr,
    M, K, RANK, ROWS_PER_SPLIT,
    out_scale, seed, threshold,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[split, :, k tile] = out_scale * sum_{m in split} g[m, :]^T (x[m, k] * keep(m, k)).

    out_scale = scaling / (1 - p). out is [splits, RANK, K] (fp32 partials) or, with one
    split, the [RANK, K] result itself."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < RANK
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        gt = tl.load(g_ptr + offs_m[None, :].to(tl.int64) * RANK + offs_r[:, None],
                     mask=m_mask[None, :] & r_mask[:, None], other=0.0)  # g^T tile [BR, BM]
        idx = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        x = tl.load(x_ptr + idx, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(idx, seed, threshold), x, tl.zeros_like(x))
        acc = tl.dot(gt, x, acc, input_precision=DOT_PRECISION)
    acc = acc * out_scale
    out_ptrs = out_ptr + pid_s.to(tl.int64) * RANK * K + offs_r[:, None] * K + offs_k[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    """Whether triton.jit built InterpretedFunctions (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lora_fwd_kernel, InterpretedFunction)


def _interpreting(device: torch.device) -> bool:
    return device.type != "cuda" or _kernels_interpreted()


_interp_lock = threading.RLock()
_interp_fns: dict = {}


def _as_interpreted(jit_fn):
    from triton.runtime.interpreter import InterpretedFunction

    interp = _interp_fns.get(jit_fn.fn)
    if interp is None:
        interp = _interp_fns[jit_fn.fn] = InterpretedFunction(jit_fn.fn)
    return interp


def _interpreted_device_call(self, *args, **kwargs):
    """JITFunction.__call__ while a compiled-mode kernel runs interpreted: run the device
    function (ours or triton.language's, e.g. tl.zeros) interpreted, and undo the patching of
    triton.language that this does (InterpretedFunction.__call__ leaves it patched, which
    would break later compilation of CUDA kernels in this process)."""
    from triton.runtime.interpreter import _patch_lang

    fn = _as_interpreted(self).rewrite()
    scope = _patch_lang(self.fn)
    try:
        return fn(*args, **kwargs)
    finally:
        scope.restore()


@contextlib.contextmanager
def _interpret_jit_calls():
    from triton.runtime.jit import JITFunction

    with _interp_lock:
        original = JITFunction.__dict__["__call__"]
        JITFunction.__call__ = _interpreted_device_call
        try:
            yield
        finally:
            JITFunction.__call__ = original


def _launch_kernel(kernel, grid, ref: torch.Tensor, *args, **kwargs):
    """Launch a @triton.jit kernel: compiled for CUDA tensors, interpreted for CPU tensors.

    Under TRITON_INTERPRET=1 (set before triton was imported) the kernel already is an
    InterpretedFunction. Otherwise a CPU launch runs an InterpretedFunction of the same
    source, with JITFunction.__call__ (the device functions it calls) interpreted too for
    the duration of the launch."""
    if _kernels_interpreted():
        kernel[grid](*args, **kwargs)
    elif ref.device.type == "cuda":
        with torch.cuda.device(ref.device):
            kernel[grid](*args, **kwargs)
    else:
        with _interpret_jit_calls():
            _as_interpreted(kernel)[grid](*args, **kwargs)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where torch allows it for matmuls (as cuBLAS would)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit inputs


def _gemm_config(device: torch.device, dtype: torch.dtype, rows: int, block_r: int) -> dict:
    """Tile sizes of the two big GEMM kernels: output tile BLOCK_M x BLOCK_N, reduction step
    BLOCK_K (the dX kernel swaps BLOCK_N and BLOCK_K: its output columns are K)."""
    if _interpreting(device):
        # Interpreter: big numpy tiles mean few Python-level program iterations.
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    elsize = dtype.itemsize
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    if rows <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8)
    cfg.update(BLOCK_K=64 if elsize == 2 else 32, GROUP_M=8)
    # The LoRA operands ([BM, R] and [R, BN]) sit in shared memory once: shrink the output
    # tile for large ranks.
    while (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * block_r * elsize > smem * 5 // 8:
        key = "BLOCK_M" if cfg["BLOCK_M"] >= cfg["BLOCK_N"] else "BLOCK_N"
        if cfg[key] <= 32:
            break
        cfg[key] //= 2
    # Software-pipelined main loop: one stage holds [BM, BK] + [BK, BN].
    stage = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elsize
    cfg["num_stages"] = max(2, min(3, (smem - 8 * 1024) // stage))
    return cfg


def _small_config(device: torch.device, dtype: torch.dtype, block_r: int) -> dict:
    """Tile sizes of the rank-r kernels (shrink, grad_lora_a)."""
    if _interpreting(device):
        return dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=1)
    elsize = dtype.itemsize
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    cfg = dict(BLOCK_M=64, BLOCK_K=64 if elsize == 2 else 32, num_warps=4)
    # One pipeline stage: the x tile plus the rank-r tile (A^T [BK, R] or g^T [R, BM]).
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    stage = (bm * bk + block_r * max(bm, bk)) * elsize
    cfg["num_stages"] = max(1, min(3, (smem - 16 * 1024) // stage))
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"lora_linear_triton: {msg}")


def _check_inputs(x, weight, bias, lora_a, lora_b, dropout_p, seed):
    _check(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    _check(weight.dim() == 2 and weight.shape[1] == K,
           f"weight must be [N, {K}], got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    _check(lora_a.dim() == 2 and lora_a.shape[1] == K,
           f"lora_a must be [r, {K}], got shape {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    _check(tuple(lora_b.shape) == (N, r),
           f"lora_b must be [{N}, {r}], got shape {tuple(lora_b.shape)}")
    if bias is not None:
        _check(tuple(bias.shape) == (N,), f"bias must be [{N}], got shape {tuple(bias.shape)}")
    supported = (torch.float32, torch.float16, torch.bfloat16)
    _check(x.dtype in supported, f"x dtype must be one of {supported}, got {x.dtype}")
    named = (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b))
    for name, tensor in named:
        if tensor is None:
            continue
        _check(tensor.dtype == x.dtype, f"{name} dtype must be {x.dtype}, got {tensor.dtype}")
        _check(tensor.device == x.device, f"{name} must be on {x.device}, got {tensor.device}")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        _check(seed.numel() == 1, f"seed must have one element, got {seed.numel()}")
    return M, K, N, r


# ----------------------------------------------------------------------------------------
# Host functions (the op implementations)
# ----------------------------------------------------------------------------------------


def lora_linear_triton_impl(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    """(y, t): t = dropout(x) A^T [M, r], y = x W^T + b + scaling * t B^T [M, N]."""
    M, K, N, r = _check_inputs(x, weight, bias, lora_a, lora_b, dropout_p, seed)
    x, weight, lora_a, lora_b = (v.contiguous() for v in (x, weight, lora_a, lora_b))
    bias = bias.contiguous() if bias is not None else None
    device, dtype = x.device, x.dtype
    scaling, dropout_p = float(scaling), float(dropout_p)
    y = torch.empty((M, N), device=device, dtype=dtype)
    t = torch.empty((M, r), device=device, dtype=dtype)
    if M == 0:
        return y, t

    has_dropout = dropout_p > 0.0
    seed_v = _seed_arg(int(seed.item())) if has_dropout else 0
    threshold = dropout_threshold(dropout_p) if has_dropout else 0
    keep_scale = 1.0 / (1.0 - dropout_p)
    block_r = _block_r(r)
    precision = _dot_precision(dtype)

    if r > 0:
        cfg = _small_config(device, dtype, block_r)
        _launch_kernel(
            _lora_shrink_kernel, (triton.cdiv(M, cfg["BLOCK_M"]),), x,
            x, lora_a, t, M, K, r, seed_v, threshold, keep_scale,
            HAS_DROPOUT=has_dropout, BLOCK_R=block_r, DOT_PRECISION=precision, **cfg,
        )
    if N == 0:
        return y, t
    cfg = _gemm_config(device, dtype, M, block_r)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _launch_kernel(
        _lora_fwd_kernel, grid, x,
        x, weight, bias if bias is not None else y, t, lora_b, y, M, N, K, r, scaling,
        HAS_BIAS=bias is not None, BLOCK_R=block_r, DOT_PRECISION=precision, **cfg,
    )
    return y, t


def _grad_lora_a(g, x, scaling, dropout_p, seed_v, threshold, r, K):
    M = x.shape[0]
    device, dtype = x.device, x.dtype
    out = torch.empty((r, K), device=device, dtype=dtype)
    if r == 0 or K == 0:
        return out
    block_r = _block_r(r)
    cfg = _small_config(device, dtype, block_r)
    k_blocks = triton.cdiv(K, cfg["BLOCK_K"])
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    splits = 1
    if not _interpreting(device):
        # Enough programs to fill the GPU: split M into fp32 partials when K alone is few.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(m_blocks // 4, triton.cdiv(2 * sms, k_blocks)))
    rows_per_split = triton.cdiv(m_blocks, splits) * cfg["BLOCK_M"]
    splits = triton.cdiv(M, rows_per_split)
    target = out if splits == 1 else torch.empty((splits, r, K), device=device, dtype=torch.float32)
    out_scale = scaling / (1.0 - dropout_p)
    _launch_kernel(
        _lora_grad_a_kernel, (k_blocks, splits), x,
        g, x, target, M, K, r, rows_per_split, out_scale, seed_v, threshold,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=block_r, DOT_PRECISION=_dot_precision(dtype), **cfg,
    )
    if splits > 1:
        out.copy_(target.sum(0))
    return out


def lora_linear_triton_backward_impl(grad_out, x, weight, lora_a, lora_b, lora_t, scaling,
                                     dropout_p, seed, output_mask):
    """(grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b); see the contract."""
    M, K, N, r = _check_inputs(x, weight, None, lora_a, lora_b, dropout_p, seed)
    _check(tuple(grad_out.shape) == (M, N),
           f"grad_out must be [{M}, {N}], got shape {tuple(grad_out.shape)}")
    _check(tuple(lora_t.shape) == (M, r),
           f"lora_t must be [{M}, {r}], got shape {tuple(lora_t.shape)}")
    for name, tensor in (("grad_out", grad_out), ("lora_t", lora_t)):
        _check(tensor.dtype == x.dtype, f"{name} dtype must be {x.dtype}, got {tensor.dtype}")
        _check(tensor.device == x.device, f"{name} must be on {x.device}, got {tensor.device}")
    output_mask = [bool(v) for v in output_mask]
    _check(len(output_mask) == 5, f"output_mask must have 5 entries, got {len(output_mask)}")
    grad_out, x, weight, lora_a, lora_b, lora_t = (
        v.contiguous() for v in (grad_out, x, weight, lora_a, lora_b, lora_t))
    device, dtype = x.device, x.dtype
    scaling, dropout_p = float(scaling), float(dropout_p)
    has_dropout = dropout_p > 0.0
    seed_v = _seed_arg(int(seed.item())) if has_dropout else 0
    threshold = dropout_threshold(dropout_p) if has_dropout else 0

    def empty():
        return x.new_empty(0)

    need_x, need_w, need_b, need_a, need_lb = output_mask
    grad_x = grad_weight = grad_bias = grad_a = grad_b = None

    if M == 0:
        grad_x = x.new_empty((0, K)) if need_x else empty()
        grad_weight = x.new_zeros((N, K)) if need_w else empty()
        grad_bias = x.new_zeros((N,)) if need_b else empty()
        grad_a = x.new_zeros((r, K)) if need_a else empty()
        grad_b = x.new_zeros((N, r)) if need_lb else empty()
        return grad_x, grad_weight, grad_bias, grad_a, grad_b

    g = torch.mm(grad_out, lora_b) if (need_x or need_a) else None  # [M, r]

    if need_x:
        grad_x = torch.empty((M, K), device=device, dtype=dtype)
        if K > 0:
            cfg = _gemm_config(device, dtype, M, _block_r(r))
            cfg["BLOCK_N"], cfg["BLOCK_K"] = cfg["BLOCK_K"], cfg["BLOCK_N"]  # K is the output dim
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
            _launch_kernel(
                _lora_dx_kernel, grid, x,
                grad_out, weight, g, lora_a, grad_x, M, N, K, r,
                scaling / (1.0 - dropout_p), seed_v, threshold,
                HAS_DROPOUT=has_dropout, BLOCK_R=_block_r(r),
                DOT_PRECISION=_dot_precision(dtype), **cfg,
            )
    else:
        grad_x = empty()

    grad_weight = torch.mm(grad_out.t(), x) if need_w else empty()
    grad_bias = grad_out.sum(0, dtype=torch.float32).to(dtype) if need_b else empty()
    grad_a = _grad_lora_a(g, x, scaling, dropout_p, seed_v, threshold, r, K) if need_a else empty()
    if need_lb:
        grad_b = torch.mm(grad_out.t(), lora_t)
        grad_b.mul_(scaling)
    else:
        grad_b = empty()
    return grad_x, grad_weight, grad_bias, grad_a, grad_b


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------

_registered = False


def register() -> None:
    """Register the host functions as the CPU (interpreted) and CUDA kernels of
    fastpeft::lora_linear_triton and fastpeft::lora_linear_triton_backward (schemas from
    fastpeft._C, which must be loaded). Idempotent."""
    global _registered
    if _registered:
        return
    torch.library.register_kernel(
        "fastpeft::lora_linear_triton", ("cpu", "cuda"), lora_linear_triton_impl)
    torch.library.register_kernel(
        "fastpeft::lora_linear_triton_backward", ("cpu", "cuda"),
        lora_linear_triton_backward_impl)
    _registered = True
