"""Triton kernels of lora_linear (python/fastpeft/ops/triton), run on the CPU by the Triton
interpreter, against a float64 pure-PyTorch implementation of docs/lora_linear_contract.md.

How the interpreter is enabled: triton reads TRITON_INTERPRET when a @triton.jit decorator
runs, so setting it here would depend on test import order. Instead the host functions run
CPU tensors through fastpeft.ops.triton.lora_linear._launch_kernel, which interprets the
kernels in-process whatever TRITON_INTERPRET was (and restores triton.language afterwards;
test_interpreter_leaves_triton_unpatched). Triton's own mode, TRITON_INTERPRET=1 set before
triton is imported, is covered in a subprocess (test_triton_interpret_env_subprocess).
Shapes are small: the interpreter is slow.
"""

import pytest
import torch

import triton

from _harness import run_under_triton_interpret
from fastpeft.ops import reference
from fastpeft.ops.triton import lora_linear as tll
from fastpeft.ops.triton import philox as tph

# ------------------------------------------------------------------------------------------
# Pure-PyTorch Philox4x32-7 (int64 tensors holding uint32 words) and the contract in float64
# ------------------------------------------------------------------------------------------

_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) of the 64-bit product of the uint32 constant a and uint32 words b (int64),
    in 16-bit halves of a so nothing overflows int64."""
    p_lo = (a & 0xFFFF) * b  # < 2^48
    p_hi = (a >> 16) * b  # < 2^48
    full_lo = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^49
    lo = full_lo & _U32
    hi = ((p_hi >> 16) + (full_lo >> 32)) & _U32
    return hi, lo


def torch_philox(counter: torch.Tensor, seed: int) -> torch.Tensor:
    seed &= (1 << 64) - 1
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _U32, seed >> 32
    for _ in range(7):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
    return torch.stack([c0, c1, c2, c3], -1)


def torch_keep(index: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    words = torch_philox(index >> 2, seed)
    word = words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)
    return word >= min(int(p * 2.0**32), _U32)


def keep_mask(shape, seed: int, p: float) -> torch.Tensor:
    n = shape[0] * shape[1]
    return torch_keep(torch.arange(n, dtype=torch.int64), seed, p).reshape(shape)


def contract_forward(x, w, b, a, bm, scaling, p, seed):
    xd, wd, ad, bd = (v.double() for v in (x, w, a, bm))
    keep = keep_mask(x.shape, seed, p).double() if p > 0 else torch.ones_like(xd)
    t = (xd * keep / (1 - p)) @ ad.T
    y = xd @ wd.T + scaling * t @ bd.T
    if b is not None:
        y = y + b.double()
    return y, t


def contract_backward(go, x, w, a, bm, t, scaling, p, seed):
    god, xd, wd, ad, bd, td = (v.double() for v in (go, x, w, a, bm, t))
    keep = keep_mask(x.shape, seed, p).double() if p > 0 else torch.ones_like(xd)
    g = god @ bd
    return (
        god @ wd + scaling * (g @ ad) * keep / (1 - p),
        god.T @ xd,
        god.sum(0),
        scaling * g.T @ (xd * keep / (1 - p)),
        scaling * god.T @ td,
    )


def assert_near(actual, expected, dtype, name=""):
    assert actual.dtype == dtype, (name, actual.dtype)
    assert tuple(actual.shape) == tuple(expected.shape), (name, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    # relative to the largest magnitude; bf16 keeps 8 bits of mantissa
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (actual.double() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{name}: max error {err} > {tol} * {scale}"


def make_inputs(M, K, N, r, dtype, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    return (rnd(M, K), rnd(N, K, s=0.2), rnd(N) if bias else None, rnd(r, K, s=0.2),
            rnd(N, r, s=0.2), rnd(M, N))


SEED = 0x1CBE991A14  # 123456789012: both key words non-zero


# ------------------------------------------------------------------------------------------
# Philox
# ------------------------------------------------------------------------------------------

# philox4x32(counter, seed) from csrc/common/philox.h (compiled with g++).
CPP_KNOWN_ANSWERS = {
    (0x0, 0x0): (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48),
    (0x1, 0x0): (0x983A586E, 0xB0CC9511, 0x5850FBB9, 0x9CF9ACD8),
    (0x123456789, 0x0): (0x2A2341F2, 0x65998F5B, 0x75302BB9, 0x73FA665F),
    (0x0, 0x1CBE991A14): (0xEB21F7D0, 0xA5566B0C, 0x67E4ED46, 0xB643E16B),
    (0x1, 0x1CBE991A14): (0x68867F53, 0xE9E036A4, 0x96F8BC66, 0xFEC6834A),
    (0x123456789, 0x1CBE991A14): (0x488EFDB8, 0xB51DD4E2, 0x78AF4D07, 0xC9966B21),
    (0x0, 0xFFFFFFFFFFFFFFF9): (0x7219DBE5, 0x2B2AEB52, 0x14D14D20, 0xB9A1CF39),
    (0x1, 0xFFFFFFFFFFFFFFF9): (0x92FC911D, 0x7D1D45FA, 0xAABF4570, 0x6CFAA02C),
    (0x123456789, 0xFFFFFFFFFFFFFFF9): (0x77FC041B, 0x3B465FB5, 0x1D0E1694, 0xAAC560C8),
}


@pytest.mark.parametrize("seed", [0x0, 0x1CBE991A14, 0xFFFFFFFFFFFFFFF9])
def test_philox_words_match_cpp(seed):
    counters = torch.tensor([0x0, 0x1, 0x123456789], dtype=torch.int64)
    expected = torch.tensor([CPP_KNOWN_ANSWERS[(int(c), seed)] for c in counters])
    assert torch.equal(tph.philox_words(counters, seed), expected)
    assert torch.equal(torch_philox(counters, seed), expected)


@pytest.mark.parametrize("seed", [0, 7, SEED, -5, 2**63 + 11])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_keep_mask_matches_pure_torch(seed, p):
    for start in (0, 3, 2**34 + 5):  # unaligned starts; counters above 2^32 use c1
        got = tph.keep_mask(777, seed, p, start=start)
        want = torch_keep(torch.arange(start, start + 777, dtype=torch.int64), seed, p)
        assert torch.equal(got, want), (seed, p, start)
    frac = got.float().mean().item()
    assert abs(frac - (1 - p)) < 0.08


def test_keep_mask_matches_reference_module():
    got = tph.keep_mask(1001, SEED, 0.3)
    assert torch.equal(got, reference.philox_keep_mask(SEED, (1001,), 0.3))


def test_dropout_threshold():
    assert tph.dropout_threshold(0.0) == 0
    assert tph.dropout_threshold(0.5) == 2**31
    assert tph.dropout_threshold(0.3) == 1288490188  # as philox.h
    assert tph.dropout_threshold(1 - 1e-13) == _U32


# ------------------------------------------------------------------------------------------
# Forward and backward host functions (interpreted)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_forward(dtype, p, bias):
    M, K, N, r = 37, 45, 29, 7
    x, w, b, a, bm, _ = make_inputs(M, K, N, r, dtype, bias)
    seed = torch.tensor([SEED], dtype=torch.int64)
    y, t = tll.lora_linear_triton_impl(x, w, b, a, bm, 1.7, p, seed)
    y_ref, t_ref = contract_forward(x, w, b, a, bm, 1.7, p, SEED)
    assert_near(t, t_ref, dtype, "t")
    assert_near(y, y_ref, dtype, "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward(dtype, p):
    M, K, N, r = 37, 45, 29, 7
    x, w, _, a, bm, go = make_inputs(M, K, N, r, dtype, gen_seed=1)
    seed = torch.tensor([SEED], dtype=torch.int64)
    _, t = tll.lora_linear_triton_impl(x, w, None, a, bm, 0.8, p, seed)
    grads = tll.lora_linear_triton_backward_impl(go, x, w, a, bm, t, 0.8, p, seed, [True] * 5)
    expected = contract_backward(go, x, w, a, bm, t, 0.8, p, SEED)
    for name, got, want in zip(("grad_x", "grad_weight", "grad_bias", "grad_lora_a",
                                "grad_lora_b"), grads, expected):
        assert_near(got, want, dtype, name)


def test_multiple_tiles_and_ranks():
    """Several M/N/K tiles (grouped ordering, masked edges), r = 1 and r = 17 (BLOCK_R 32)."""
    for r in (1, 17):
        M, K, N = 130, 70, 75
        x, w, b, a, bm, go = make_inputs(M, K, N, r, torch.float32, gen_seed=r)
        seed = torch.tensor([-12345], dtype=torch.int64)  # negative int64 seed: same 64 bits
        y, t = tll.lora_linear_triton_impl(x, w, b, a, bm, 2.0, 0.5, seed)
        y_ref, t_ref = contract_forward(x, w, b, a, bm, 2.0, 0.5, -12345)
        assert_near(t, t_ref, torch.float32, "t")
        assert_near(y, y_ref, torch.float32, "y")
        grads = tll.lora_linear_triton_backward_impl(go, x, w, a, bm, t, 2.0, 0.5, seed, [1] * 5)
        expected = contract_backward(go, x, w, a, bm, t, 2.0, 0.5, -12345)
        for i, (got, want) in enumerate(zip(grads, expected)):
            assert_near(got, want, torch.float32, f"grad {i} r={r}")


def test_dropout_mask_is_the_same_forward_and_backward():
    """With A = B = identity-like selectors, t exposes the forward mask and grad_x's LoRA
    part the backward one: both must equal the Philox mask."""
    M, K = 20, 16
    x = torch.ones(M, K)
    eye = torch.eye(K)
    w = torch.zeros(K, K)
    seed = torch.tensor([99], dtype=torch.int64)
    _, t = tll.lora_linear_triton_impl(x, w, None, eye, eye, 1.0, 0.25, seed)
    keep = keep_mask((M, K), 99, 0.25)
    assert torch.equal(t != 0, keep)
    torch.testing.assert_close(t[keep], torch.full_like(t[keep], 1 / 0.75))
    gx, *_ = tll.lora_linear_triton_backward_impl(
        torch.ones(M, K), x, w, eye, eye, t, 1.0, 0.25, seed, [True, False, False, False, False])
    assert torch.equal(gx != 0, keep)


def test_output_mask():
    M, K, N, r = 9, 13, 11, 3
    x, w, _, a, bm, go = make_inputs(M, K, N, r, torch.float32)
    seed = torch.tensor([5], dtype=torch.int64)
    _, t = tll.lora_linear_triton_impl(x, w, None, a, bm, 1.0, 0.3, seed)
    expected = contract_backward(go, x, w, a, bm, t, 1.0, 0.3, 5)
    for mask in ([True, False, False, False, False], [False, True, True, False, False],
                 [False, False, False, True, True], [False] * 5):
        grads = tll.lora_linear_triton_backward_impl(go, x, w, a, bm, t, 1.0, 0.3, seed, mask)
        for i, (on, got, want) in enumerate(zip(mask, grads, expected)):
            if on:
                assert_near(got, want, torch.float32, f"grad {i}")
            else:
                assert got.shape == (0,) and got.dtype == x.dtype


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_zero_rows(p):
    K, N, r = 13, 11, 3
    x, w, b, a, bm, go = make_inputs(0, K, N, r, torch.float32)
    seed = torch.tensor([5], dtype=torch.int64)
    y, t = tll.lora_linear_triton_impl(x, w, b, a, bm, 1.0, p, seed)
    assert y.shape == (0, N) and t.shape == (0, r)
    grads = tll.lora_linear_triton_backward_impl(go, x, w, a, bm, t, 1.0, p, seed, [True] * 5)
    shapes = [(0, K), (N, K), (N,), (r, K), (N, r)]
    for got, shape in zip(grads, shapes):
        assert tuple(got.shape) == shape
        assert not got.any()


def test_rejects_bad_shapes():
    x, w, b, a, bm, _ = make_inputs(4, 6, 5, 2, torch.float32)
    seed = torch.tensor([1], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="lora_b"):
        tll.lora_linear_triton_impl(x, w, b, a, bm.T.contiguous(), 1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match="dtype"):
        tll.lora_linear_triton_impl(x, w.double(), b, a, bm, 1.0, 0.0, seed)


def test_interpreter_leaves_triton_unpatched():
    """The in-process interpreter must restore triton.language (later CUDA compilation in
    the same process depends on it) and JITFunction.__call__."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if tll._kernels_interpreted():
        pytest.skip("TRITON_INTERPRET=1: triton's own interpreter mode, nothing compiles")

    def snapshot():
        return {(id(mod), k): v for mod in (tl, tl.core, tl.math, tl.standard)
                for k, v in vars(mod).items()} | {("tensor", k): v for k, v in
                                                  vars(tl.tensor).items()}

    before = snapshot()
    call = JITFunction.__dict__["__call__"]
    x, w, b, a, bm, go = make_inputs(5, 7, 6, 2, torch.float32)
    seed = torch.tensor([3], dtype=torch.int64)
    _, t = tll.lora_linear_triton_impl(x, w, b, a, bm, 1.0, 0.5, seed)
    tll.lora_linear_triton_backward_impl(go, x, w, a, bm, t, 1.0, 0.5, seed, [True] * 5)
    after = snapshot()
    changed = [k for k in before if k[1] != "__builtins__" and before[k] is not after.get(k)]
    assert not changed, changed[:10]
    assert JITFunction.__dict__["__call__"] is call


