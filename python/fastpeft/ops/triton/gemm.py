"""GEMM kernels with fused prologues / epilogues, shared by the Triton ia3_linear and
adapter_bottleneck kernels, and their host-side launchers.

Kernels (all accumulate in fp32; every flag is a constexpr, so an unused feature costs nothing)
- _gemm_kernel:    C[M, Q] = epilogue(prologue(A) @ B), A [M, KR], B [Q, KR] (B_TRANS, weight
                   layout: C = A B^T) or [KR, Q]. Prologue on the A tile: column scaling by a
                   [KR] vector, or an activation. Epilogue, in this order: + bias[Q]; store
                   that as `pre`; column-sum partials of (acc * aux) (COLSUM=2); * alpha;
                   * c_scale[Q]; * act'(aux) (AUX_OP=1) or + aux (AUX_OP=2); column-sum
                   partials of the result (COLSUM=1); store C (STORE_C).
- _gemm_tn_kernel: C[P, Q] = alpha * row_scale[P] * col_scale[Q] * sum_m A[m, P] act(B)[m, Q]
                   (a weight gradient, reduced over the rows M, optionally split over M into
                   fp32 partials); also the column sums of A (ASUM) and the row sums of
                   G * W for a [P, Q] tensor W (DOTW), G the unscaled product, as partials.
- _colsum_kernel:  sum_m A[m, q] (* B[m, q]) as fp32 partials over row splits.
Partial sums are written per row block / split and summed on the host in a fixed order
(deterministic; no atomics).

CPU tensors run these kernels under the Triton interpreter (lora_linear._launch_kernel, the
one interpreter mechanism of the package), with bf16 inputs upcast to fp32 by the callers
(the interpreter's tl.dot has no bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.ops.triton.lora_linear import (
    _dot_precision, _interpreting, _launch_kernel, grouped_tile,
)

__all__ = ["ACTIVATIONS", "gemm", "gemm_tn", "colsum", "interpreting", "upcast_for_interpreter"]

# Activation ids of the kernels' ACT constexpr (0: identity).
ACTIVATIONS = {"relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

_INV_SQRT2 = tl.constexpr(0.70710678118654752440)
_INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)
_SQRT_2_OVER_PI = tl.constexpr(0.79788456080286535588)
_GELU_C = tl.constexpr(0.044715)


# ----------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out), the formulas of csrc/common/activation.h
# ----------------------------------------------------------------------------------------


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    elif ACT == 3:
        # 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        u = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    elif ACT == 4:
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act / d z (relu: 0 at z <= 0, as torch)."""
    if ACT == 1:
        return tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        return 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 3:
        # with s = sigmoid(2u): 0.5 (1 + tanh u) = s and 0.5 (1 - tanh^2 u) = 2 s (1 - s)
        u = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
        s = tl.sigmoid(2.0 * u)
        return s + 2.0 * z * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
    elif ACT == 4:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    a_scale_ptr, bias_ptr, pre_ptr, c_scale_ptr, aux_ptr, colsum_ptr,
    M, Q, KR,
    alpha,
    B_TRANS: tl.constexpr, A_SCALE: tl.constexpr, A_ACT: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, C_SCALE: tl.constexpr,
    AUX_OP: tl.constexpr, COLSUM: tl.constexpr, STORE_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C = epilogue(prologue(A) @ B); see the module doc."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, Q, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < Q
    a_row = offs_m.to(tl.int64) * KR
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KR, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < KR
        a = tl.load(a_ptr + a_row[:, None] + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if A_SCALE:  # (A * s[None, :]) rounded to A's dtype, as an elementwise op would
            s = tl.load(a_scale_ptr + offs_k, mask=k_mask, other=0.0)
            a = (a.to(tl.float32) * s.to(tl.float32)[None, :]).to(a_ptr.dtype.element_ty)
        if A_ACT:  # act(0) = 0 for every activation, so masked entries stay 0
            a = act_fwd(a.to(tl.float32), ACT).to(a_ptr.dtype.element_ty)
        if B_TRANS:  # B is [Q, KR]: load the B^T tile [BK, BN]
            b = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * KR + offs_k[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        else:  # B is [KR, Q]
            b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * Q + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mn_mask = m_mask[:, None] & n_mask[None, :]
    c_offs = offs_m[:, None].to(tl.int64) * Q + offs_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=mn_mask)
    if AUX_OP != 0 or COLSUM == 2:
        aux = tl.load(aux_ptr + c_offs, mask=mn_mask, other=0.0).to(tl.float32)
    if COLSUM == 2:  # sum over the tile's rows of acc * aux (rows past M are 0)
        part = tl.sum(acc * aux, axis=0)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * Q + offs_n, part, mask=n_mask)
    acc = acc * alpha
    if C_SCALE:
        cs = tl.load(c_scale_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc * cs.to(tl.float32)[None, :]
    if AUX_OP == 1:
        acc = acc * act_grad(aux, ACT)
    elif AUX_OP == 2:
        acc = acc + aux
    if COLSUM == 1:
        if STORE_C:  # sum what is stored (rounded), as a separate pass over C would
            acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        part = tl.sum(tl.where(mn_mask, acc, 0.0), axis=0)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * Q + offs_n, part, mask=n_mask)
    if STORE_C:
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _gemm_tn_kernel(
    a_ptr, b_ptr, c_ptr,
    row_scale_ptr, col_scale_ptr, w_ptr, dotw_ptr, asum_ptr,
    M, P, Q, ROWS_PER_SPLIT,
    alpha,
    B_ACT: tl.constexpr, ACT: tl.constexpr, ROW_SCALE: tl.constexpr, COL_SCALE: tl.constexpr,
    DOTW: tl.constexpr, ASUM: tl.constexpr, STORE_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_Q] tile of split pid_s of C = A^T act(B) over rows
    [pid_s * ROWS_PER_SPLIT, +ROWS_PER_SPLIT). c_ptr is [splits, P, Q] (fp32 partials) or,
    with one split, [P, Q]; dotw_ptr [splits, num_q_blocks, P]; asum_ptr [splits, P]."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid // num_pid_q
    pid_q = pid % num_pid_q
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    a_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        at = tl.load(a_ptr + offs_m[None, :].to(tl.int64) * P + offs_p[:, None],
                     mask=m_mask[None, :] & p_mask[:, None], other=0.0)  # A^T tile [BP, BM]
        b = tl.load(b_ptr + offs_m[:, None].to(tl.int64) * Q + offs_q[None, :],
                    mask=m_mask[:, None] & q_mask[None, :], other=0.0)  # [BM, BQ]
        if B_ACT:  # act(0) = 0: masked rows stay 0
            b = act_fwd(b.to(tl.float32), ACT).to(b_ptr.dtype.element_ty)
        if ASUM:
            a_sum += tl.sum(at.to(tl.float32), axis=1)
        acc = tl.dot(at, b, acc, input_precision=DOT_PRECISION)

    pq_mask = p_mask[:, None] & q_mask[None, :]
    if DOTW:  # partial row sums of G * W over this Q block (G = the unscaled A^T B)
        w = tl.load(w_ptr + offs_p[:, None].to(tl.int64) * Q + offs_q[None, :], mask=pq_mask,
                    other=0.0)
        part = tl.sum(acc * w.to(tl.float32), axis=1)
        tl.store(dotw_ptr + (pid_s.to(tl.int64) * num_pid_q + pid_q) * P + offs_p, part,
                 mask=p_mask)
    if ASUM:  # one Q block per P block stores the column sums of A
        tl.store(asum_ptr + pid_s.to(tl.int64) * P + offs_p, a_sum, mask=p_mask & (pid_q == 0))
    if STORE_C:
        acc = acc * alpha
        if ROW_SCALE:
            rs = tl.load(row_scale_ptr + offs_p, mask=p_mask, other=0.0)
            acc = acc * rs.to(tl.float32)[:, None]
        if COL_SCALE:
            cs = tl.load(col_scale_ptr + offs_q, mask=q_mask, other=0.0)
            acc = acc * cs.to(tl.float32)[None, :]
        c_offs = pid_s.to(tl.int64) * P * Q + offs_p[:, None].to(tl.int64) * Q + offs_q[None, :]
        tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=pq_mask)


