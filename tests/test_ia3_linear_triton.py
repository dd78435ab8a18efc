"""Triton kernels of ia3_linear (python/fastpeft/ops/triton/ia3_linear.py, gemm.py), run on the
CPU by the Triton interpreter in-process (see tests/test_lora_linear_triton.py for how), against
the float64 reference (fastpeft.ops.reference.ia3_linear and its autograd gradients), with the
error allowed by tests/_tolerance.py (at most 2x plain PyTorch in the same dtype, plus a floor).
Shapes are small: the interpreter is slow. The CUDA cases skip without a GPU."""


import pytest
import torch
import triton

from _harness import run_under_triton_interpret
from _tolerance import assert_close_to_reference
from fastpeft.ops import reference
from fastpeft.ops.triton import gemm as tg
from fastpeft.ops.triton import ia3_linear as tia

NAMES = ("grad_x", "grad_weight", "grad_bias", "grad_scale")


def make_inputs(M, K, N, scale_input, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * s + shift).to(device=device, dtype=dtype)

    x, w = rnd(M, K), rnd(N, K, s=max(K, 1)**-0.5)
    b = rnd(N) if bias else None
    l = rnd(K if scale_input else N, s=0.5, shift=1.0)
    return x, w, b, l, rnd(M, N)


def reference_run(x, w, b, l, go, scale_input, dtype):
    """(y, unscaled, grads) of the reference in `dtype` (autograd), on x's device."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (x, w, b, l)]
    y = reference.ia3_linear(*leaves, scale_input)
    y.backward(go.to(dtype))
    unscaled = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2]).detach()
    return y.detach(), unscaled, [t.grad if t is not None else None for t in leaves]


def check(x, w, b, l, go, scale_input, keep_unscaled, mask=(True,) * 4, give_x=True, impl=None):
    """Run forward + backward of the Triton host functions (or `impl`, a pair of callables)
    and compare everything against the fp64 reference, with plain PyTorch in x's dtype
    setting the tolerance."""
    fwd, bwd = impl or (tia.ia3_linear_triton_impl, tia.ia3_linear_triton_backward_impl)
    dtype = x.dtype
    y, unscaled = fwd(x, w, b, l, scale_input, keep_unscaled)
    y64, uns64, grads64 = reference_run(x, w, b, l, go, scale_input, torch.float64)
    yp, unsp, gradsp = reference_run(x, w, b, l, go, scale_input, dtype)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close_to_reference(y, y64, yp, "y")
    if keep_unscaled and not scale_input:
        assert unscaled.shape == uns64.shape and unscaled.dtype == dtype
        assert_close_to_reference(unscaled, uns64, unsp, "unscaled")
    else:
        assert unscaled.shape == (0,)
    grads = bwd(go, x if give_x else x.new_empty(0), w, b, l, unscaled, scale_input, list(mask))
    for name, on, got, want, plain in zip(NAMES, mask, grads, grads64, gradsp):
        assert got.dtype == dtype, name
        if not on:
            assert got.shape == (0,), name
            continue
        if want is None:  # grad_bias without a bias: sum_rows(g * l) (or g)
            god = go.double()
            want = god.sum(0) * (1 if scale_input else l.double())
            plain = want.to(dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert_close_to_reference(got, want, plain, name)
    return y, unscaled, grads


# ------------------------------------------------------------------------------------------
# Host functions, interpreted
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("keep_unscaled", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_fp32(scale_input, keep_unscaled, bias):
    check(*make_inputs(37, 45, 29, scale_input, torch.float32, bias), scale_input, keep_unscaled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_input", [True, False])
def test_forward_backward_16bit(dtype, scale_input):
    """bf16 runs upcast to fp32 under the interpreter; fp16 runs fp16 dots."""
    check(*make_inputs(33, 40, 27, scale_input, dtype, seed=3), scale_input, not scale_input)


@pytest.mark.parametrize("scale_input", [True, False])
def test_odd_sizes(scale_input):
    """K = 577, N = 1531: masked edges in every dimension, many tiles."""
    check(*make_inputs(3, 577, 1531, scale_input, torch.float32, seed=1), scale_input,
          keep_unscaled=False)


@pytest.mark.parametrize("scale_input", [True, False])
def test_one_row(scale_input):
    check(*make_inputs(1, 70, 90, scale_input, torch.float32, seed=2), scale_input, True)


def test_several_row_blocks():
    """M = 150: three row blocks, so the grad_scale partials of several blocks are summed."""
    check(*make_inputs(150, 40, 33, True, torch.float32, seed=4), True, False)


@pytest.mark.parametrize("scale_input", [True, False])
def test_zero_rows(scale_input):
    x, w, b, l, go = make_inputs(0, 13, 11, scale_input, torch.float32)
    y, unscaled = tia.ia3_linear_triton_impl(x, w, b, l, scale_input, True)
    assert y.shape == (0, 11)
    assert unscaled.shape == ((0,) if scale_input else (0, 11))
    grads = tia.ia3_linear_triton_backward_impl(go, x, w, b, l, unscaled, scale_input, [True] * 4)
    for got, shape in zip(grads, [(0, 13), (11, 13), (11,), l.shape]):
        assert tuple(got.shape) == tuple(shape)
        assert not got.any()


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("K,N", [(0, 7), (9, 0)])
def test_empty_features(scale_input, K, N):
    """in_features or out_features 0: empty GEMMs (y = b * l for K = 0)."""
    check(*make_inputs(5, K, N, scale_input, torch.float32), scale_input, True)


@pytest.mark.parametrize("bias", [True, False])
def test_without_x_unscaled_kept(bias):
    """!scale_input, frozen weight: x is not saved, grad_scale comes from unscaled."""
    check(*make_inputs(23, 31, 19, False, torch.float32, bias, seed=5), False, True,
          mask=(True, False, bias, True), give_x=False)


def test_without_x_scale_input():
    """scale_input, only grad_x and grad_bias asked for: x not needed."""
    check(*make_inputs(23, 31, 19, True, torch.float32, seed=6), True, False,
          mask=(True, False, True, False), give_x=False)


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (False, True, True, True), (False,) * 4])
def test_output_mask(scale_input, mask):
    check(*make_inputs(19, 21, 17, scale_input, torch.float32, seed=7), scale_input, False,
          mask=mask)


def test_grad_scale_from_g_without_bias():
    """!scale_input without unscaled and without a bias: rowsum(G * W) alone."""
    check(*make_inputs(19, 21, 17, False, torch.float32, bias=False, seed=8), False, False,
          mask=(False, False, False, True))


def test_split_reductions():
    """The weight-gradient GEMM and the column sums split over rows (as on a GPU) give the
    same results as one split."""
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(200, 37, generator=gen), torch.randn(200, 45, generator=gen)
    w, rs = torch.randn(37, 45, generator=gen), torch.randn(37, generator=gen)
    want = (a.double().T @ b.double()) * rs.double()[:, None]
    want_dotw = ((a.double().T @ b.double()) * w.double()).sum(1)
    for splits in (1, 3):
        c, dotw, asum = tg.gemm_tn(a, b, row_scale=rs, w=w, asum=True, splits=splits)
        torch.testing.assert_close(c.double(), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(dotw.double(), want_dotw, rtol=0, atol=1e-3)
        torch.testing.assert_close(asum.double(), a.double().sum(0), rtol=0, atol=1e-4)
        torch.testing.assert_close(tg.colsum(a, b[:, :37], splits=splits).double(),
                                   (a.double() * b[:, :37].double()).sum(0), rtol=0, atol=1e-4)


def test_rejects_bad_inputs():
    x, w, b, l, go = make_inputs(4, 6, 5, True, torch.float32)
    with pytest.raises(RuntimeError, match="scale must be \\[6\\]"):
        tia.ia3_linear_triton_impl(x, w, b, l[:5], True, False)
    with pytest.raises(RuntimeError, match="scale must be \\[5\\]"):
        tia.ia3_linear_triton_impl(x, w, b, l, False, False)
    with pytest.raises(RuntimeError, match="weight dtype"):
        tia.ia3_linear_triton_impl(x, w.double(), b, l, True, False)
    with pytest.raises(RuntimeError, match="bias must be \\[5\\]"):
        tia.ia3_linear_triton_impl(x, w, b[:4], l, True, False)
    with pytest.raises(RuntimeError, match="x must be \\[4, 6\\]"):
        tia.ia3_linear_triton_backward_impl(go, x.new_empty(0), w, b, l, x.new_empty(0), True,
                                            [False, True, False, False])
    with pytest.raises(RuntimeError, match="unscaled must be"):
        tia.ia3_linear_triton_backward_impl(go, x, w, b, l[:5], go[:3], False, [True] * 4)


# ------------------------------------------------------------------------------------------
# Through the registered ops and the public wrapper
# ------------------------------------------------------------------------------------------


def test_registered_ops_and_opcheck():
    tia.register()
    tia.register()  # idempotent
    ops = torch.ops.fastpeft
    check(*make_inputs(9, 12, 10, False, torch.float32), False, True,
          impl=(ops.ia3_linear_triton, ops.ia3_linear_triton_backward))
    for scale_input in (True, False):
        x, w, b, l, go = make_inputs(6, 12, 10, scale_input, torch.float32)
        torch.library.opcheck(ops.ia3_linear_triton.default,
                              (x, w, b, l, scale_input, not scale_input))
        _, uns = ops.ia3_linear_triton(x, w, b, l, scale_input, not scale_input)
        torch.library.opcheck(ops.ia3_linear_triton_backward.default,
                              (go, x, w, b, l, uns, scale_input, [True, True, True, True]))


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("train_weight", [True, False])
def test_public_wrapper_triton_backend(monkeypatch, scale_input, train_weight):
    """fastpeft.ops.ia3_linear under use_backend("triton") (TRITON_INTERPRET=1 lets the
    dispatcher take CPU tensors): forward and autograd against the reference; with a frozen
    weight and scale_input=False the wrapper keeps `unscaled` instead of x."""
    import fastpeft.ops as fops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, b, l, go = make_inputs(2 * 7, 20, 18, scale_input, torch.float32, seed=10)
    x, go = x.view(2, 7, 20), go.view(2, 7, 18)
    l = l.view(1, -1) if scale_input else l.view(-1, 1)  # peft's layouts
    leaves = [t.clone().requires_grad_(train_weight or i in (0, 3))
              for i, t in enumerate((x, w, b, l))]
    with fops.use_backend("triton"):
        y = fops.ia3_linear(*leaves, scale_input)
    y.backward(go)
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    y_ref = reference.ia3_linear(*ref, scale_input)
    y_ref.backward(go.double())
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=0, atol=1e-4)
    for got, want in zip(leaves, ref):
        if want.requires_grad:
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Triton's own interpreter mode, and compilation for sm_90 (no GPU needed)
# ------------------------------------------------------------------------------------------


def test_triton_interpret_env_subprocess():
    """Triton's own interpreter mode: TRITON_INTERPRET=1 before triton is imported."""
    run_under_triton_interpret("test_ia3_linear_triton", """
    from fastpeft.ops.triton import gemm
    assert isinstance(gemm._gemm_kernel, InterpretedFunction)
    for si in (True, False):
        T.check(*T.make_inputs(21, 19, 17, si, torch.float32), si, not si)
    """)