def test_triton_interpret_env_subprocess():
    """Triton's own interpreter mode: TRITON_INTERPRET=1 before triton is imported."""
    run_under_triton_interpret("test_lora_linear_triton", """
    from fastpeft.ops.triton import lora_linear as tll
    assert isinstance(tll._lora_fwd_kernel, InterpretedFunction)
    x, w, b, a, bm, go = T.make_inputs(21, 19, 17, 5, torch.float32)
    seed = torch.tensor([T.SEED], dtype=torch.int64)
    y, t = tll.lora_linear_triton_impl(x, w, b, a, bm, 1.5, 0.3, seed)
    y_ref, t_ref = T.contract_forward(x, w, b, a, bm, 1.5, 0.3, T.SEED)
    T.assert_near(y, y_ref, torch.float32, "y")
    T.assert_near(t, t_ref, torch.float32, "t")
    grads = tll.lora_linear_triton_backward_impl(go, x, w, a, bm, t, 1.5, 0.3, seed, [1] * 5)
    for g, e in zip(grads, T.contract_backward(go, x, w, a, bm, t, 1.5, 0.3, T.SEED)):
        T.assert_near(g, e, torch.float32)
    """)


# ------------------------------------------------------------------------------------------
# Through the registered ops (needs the compiled extension for the schemas)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_registered_ops(dtype):
    tll.register()
    tll.register()  # idempotent
    x, w, b, a, bm, go = make_inputs(37, 45, 29, 7, dtype)
    seed = torch.tensor([SEED], dtype=torch.int64)
    y, t = torch.ops.fastpeft.lora_linear_triton(x, w, b, a, bm, 1.7, 0.3, seed)
    y_ref, t_ref = contract_forward(x, w, b, a, bm, 1.7, 0.3, SEED)
    assert_near(y, y_ref, dtype, "y")
    assert_near(t, t_ref, dtype, "t")
    grads = torch.ops.fastpeft.lora_linear_triton_backward(
        go, x, w, a, bm, t, 1.7, 0.3, seed, [True, True, False, True, True])
    expected = contract_backward(go, x, w, a, bm, t, 1.7, 0.3, SEED)
    for i, (got, want) in enumerate(zip(grads, expected)):
        if i == 2:
            assert got.shape == (0,)
        else:
            assert_near(got, want, dtype, f"grad {i}")


