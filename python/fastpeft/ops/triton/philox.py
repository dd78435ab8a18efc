"""Counter-based dropout mask for the Triton kernels (same bits as csrc/common/philox.h).

Element `index` of a contiguous [M, K] tensor is kept when
    philox4x32_7(counter = index >> 2 as (lo, hi, 0, 0), key = (seed lo, seed hi))[index & 3]
        >= floor(p * 2^32)
All arithmetic is uint32 with wrap-around, written out by hand (tl.umulhi for the high
half of the 32x32 products), so the kernels regenerate exactly the mask the CPU and CUDA
kernels draw.

Launch kernels through lora_linear._launch_kernel: compiled on CUDA, interpreted on the
CPU (also in a process where TRITON_INTERPRET was not set when triton was imported).
"""

import triton
import triton.language as tl

PHILOX_ROUNDS = tl.constexpr(7)
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


def dropout_threshold(p: float) -> int:
    """floor(p * 2^32) as a uint32 (python int), as dropout_threshold() in philox.h."""
    t = float(p) * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


@triton.jit
def philox_round(c0, c1, c2, c3, k0, k1):
    """One Philox4x32 round on uint32 tensors; returns the new (c0, c1, c2, c3)."""
    m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(c2.shape, PHILOX_M1, tl.uint32)
    hi0 = tl.umulhi(m0, c0)
    lo0 = m0 * c0
    hi1 = tl.umulhi(m1, c2)
    lo1 = m1 * c2
    n0 = hi1 ^ c1 ^ k0
    n2 = hi0 ^ c3 ^ k1
    return n0, lo1, n2, lo0


@triton.jit
def philox4x32_7(counter, seed):
    """The four uint32 Philox4x32-7 words for each int64 counter (>= 0) and a 64-bit seed
    (any integer scalar: its low/high 32 bits are the key)."""
    counter = counter.to(tl.int64)
    c0 = counter.to(tl.uint32)  # low 32 bits (truncation)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros(counter.shape, tl.uint32)
    c3 = tl.zeros(counter.shape, tl.uint32)
    seed64 = seed.to(tl.int64)
    k0 = seed64.to(tl.uint32)
    k1 = (seed64 >> 32).to(tl.uint32)
    w0 = tl.full((), PHILOX_W0, tl.uint32)
    w1 = tl.full((), PHILOX_W1, tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1)
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(index, seed, threshold):
    """Whether flat element `index` (int64 tensor, >= 0) survives dropout.

    seed: the 64-bit seed (any integer scalar), threshold: floor(p * 2^32) (any integer
    scalar in [0, 2^32)). Returns an int1 tensor shaped like `index`: word (index & 3) of
    philox4x32_7(index >> 2, seed) >= threshold, compared as uint32.
    """
    index = index.to(tl.int64)
    c0, c1, c2, c3 = philox4x32_7(index >> 2, seed)
    lane = (index & 3).to(tl.int32)
    word = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    thr = threshold.to(tl.int64).to(tl.uint32)
    return word >= thr


@triton.jit(do_not_specialize=["seed"])
def _philox_words_kernel(out_ptr, counter_ptr, n, seed, BLOCK: tl.constexpr):
    """Test/debug kernel: out[i, :] = philox4x32_7(counter[i], seed) as int64 words."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    counter = tl.load(counter_ptr + offs, mask=mask, other=0)
    c0, c1, c2, c3 = philox4x32_7(counter, seed)
    base = out_ptr + offs.to(tl.int64) * 4
    tl.store(base + 0, c0.to(tl.int64), mask=mask)
    tl.store(base + 1, c1.to(tl.int64), mask=mask)
    tl.store(base + 2, c2.to(tl.int64), mask=mask)
    tl.store(base + 3, c3.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _dropout_keep_kernel(out_ptr, start, n, seed, threshold, BLOCK: tl.constexpr):
    """Test/debug kernel: out[i] = dropout_keep(start + i, seed, threshold) as int8."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    idx = start + offs.to(tl.int64)
    keep = dropout_keep(idx, seed, threshold)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


def keep_mask(n: int, seed: int, p: float, *, start: int = 0, device="cpu"):
    """Bool tensor [n]: dropout_keep(start + i) for i < n, drawn by the Triton helper
    (interpreted on the CPU). For tests and debugging."""
    import torch

    from fastpeft.ops.triton.lora_linear import _launch_kernel

    out = torch.empty(n, dtype=torch.int8, device=device)
    if n == 0:
        return out.bool()
    block = 1024
    _launch_kernel(
        _dropout_keep_kernel, (triton.cdiv(n, block),), out,
        out, int(start), n, _seed_arg(seed), dropout_threshold(p), BLOCK=block,
    )
    return out.bool()


def philox_words(counters, seed: int):
    """int64 tensor [n, 4]: the Philox4x32-7 words of each (int64, >= 0) counter, drawn by
    the Triton helper. For tests and debugging."""
    import torch

    from fastpeft.ops.triton.lora_linear import _launch_kernel

    counters = counters.to(torch.int64).contiguous()
    n = counters.numel()
    out = torch.empty((n, 4), dtype=torch.int64, device=counters.device)
    if n:
        block = 256
        _launch_kernel(_philox_words_kernel, (triton.cdiv(n, block),), out,
                       out, counters, n, _seed_arg(seed), BLOCK=block)
    return out


def _seed_arg(seed: int) -> int:
    """The 64-bit seed as a signed int64 python int (what a kernel argument can carry)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= (1 << 63) else seed
