"""Triton flash-attention kernels for fastpeft::prefix_attention_triton and its backward.

Semantics (csrc/torch_bindings.cpp, reference.prefix_attention): q [B, Hq, T, D] attends over
[prefix ; sequence] keys, prefix_k/v [Bp, Hkv, P, D] (Bp in {1, B}) and k/v [B, Hkv, T, D];
the prefix is always visible, causal applies inside the sequence (query i sees sequence keys
j <= i), attn_mask [B, T] (bool, True = attend) hides sequence keys, query head h reads kv head
h // (Hq // Hkv). lse = log sum exp of the visible scale * q.k (fp32), +inf for a query that
sees no key, whose output is 0. The concat of prefix and sequence is never built: the kernels
walk the prefix from one base pointer (batch stride 0 when Bp = 1) and then the sequence from
another.

Kernels
- _fwd_kernel:         per (b, h, query block): online softmax over the prefix blocks, then
                       over the sequence blocks (causal: only up to the diagonal block); writes
                       out and lse.
- _bwd_delta_kernel:   delta = rowsum(dO * O) (fp32).
- _bwd_dkdv_seq_kernel:    per (b, kv head, sequence key block): dk, dv accumulated over the
                       group's query heads and the query blocks at or below the diagonal.
- _bwd_dkdv_prefix_kernel: per (prefix key block, kv head, batch split): the same over every
                       query of the split's batch rows (Bp = 1: several rows per program, fp32
                       partials per split summed on the host when there are several splits).
- _bwd_dq_kernel:      per (b, h, query block): dq over the prefix blocks, then the sequence.
The forward and dq kernels take causal query blocks longest first (the last ones).
Scores use exp2 with scale * log2(e) folded into one factor; lse is stored in natural log.

CPU tensors run the kernels under the Triton interpreter (tests), CUDA tensors run them
compiled; launches go through lora_linear._launch_kernel (see there). Under the interpreter
bf16 / fp16 tiles are upcast to fp32 after loading (numpy has no bf16 tl.dot); compiled, the
dots take 16-bit inputs and accumulate in fp32, fp32 inputs use IEEE fp32 unless torch allows
TF32 for matmuls.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastpeft.ops.triton.lora_linear import _dot_precision, _interpreting, _launch_kernel

__all__ = [
    "prefix_attention_triton_impl",
    "prefix_attention_triton_backward_impl",
    "register",
]

LOG2E = 1.4426950408889634  # the kernels spell it (and ln 2) out: globals are not constexpr


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(q, kt, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key block: kt [BD, BN], v [BN, BD], valid [BM, BN].
    m_i is the running row max in log2 units (scores times scale * log2(e))."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible so far keeps m = -inf: subtract 0 instead (p = alpha = 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, lse_ptr,
    Hq, Hkv, T, P, D, prefix_bstride,
    qk_scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # b * Hq + h
    pid_m = tl.program_id(1)
    if CAUSAL:  # the longest query blocks first
        pid_m = tl.num_programs(1) - 1 - pid_m
    b = pid_bh // Hq
    hk = (pid_bh % Hq) // (Hq // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q_base = pid_bh.to(tl.int64) * T * D
    kv_base = (b * Hkv + hk).to(tl.int64) * T * D
    p_base = b.to(tl.int64) * prefix_bstride + hk.to(tl.int64) * P * D

    q = tl.load(q_ptr + q_base + offs_m[:, None] * D + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # Prefix keys: visible to every query.
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        kt = tl.load(pk_ptr + p_base + offs_n[None, :] * D + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(pv_ptr + p_base + offs_n[:, None] * D + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        m_i, l_i, acc = _fwd_block(q, kt, v, n_ok[None, :], m_i, l_i, acc, qk_scale,
                                   DOT_PRECISION)

    # Sequence keys: causal blocks entirely above the diagonal are skipped.
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * T + offs_n, mask=n_ok, other=0)
            n_ok = n_ok & (keep != 0)
        kt = tl.load(k_ptr + kv_base + offs_n[None, :] * D + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_base + offs_n[:, None] * D + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _fwd_block(q, kt, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # acc is 0 where nothing was seen
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    tl.store(out_ptr + q_base + offs_m[:, None] * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_delta_kernel(out_ptr, do_ptr, delta_ptr, ROWS, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d] over the ROWS = B * Hq * T rows."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < ROWS
    idx = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    ok = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(out_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _dkdv_block(k, v, dk, dv, q_ptr, do_ptr, lse_ptr, delta_ptr, q_base, r_base, m0,
                offs_n, n_ok, offs_d, d_ok, T, D, qk_scale,
                CAUSAL: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """dk, dv [BN, BD] += the contribution of queries m0 .. m0 + BM of one head; k, v [BN, BD].
    Works transposed: sT = k q^T [BN, BM], so the key rows stay the rows."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    qt = tl.load(q_ptr + q_base + offs_m[None, :] * D + offs_d[:, None],
                 mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # [BD, BM]
    do = tl.load(do_ptr + q_base + offs_m[:, None] * D + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    if UPCAST:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_ptr + r_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + r_base + offs_m, mask=m_ok, other=0.0)
    st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
    valid = n_ok[:, None] & m_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_m[None, :] >= offs_n[:, None])
    # lse = +inf (a query that saw nothing) gives p = 0.
    pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_seq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dk_ptr, dv_ptr,
    Hq, Hkv, T, D,
    qk_scale, scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # b * Hkv + kv head
    pid_n = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    group = Hq // Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < D
    kv_base = pid_bh.to(tl.int64) * T * D
    ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    v = tl.load(v_ptr + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    visible = n_ok
    if HAS_MASK:  # a hidden key gets no probability, hence zero dk and dv
        keep = tl.load(mask_ptr + b.to(tl.int64) * T + offs_n, mask=n_ok, other=0)
        visible = visible & (keep != 0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = 0
    if CAUSAL:  # queries before this key block see none of its keys
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, group):  # the group's query heads: no atomics needed
        bh = b * Hq + hk * group + g
        q_base = bh.to(tl.int64) * T * D
        r_base = bh.to(tl.int64) * T
        for m0 in range(lo, T, BLOCK_M):
            dk, dv = _dkdv_block(k, v, dk, dv, q_ptr, do_ptr, lse_ptr, delta_ptr, q_base,
                                 r_base, m0, offs_n, visible, offs_d, d_ok, T, D, qk_scale,
                                 CAUSAL, UPCAST, BLOCK_M, DOT_PRECISION)
    dk = dk * scale
    tl.store(dk_ptr + kv_base + offs_n[:, None] * D + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + kv_base + offs_n[:, None] * D + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dkdv_prefix_kernel(
    q_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    B, Hq, Hkv, T, P, D, prefix_bstride, ROWS_PER_SPLIT,
    qk_scale, scale,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Prefix dk, dv of kv head hk from the batch rows [split * ROWS_PER_SPLIT, ...): written
    to dk_ptr[split, hk] ([splits, Hkv, P, D]). Bp = B: one row per split (prefix_bstride =
    Hkv * P * D); Bp = 1: the rows share the prefix (prefix_bstride = 0)."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    group = Hq // Hkv
    b_lo = split * ROWS_PER_SPLIT
    b_hi = tl.minimum(b_lo + ROWS_PER_SPLIT, B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < P
    d_ok = offs_d < D
    ok = n_ok[:, None] & d_ok[None, :]
    p_base = b_lo.to(tl.int64) * prefix_bstride + hk.to(tl.int64) * P * D
    k = tl.load(pk_ptr + p_base + offs_n[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    v = tl.load(pv_ptr + p_base + offs_n[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for b in range(b_lo, b_hi):
        for g in range(0, group):
            bh = b * Hq + hk * group + g
            q_base = bh.to(tl.int64) * T * D
            r_base = bh.to(tl.int64) * T
            for m0 in range(0, T, BLOCK_M):
                dk, dv = _dkdv_block(k, v, dk, dv, q_ptr, do_ptr, lse_ptr, delta_ptr, q_base,
                                     r_base, m0, offs_n, n_ok, offs_d, d_ok, T, D, qk_scale,
                                     False, UPCAST, BLOCK_M, DOT_PRECISION)
    dk = dk * scale
    out_base = (split * Hkv + hk).to(tl.int64) * P * D
    tl.store(dk_ptr + out_base + offs_n[:, None] * D + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + out_base + offs_n[:, None] * D + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dq_block(q, do, dq, lse2, delta, kt, vt, valid, qk_scale, DOT_PRECISION: tl.constexpr):
    """dq [BM, BD] += scale-free ds k over one key block; kt, vt [BD, BN]."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    Hq, Hkv, T, P, D, prefix_bstride,
    qk_scale, scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # b * Hq + h
    pid_m = tl.program_id(1)
    if CAUSAL:  # the longest query blocks first
        pid_m = tl.num_programs(1) - 1 - pid_m
    b = pid_bh // Hq
    hk = (pid_bh % Hq) // (Hq // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q_base = pid_bh.to(tl.int64) * T * D
    kv_base = (b * Hkv + hk).to(tl.int64) * T * D
    p_base = b.to(tl.int64) * prefix_bstride + hk.to(tl.int64) * P * D
    ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_base + offs_m[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptr + q_base + offs_m[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    lse2 = lse2 * 1.4426950408889634
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        t_ok = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(pk_ptr + p_base + offs_n[None, :] * D + offs_d[:, None], mask=t_ok,
                     other=0.0)
        vt = tl.load(pv_ptr + p_base + offs_n[None, :] * D + offs_d[:, None], mask=t_ok,
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        dq = _dq_block(q, do, dq, lse2, delta, kt, vt, m_ok[:, None] & n_ok[None, :],
                       qk_scale, DOT_PRECISION)

    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * T + offs_n, mask=n_ok, other=0)
            n_ok = n_ok & (keep != 0)
        t_ok = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(k_ptr + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=t_ok,
                     other=0.0)
        vt = tl.load(v_ptr + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=t_ok,
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        dq = _dq_block(q, do, dq, lse2, delta, kt, vt, valid, qk_scale, DOT_PRECISION)

    dq = dq * scale
    tl.store(dq_ptr + q_base + offs_m[:, None] * D + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# Configuration and checks
# ----------------------------------------------------------------------------------------


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# Compiled tile sizes: (element size, head-dim class) -> (BLOCK_M, BLOCK_N, num_warps,
# num_stages) of the forward, dk/dv and dq kernels. Chosen so that every kernel compiles for
# its architecture without register spills (cuobjdump: STACK 0) in at most ~100 KiB of shared
# memory (test_kernels_compile_for_cuda); not timed on a GPU yet. fp32 (IEEE dots, no tensor
# cores) and Ampere (operands in registers) take smaller tiles.
_SM90_CONFIGS = {
    (2, 64): ((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
    (2, 128): ((128, 32, 8, 3), (32, 64, 8, 3), (128, 16, 8, 3)),
    (2, 256): ((32, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)),
    (4, 64): ((64, 32, 8, 2), (32, 64, 8, 2), (64, 16, 8, 2)),
    (4, 128): ((32, 64, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2)),
    (4, 256): ((32, 16, 8, 2), (16, 16, 8, 2), (32, 16, 8, 2)),
}
_SM80_CONFIGS = {
    (2, 64): ((128, 64, 8, 3), (32, 64, 8, 3), (128, 32, 8, 3)),
    (2, 128): ((32, 64, 8, 3), (32, 64, 8, 3), (32, 32, 8, 3)),
    (2, 256): ((32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 8, 2)),
    (4, 64): ((64, 32, 8, 2), (16, 64, 8, 2), (64, 32, 8, 2)),
    (4, 128): ((64, 32, 8, 2), (16, 32, 8, 2), (64, 16, 8, 2)),
    (4, 256): ((32, 16, 8, 2), (16, 16, 8, 2), (32, 16, 8, 2)),
}


def _configs(device: torch.device, dtype: torch.dtype, block_d: int) -> dict:
    """Tile sizes per kernel: {"fwd" | "dkdv" | "dq": dict(BLOCK_M, BLOCK_N, num_warps,
    num_stages)}. BLOCK_M tiles queries, BLOCK_N keys."""
    if _interpreting(device):
        small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return {"fwd": small, "dkdv": small, "dq": small}
    return _compiled_configs(torch.cuda.get_device_capability(device)[0], dtype, block_d)


def _compiled_configs(major: int, dtype: torch.dtype, block_d: int) -> dict:
    table = _SM90_CONFIGS if major >= 9 else _SM80_CONFIGS
    d_class = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
    fwd, dkdv, dq = (dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                     for m, n, w, s in table[(dtype.itemsize, d_class)])
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def _delta_rows(block_d: int) -> int:
    """Rows per program of the compiled delta kernel (8192 elements of each operand)."""
    return max(1, 8192 // block_d)


def _shared_prefix_rows_per_split(B: int, programs: int, device: torch.device) -> int:
    """Batch rows per program of the shared-prefix (Bp = 1) dk/dv kernel: all of them in one
    program under the interpreter; compiled, enough splits (fp32 partials, summed on the host)
    that p_blocks * Hkv * splits programs fill the GPU twice."""
    if _interpreting(device):
        return B
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(B, triton.cdiv(2 * sms, programs)))
    return triton.cdiv(B, splits)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"prefix_attention_triton: {msg}")


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q, k, v, prefix_k, prefix_v, attn_mask):
    """The C++ checks (csrc/common/prefix_attention_checks.h); returns B, Hq, Hkv, T, P, D, Bp."""
    layouts = (("q", q, "[batch, q_heads, seq, head_dim]"),
               ("k", k, "[batch, kv_heads, seq, head_dim]"),
               ("v", v, "[batch, kv_heads, seq, head_dim]"),
               ("prefix_k", prefix_k, "[batch or 1, kv_heads, prefix_len, head_dim]"),
               ("prefix_v", prefix_v, "[batch or 1, kv_heads, prefix_len, head_dim]"))
    for name, t, layout in layouts:
        _check(t.dim() == 4, f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    _check(q.dtype in _DTYPES, f"q dtype must be one of {_DTYPES}, got {q.dtype}")
    for name, t, _ in layouts[1:]:
        _check(t.dtype == q.dtype, f"{name} dtype must be {q.dtype} like q, got {t.dtype}")
        _check(t.device == q.device, f"{name} must be on {q.device} like q, got {t.device}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    _check(k.shape[0] == B and k.shape[2] == T and k.shape[3] == D,
           f"k must be [{B}, kv_heads, {T}, {D}] to match q, got {tuple(k.shape)}")
    _check(v.shape == k.shape, f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check(Hkv > 0 and Hq % Hkv == 0, f"q_heads ({Hq}) must be a multiple of kv_heads ({Hkv})")
    Bp, P = prefix_k.shape[0], prefix_k.shape[2]
    _check(Bp in (1, B) and prefix_k.shape[1] == Hkv and prefix_k.shape[3] == D,
           f"prefix_k must be [{B} or 1, {Hkv}, prefix_len, {D}], got {tuple(prefix_k.shape)}")
    _check(prefix_v.shape == prefix_k.shape, f"prefix_v must have prefix_k's shape "
           f"{tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    if attn_mask is not None:
        _check(attn_mask.dtype == torch.bool and attn_mask.device == q.device,
               f"attn_mask must be a bool tensor on {q.device}, got {attn_mask.dtype} on "
               f"{attn_mask.device}")
        _check(tuple(attn_mask.shape) == (B, T),
               f"attn_mask must be [{B}, {T}] (batch, seq), got {tuple(attn_mask.shape)}")
    return B, Hq, Hkv, T, P, D, Bp


def _prepare(q, k, v, prefix_k, prefix_v, attn_mask, scale):
    """Contiguous tensors, the mask as uint8 (or q as an unused pointer), common kernel args."""
    q, k, v, prefix_k, prefix_v = (t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    mask = attn_mask.contiguous().view(torch.uint8) if attn_mask is not None else q
    Bp, Hkv, P, D = prefix_k.shape
    prefix_bstride = Hkv * P * D if Bp > 1 else 0
    common = dict(UPCAST=_interpreting(q.device) and q.dtype != torch.float32,
                  BLOCK_D=_block_d(D), DOT_PRECISION=_dot_precision(q.dtype))
    return q, k, v, prefix_k, prefix_v, mask, prefix_bstride, float(scale) * LOG2E, common


# ----------------------------------------------------------------------------------------
# Host functions (the op implementations)
# ----------------------------------------------------------------------------------------


def prefix_attention_triton_impl(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    """(out [B, Hq, T, D], lse [B, Hq, T] fp32)."""
    B, Hq, Hkv, T, P, D, Bp = _check_inputs(q, k, v, prefix_k, prefix_v, attn_mask)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    if B * Hq * T == 0:
        return out, lse
    if D == 0:  # no features: every score is 0, out is empty; lse counts the visible keys
        return out, _lse_without_features(q, P, T, attn_mask, causal)
    q, k, v, prefix_k, prefix_v, mask, bstride, qk_scale, common = _prepare(
        q, k, v, prefix_k, prefix_v, attn_mask, scale)
    cfg = _configs(q.device, q.dtype, common["BLOCK_D"])["fwd"]
    grid = (B * Hq, triton.cdiv(T, cfg["BLOCK_M"]))
    _launch_kernel(
        _fwd_kernel, grid, q,
        q, k, v, prefix_k, prefix_v, mask, out, lse, Hq, Hkv, T, P, D, bstride, qk_scale,
        HAS_MASK=attn_mask is not None, CAUSAL=bool(causal), **common, **cfg,
    )
    return out, lse


def _lse_without_features(q, P, T, attn_mask, causal):
    """lse for D = 0: log(number of visible keys), +inf when there are none."""
    B, Hq = q.shape[:2]
    visible = torch.ones(B, T, T, dtype=torch.bool, device=q.device)
    if causal:
        visible &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        visible &= attn_mask[:, None, :]
    count = (visible.sum(-1) + P).to(torch.float32)
    lse = torch.where(count > 0, count.log(), math.inf)
    return lse[:, None, :].expand(B, Hq, T).contiguous()


def prefix_attention_triton_backward_impl(grad_out, q, k, v, prefix_k, prefix_v, attn_mask,
                                          out, lse, causal, scale):
    """(dq, dk, dv, dprefix_k, dprefix_v); prefix grads summed over the batch when Bp = 1."""
    B, Hq, Hkv, T, P, D, Bp = _check_inputs(q, k, v, prefix_k, prefix_v, attn_mask)
    for name, t in (("grad_out", grad_out), ("out", out)):
        _check(t.dtype == q.dtype and t.device == q.device,
               f"{name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
        _check(t.shape == q.shape, f"{name} must have q's shape {tuple(q.shape)}, got "
               f"{tuple(t.shape)}")
    _check(lse.dtype == torch.float32 and lse.device == q.device
           and tuple(lse.shape) == (B, Hq, T),
           f"lse must be torch.float32 [{B}, {Hq}, {T}] on {q.device}, got {lse.dtype} "
           f"{tuple(lse.shape)} on {lse.device}")
    if B * Hq * T * D == 0:  # no query (or no feature): every gradient is zero
        return tuple(torch.zeros(t.shape, device=q.device, dtype=q.dtype)
                     for t in (q, k, v, prefix_k, prefix_v))
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=q.dtype)
    q, k, v, prefix_k, prefix_v, mask, bstride, qk_scale, common = _prepare(
        q, k, v, prefix_k, prefix_v, attn_mask, scale)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    cfgs = _configs(q.device, q.dtype, common["BLOCK_D"])
    flags = dict(HAS_MASK=attn_mask is not None, CAUSAL=bool(causal))
    scale = float(scale)

    delta = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    rows = B * Hq * T
    block = 16 if _interpreting(q.device) else _delta_rows(common["BLOCK_D"])
    _launch_kernel(_bwd_delta_kernel, (triton.cdiv(rows, block),), q,
                   out, grad_out, delta, rows, D, BLOCK_M=block, BLOCK_D=common["BLOCK_D"])

    cfg = cfgs["dkdv"]
    _launch_kernel(
        _bwd_dkdv_seq_kernel, (B * Hkv, triton.cdiv(T, cfg["BLOCK_N"])), q,
        q, k, v, grad_out, lse, delta, mask, dk, dv, Hq, Hkv, T, D, qk_scale, scale,
        **flags, **common, **cfg,
    )

    dpk = torch.empty(prefix_k.shape, device=q.device, dtype=q.dtype)
    dpv = torch.empty(prefix_v.shape, device=q.device, dtype=q.dtype)
    if P > 0:
        p_blocks = triton.cdiv(P, cfg["BLOCK_N"])
        rows_per_split = (1 if Bp == B
                          else _shared_prefix_rows_per_split(B, p_blocks * Hkv, q.device))
        splits = triton.cdiv(B, rows_per_split)
        if splits == Bp:  # one split per prefix batch row: write the result directly
            tk, tv = dpk, dpv
        else:
            tk = torch.empty((splits, Hkv, P, D), device=q.device, dtype=torch.float32)
            tv = torch.empty_like(tk)
        _launch_kernel(
            _bwd_dkdv_prefix_kernel, (p_blocks, Hkv, splits), q,
            q, prefix_k, prefix_v, grad_out, lse, delta, tk, tv, B, Hq, Hkv, T, P, D, bstride,
            rows_per_split, qk_scale, scale, **common, **cfg,
        )
        if tk is not dpk:
            dpk.copy_(tk.sum(0, keepdim=True))
            dpv.copy_(tv.sum(0, keepdim=True))

    cfg = cfgs["dq"]
    _launch_kernel(
        _bwd_dq_kernel, (B * Hq, triton.cdiv(T, cfg["BLOCK_M"])), q,
        q, k, v, prefix_k, prefix_v, mask, grad_out, lse, delta, dq, Hq, Hkv, T, P, D,
        bstride, qk_scale, scale, **flags, **common, **cfg,
    )
    return dq, dk, dv, dpk, dpv


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------

_registered = False


def register() -> None:
    """Register the host functions as the CPU (interpreted) and CUDA kernels of
    fastpeft::prefix_attention_triton and fastpeft::prefix_attention_triton_backward (schemas
    from fastpeft._C, which must be loaded). Idempotent."""
    global _registered
    if _registered:
        return
    torch.library.register_kernel(
        "fastpeft::prefix_attention_triton", ("cpu", "cuda"), prefix_attention_triton_impl)
    torch.library.register_kernel(
        "fastpeft::prefix_attention_triton_backward", ("cpu", "cuda"),
        prefix_attention_triton_backward_impl)
    _registered = True