def test_same_mask_as_cpp_cpu_kernel():
    """The Triton kernels and the C++ CPU kernel draw the same dropout mask."""
    tll.register()
    x, w, b, a, bm, go = make_inputs(37, 45, 29, 7, torch.float32)
    seed = torch.tensor([SEED], dtype=torch.int64)
    y_cpp, t_cpp = torch.ops.fastpeft.lora_linear(x, w, b, a, bm, 1.7, 0.3, seed)
    y, t = torch.ops.fastpeft.lora_linear_triton(x, w, b, a, bm, 1.7, 0.3, seed)
    torch.testing.assert_close(t, t_cpp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_cpp, rtol=1e-5, atol=1e-5)
    mask = [True] * 5
    g_cpp = torch.ops.fastpeft.lora_linear_backward(go, x, w, a, bm, t, 1.7, 0.3, seed, mask)
    g = torch.ops.fastpeft.lora_linear_triton_backward(go, x, w, a, bm, t, 1.7, 0.3, seed, mask)
    for got, want in zip(g, g_cpp):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_opcheck():
    """Schema, fake kernels and autograd registration (the fakes and autograd come from
    fastpeft.ops.lora_linear) agree with the Triton kernels."""
    tll.register()
    x, w, b, a, bm, go = make_inputs(6, 12, 10, 4, torch.float32)
    seed = torch.tensor([7], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_triton.default,
                          (x, w, b, a, bm, 0.5, 0.2, seed))
    _, t = torch.ops.fastpeft.lora_linear_triton(x, w, b, a, bm, 0.5, 0.2, seed)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_triton_backward.default,
                          (go, x, w, a, bm, t, 0.5, 0.2, seed, [True, False, True, True, True]))