@triton.jit
def _colsum_kernel(
    a_ptr, b_ptr, out_ptr,
    M, Q, ROWS_PER_SPLIT,
    HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[pid_s, q] = sum over the split's rows of A[m, q] (* B[m, q]), in fp32."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Q
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < m_end)[:, None] & q_mask[None, :]
        offs = offs_m[:, None].to(tl.int64) * Q + offs_q[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            a = a * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += a
    tl.store(out_ptr + pid_s.to(tl.int64) * Q + offs_q, tl.sum(acc, axis=0), mask=q_mask)


# ----------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------


def interpreting(device: torch.device) -> bool:
    """Whether kernels for tensors on `device` run under the Triton interpreter."""
    return _interpreting(device)


def upcast_for_interpreter(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """fp32 when bf16 kernels would run interpreted (no bf16 tl.dot there), else None."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting(device) else None


def _contiguous(*tensors):
    """The kernels index rows with the logical sizes: every operand must be contiguous."""
    return [t.contiguous() if t is not None else None for t in tensors]


def _pow2_in(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _props(device):
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    return props.multi_processor_count, smem


def _gemm_config(device, dtype, M, Q, KR) -> dict:
    """Tiles of _gemm_kernel: output BLOCK_M x BLOCK_N, reduction step BLOCK_K (>= 16 for
    tl.dot; small Q or KR, e.g. an adapter bottleneck, get small tiles)."""
    if interpreting(device):  # big numpy tiles: few Python-level program iterations
        return dict(BLOCK_M=64, BLOCK_N=_pow2_in(Q, 16, 64), BLOCK_K=_pow2_in(KR, 16, 64),
                    GROUP_M=8, num_warps=4, num_stages=1)
    elsize = dtype.itemsize
    sms, smem = _props(device)
    bn = _pow2_in(Q, 16, 128)
    # 128-row tiles unless that leaves SMs idle (e.g. a thin [M, bottleneck] output)
    bm = 128 if triton.cdiv(M, 128) * triton.cdiv(Q, bn) >= sms else 64
    bk = _pow2_in(KR, 16, 64 if elsize <= 2 else 32)
    stage = (bm + bn) * bk * elsize
    num_stages = max(2, min(4, (smem - 16 * 1024) // stage))
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=num_warps,
                num_stages=num_stages)


def _tn_config(device, dtype, P, Q) -> dict:
    if interpreting(device):
        return dict(BLOCK_M=64, BLOCK_P=_pow2_in(P, 16, 64), BLOCK_Q=_pow2_in(Q, 16, 64),
                    num_warps=4, num_stages=1)
    elsize = dtype.itemsize
    _, smem = _props(device)
    bp, bq = _pow2_in(P, 16, 128), _pow2_in(Q, 16, 128)
    bm = 64 if elsize <= 2 else 32
    stage = (bp + bq) * bm * elsize
    num_stages = max(2, min(4, (smem - 16 * 1024) // stage))
    return dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, num_warps=8 if bp * bq >= 128 * 128 else 4,
                num_stages=num_stages)


def _row_splits(device, M, block_m, tiles, splits):
    """(splits, rows_per_split): split the M reduction so that tiles * splits programs fill
    the GPU (one split under the interpreter unless forced)."""
    m_blocks = triton.cdiv(M, block_m)
    if splits is None:
        splits = 1
        if not interpreting(device):
            sms, _ = _props(device)
            splits = max(1, min(m_blocks // 4, triton.cdiv(2 * sms, tiles)))
    splits = max(1, min(int(splits), m_blocks))
    rows_per_split = triton.cdiv(m_blocks, splits) * block_m
    return triton.cdiv(M, rows_per_split), rows_per_split


def gemm(a, b, *, b_trans, a_scale=None, act=None, a_act=False, bias=None, store_pre=False,
         alpha=1.0, c_scale=None, aux=None, aux_op=0, colsum=0, store=True):
    """C = epilogue(prologue(a) @ (b^T if b_trans else b)); a [M, KR] contiguous.

    act: activation name (for a_act, the A prologue, or aux_op=1, act'(aux) in the epilogue).
    Returns (c or None, pre or None, column sums (fp32 [Q]) or None)."""
    a, b, a_scale, bias, c_scale, aux = _contiguous(a, b, a_scale, bias, c_scale, aux)
    M, KR = a.shape
    Q = b.shape[0] if b_trans else b.shape[1]
    device, dtype = a.device, a.dtype
    c = torch.empty((M, Q), device=device, dtype=dtype) if store else None
    pre = torch.empty((M, Q), device=device, dtype=dtype) if store_pre else None
    if M == 0 or Q == 0:  # nothing to launch
        return c, pre, (torch.zeros(Q, device=device, dtype=torch.float32) if colsum else None)
    cfg = _gemm_config(device, dtype, M, Q, KR)
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    parts = (torch.empty((m_blocks, Q), device=device, dtype=torch.float32) if colsum else None)
    dummy = a
    grid = (m_blocks * triton.cdiv(Q, cfg["BLOCK_N"]),)
    _launch_kernel(
        _gemm_kernel, grid, a,
        a, b, c if store else dummy,
        dummy if a_scale is None else a_scale, dummy if bias is None else bias,
        pre if store_pre else dummy, dummy if c_scale is None else c_scale,
        dummy if aux is None else aux, parts if colsum else dummy,
        M, Q, KR, float(alpha),
        B_TRANS=bool(b_trans), A_SCALE=a_scale is not None, A_ACT=bool(a_act),
        ACT=ACTIVATIONS.get(act, 0), HAS_BIAS=bias is not None, STORE_PRE=bool(store_pre),
        C_SCALE=c_scale is not None, AUX_OP=int(aux_op), COLSUM=int(colsum),
        STORE_C=bool(store), DOT_PRECISION=_dot_precision(dtype), **cfg,
    )
    return c, pre, (parts.sum(0) if colsum else None)


def gemm_tn(a, b, *, act=None, b_act=False, alpha=1.0, row_scale=None, col_scale=None, w=None,
            asum=False, store=True, splits=None):
    """C = alpha * row_scale[:, None] * col_scale[None, :] * (a^T act(b)), a [M, P], b [M, Q].

    w [P, Q]: also return rowsum(G * w) (G = a^T act(b), unscaled); asum: also return the
    column sums of a. Returns (c [P, Q] in a's dtype or None, dotw fp32 [P] or None,
    asum fp32 [P] or None). splits forces the number of row splits (tests)."""
    a, b, row_scale, col_scale, w = _contiguous(a, b, row_scale, col_scale, w)
    M, P = a.shape
    Q = b.shape[1]
    device, dtype = a.device, a.dtype
    want_dotw = w is not None
    if M == 0 or P == 0 or Q == 0:
        zeros = torch.zeros(P, device=device, dtype=torch.float32)
        c = torch.zeros((P, Q), device=device, dtype=dtype) if store else None
        if asum and M > 0 and P > 0:  # Q == 0: no tile to fuse the column sums into
            return c, zeros if want_dotw else None, colsum(a)
        return c, zeros if want_dotw else None, zeros.clone() if asum else None
    cfg = _tn_config(device, dtype, P, Q)
    q_blocks = triton.cdiv(Q, cfg["BLOCK_Q"])
    tiles = triton.cdiv(P, cfg["BLOCK_P"]) * q_blocks
    n_splits, rows_per_split = _row_splits(device, M, cfg["BLOCK_M"], tiles, splits)
    f32 = dict(device=device, dtype=torch.float32)
    c = None
    if store:
        c = (torch.empty((P, Q), device=device, dtype=dtype) if n_splits == 1
             else torch.empty((n_splits, P, Q), **f32))
    dotw = torch.empty((n_splits, q_blocks, P), **f32) if want_dotw else None
    a_sum = torch.empty((n_splits, P), **f32) if asum else None
    dummy = a
    _launch_kernel(
        _gemm_tn_kernel, (tiles, n_splits), a,
        a, b, c if store else dummy,
        dummy if row_scale is None else row_scale, dummy if col_scale is None else col_scale,
        w if want_dotw else dummy, dotw if want_dotw else dummy, a_sum if asum else dummy,
        M, P, Q, rows_per_split, float(alpha),
        B_ACT=bool(b_act), ACT=ACTIVATIONS.get(act, 0), ROW_SCALE=row_scale is not None,
        COL_SCALE=col_scale is not None, DOTW=want_dotw, ASUM=bool(asum), STORE_C=bool(store),
        DOT_PRECISION=_dot_precision(dtype), **cfg,
    )
    if store and n_splits > 1:
        c = c.sum(0).to(dtype)
    return (c, dotw.sum((0, 1)) if want_dotw else None, a_sum.sum(0) if asum else None)


def colsum(a, b=None, splits=None):
    """sum_rows(a) (or sum_rows(a * b)) in fp32, [Q]; a, b [M, Q]."""
    a, b = _contiguous(a, b)
    M, Q = a.shape
    device = a.device
    if M == 0 or Q == 0:
        return torch.zeros(Q, device=device, dtype=torch.float32)
    block_m, block_q = 64, _pow2_in(Q, 16, 64 if interpreting(device) else 128)
    q_blocks = triton.cdiv(Q, block_q)
    n_splits, rows_per_split = _row_splits(device, M, block_m, q_blocks, splits)
    out = torch.empty((n_splits, Q), device=device, dtype=torch.float32)
    _launch_kernel(
        _colsum_kernel, (q_blocks, n_splits), a,
        a, a if b is None else b, out, M, Q, rows_per_split,
        HAS_B=b is not None, BLOCK_M=block_m, BLOCK_Q=block_q, num_warps=4,
    )
    return out.sum(0)