def compile_for_sm90(kernel, signature, constexprs, num_warps=4, num_stages=3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    return triton.compile(ASTSource(kernel, signature, constexprs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


GEMM_FLAGS = dict(B_TRANS=False, A_SCALE=False, A_ACT=False, ACT=0, HAS_BIAS=False,
                  STORE_PRE=False, C_SCALE=False, AUX_OP=0, COLSUM=0, STORE_C=True,
                  BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, DOT_PRECISION="tf32")
TN_FLAGS = dict(B_ACT=False, ACT=0, ROW_SCALE=False, COL_SCALE=False, DOTW=False, ASUM=False,
                STORE_C=True, BLOCK_M=64, BLOCK_P=128, BLOCK_Q=128, DOT_PRECISION="tf32")


def gemm_signature(dt):
    return dict(a_ptr=dt, b_ptr=dt, c_ptr=dt, a_scale_ptr=dt, bias_ptr=dt, pre_ptr=dt,
                c_scale_ptr=dt, aux_ptr=dt, colsum_ptr="*fp32", M="i32", Q="i32", KR="i32",
                alpha="fp32")


def tn_signature(dt, c_dt):
    return dict(a_ptr=dt, b_ptr=dt, c_ptr=c_dt, row_scale_ptr=dt, col_scale_ptr=dt, w_ptr=dt,
                dotw_ptr="*fp32", asum_ptr="*fp32", M="i32", P="i32", Q="i32",
                ROWS_PER_SPLIT="i32", alpha="fp32")


def test_kernels_compile_for_cuda():
    """The flag combinations ia3_linear launches, compiled to sm_90 cubins (bf16 and fp32
    with ieee dots): catches typing errors the interpreter lets through."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tg._gemm_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted")
    gemm_cases = [
        dict(B_TRANS=True, A_SCALE=True, HAS_BIAS=True),  # forward, scale_input
        dict(B_TRANS=True, HAS_BIAS=True, STORE_PRE=True, C_SCALE=True),  # forward, !scale_input
        dict(C_SCALE=True, COLSUM=2),  # grad_x + grad_scale, scale_input
        dict(C_SCALE=True, COLSUM=2, STORE_C=False),
        dict(A_SCALE=True),  # grad_x, !scale_input
    ]
    tn_cases = [dict(COL_SCALE=True, ASUM=True), dict(ROW_SCALE=True, DOTW=True, ASUM=True),
                dict(ROW_SCALE=True, DOTW=True, STORE_C=False)]
    for dt, precision in (("*bf16", "tf32"), ("*fp32", "ieee")):
        for flags in gemm_cases:
            constexprs = {**GEMM_FLAGS, **flags, "DOT_PRECISION": precision}
            compile_for_sm90(tg._gemm_kernel, gemm_signature(dt), constexprs, num_warps=8)
        for flags in tn_cases:
            constexprs = {**TN_FLAGS, **flags, "DOT_PRECISION": precision}
            compile_for_sm90(tg._gemm_tn_kernel, tn_signature(dt, "*fp32"), constexprs,
                             num_warps=8)
        compile_for_sm90(tg._colsum_kernel, dict(a_ptr=dt, b_ptr=dt, out_ptr="*fp32", M="i32",
                                                 Q="i32", ROWS_PER_SPLIT="i32"),
                         dict(HAS_B=True, BLOCK_M=64, BLOCK_Q=128), num_stages=1)


# ------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels
# ------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("keep_unscaled", [True, False])
@pytest.mark.parametrize("M,K,N", [(300, 577, 1531), (1, 64, 48), (2048, 1024, 768)])
def test_cuda(M, K, N, dtype, scale_input, keep_unscaled):
    tia.register()
    inputs = make_inputs(M, K, N, scale_input, dtype, seed=M, device="cuda")
    ops = torch.ops.fastpeft
    check(*inputs, scale_input, keep_unscaled,
          impl=(ops.ia3_linear_triton, ops.ia3_linear_triton_backward))
    if not scale_input:
        check(*inputs, scale_input, keep_unscaled, mask=(True, False, True, True),
              give_x=not keep_unscaled)


@needs_gpu
def test_cuda_zero_rows():
    tia.register()
    x, w, b, l, go = make_inputs(0, 64, 32, False, torch.bfloat16, device="cuda")
    y, uns = torch.ops.fastpeft.ia3_linear_triton(x, w, b, l, False, True)
    assert y.shape == (0, 32) and uns.shape == (0, 32)
    grads = torch.ops.fastpeft.ia3_linear_triton_backward(go, x, w, b, l, uns, False, [True] * 4)
    assert [tuple(g.shape) for g in grads] == [(0, 64), (32, 64), (32,), (32,)]
    assert not any(g.any() for g in grads)