# ------------------------------------------------------------------------------------------
# The compiled (CUDA) path, without a GPU: the kernels must compile for sm_90
# ------------------------------------------------------------------------------------------


def test_kernels_compile_for_cuda():
    """Compiles each kernel (bf16, dropout on) to a cubin for sm_90 with triton's bundled
    ptxas; needs no GPU. Catches typing errors the interpreter lets through."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tll._lora_fwd_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted")
    target = GPUTarget("cuda", 90, 32)
    dt = "*bf16"
    common = dict(DOT_PRECISION="tf32")
    cases = [
        (tll._lora_shrink_kernel,
         dict(x_ptr=dt, a_ptr=dt, t_ptr=dt, M="i32", K="i32", RANK="i32", seed="i64",
              threshold="i64", keep_scale="fp32"),
         dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_K=64, BLOCK_R=16)),
        (tll._lora_fwd_kernel,
         dict(x_ptr=dt, w_ptr=dt, bias_ptr=dt, t_ptr=dt, b_ptr=dt, y_ptr=dt, M="i32", N="i32",
              K="i32", RANK="i32", scaling="fp32"),
         dict(HAS_BIAS=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16, GROUP_M=8)),
        (tll._lora_dx_kernel,
         dict(go_ptr=dt, w_ptr=dt, g_ptr=dt, a_ptr=dt, gx_ptr=dt, M="i32", N="i32", K="i32",
              RANK="i32", lora_scale="fp32", seed="i64", threshold="i32"),
         dict(HAS_DROPOUT=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, BLOCK_R=32, GROUP_M=8)),
        (tll._lora_grad_a_kernel,
         dict(g_ptr=dt, x_ptr=dt, out_ptr="*fp32", M="i32", K="i32", RANK="i32",
              ROWS_PER_SPLIT="i32", out_scale="fp32", seed="i64", threshold="i64"),
         dict(HAS_DROPOUT=True, BLOCK_M=64, BLOCK_K=64, BLOCK_R=16)),
    ]
    for kernel, signature, constexprs in cases:
        constexprs = {**constexprs, **common}
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options=dict(num_warps=4, num_stages=3))
        assert "mul.hi.u32" in compiled.asm["ptx"] or "HAS_DROPOUT" not in constexprs


# ------------------------------------------------------------------------------------------
# On a GPU: the compiled Triton kernels against the contract and the CUDA C++ kernels
# ------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M,K,N,r", [(300, 577, 1531, 7), (1, 64, 48, 16), (1024, 512, 768, 64)])
def test_cuda_triton_matches_contract_and_cuda_cpp(M, K, N, r, dtype, p):
    tll.register()
    x, w, b, a, bm, go = (t.cuda() if t is not None else None for t in make_inputs(M, K, N, r, dtype))
    seed = torch.tensor([SEED], dtype=torch.int64)
    y, t = torch.ops.fastpeft.lora_linear_triton(x, w, b, a, bm, 1.7, p, seed)
    y_ref, t_ref = contract_forward(x.cpu(), w.cpu(), b.cpu(), a.cpu(), bm.cpu(), 1.7, p, SEED)
    assert_near(y.cpu().to(dtype), y_ref, dtype, "y")
    grads = torch.ops.fastpeft.lora_linear_triton_backward(go, x, w, a, bm, t, 1.7, p, seed, [True] * 5)
    expected = contract_backward(go.cpu(), x.cpu(), w.cpu(), a.cpu(), bm.cpu(), t.cpu(), 1.7, p, SEED)
    for i, (got, want) in enumerate(zip(grads, expected)):
        assert_near(got.cpu(), want, dtype, f"grad {i}")
    y_cpp, _ = torch.ops.fastpeft.lora_linear(x, w, b, a, bm, 1.7, p, seed)
    torch.testing.assert_close(y, y_cpp, rtol=2e-2 if dtype != torch.float32 else 1e-4,
                               atol=2e-2 if dtype != torch.float32 else 1e-4)
