"""Triton kernels of adapter_bottleneck (python/fastpeft/ops/triton/adapter_bottleneck.py,
gemm.py), run on the CPU by the Triton interpreter in-process (see
tests/test_lora_linear_triton.py for how), against the float64 reference
(fastpeft.ops.reference.adapter_bottleneck and its autograd gradients), with the error allowed
by tests/_tolerance.py. Shapes are small: the interpreter is slow. CUDA cases skip without a
GPU."""


import pytest
import torch

from _harness import run_under_triton_interpret
from _tolerance import assert_close_to_reference
from fastpeft.ops import reference
from fastpeft.ops.triton import adapter_bottleneck as tab
from fastpeft.ops.triton import gemm as tg
from test_ia3_linear_triton import compile_for_sm90, gemm_signature, tn_signature
from test_ia3_linear_triton import GEMM_FLAGS, TN_FLAGS

NAMES = ("grad_h", "grad_w_down", "grad_b_down", "grad_w_up", "grad_b_up")
ACTS = ("relu", "gelu", "gelu_tanh", "silu")


def make_inputs(M, D, R, dtype, bias=True, residual=False, seed=0, device="cpu", z_spread=1.0):
    """h, w_down, b_down, w_up, b_up, residual, grad_out; z_spread scales w_down (and so the
    pre-activation's range)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    h, wd, wu = rnd(M, D), rnd(R, D, s=z_spread * max(D, 1)**-0.5), rnd(D, R, s=max(R, 1)**-0.5)
    bd, bu = (rnd(R), rnd(D)) if bias else (None, None)
    res = rnd(M, D) if residual else None
    return h, wd, bd, wu, bu, res, rnd(M, D)


def reference_run(h, wd, bd, wu, bu, res, go, act, scaling, dtype):
    """(out, z, grads of h, wd, bd, wu, bu) of the reference in `dtype` (autograd)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (h, wd, bd, wu, bu)]
    r = res.to(dtype) if res is not None else None
    out = reference.adapter_bottleneck(*leaves, act, scaling, r)
    out.backward(go.to(dtype))
    z = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2]).detach()
    return out.detach(), z, [t.grad if t is not None else None for t in leaves]


def check(h, wd, bd, wu, bu, res, go, act, scaling=0.7, mask=(True,) * 5, impl=None):
    fwd, bwd = impl or (tab.adapter_bottleneck_triton_impl,
                        tab.adapter_bottleneck_triton_backward_impl)
    dtype = h.dtype
    out, z = fwd(h, wd, bd, wu, bu, act, scaling, res)
    out64, z64, grads64 = reference_run(h, wd, bd, wu, bu, res, go, act, scaling, torch.float64)
    outp, zp, gradsp = reference_run(h, wd, bd, wu, bu, res, go, act, scaling, dtype)
    assert out.dtype == z.dtype == dtype
    assert out.shape == out64.shape and z.shape == z64.shape
    assert_close_to_reference(z, z64, zp, "z")
    assert_close_to_reference(out, out64, outp, "out")
    grads = bwd(go, h, wd, wu, z, act, scaling, res is None, list(mask))
    for i, (name, on, got) in enumerate(zip(NAMES, mask, grads)):
        assert got.dtype == dtype, name
        if not on:
            assert got.shape == (0,), name
            continue
        want, plain = grads64[i], gradsp[i]
        if want is None:  # a bias grad without a bias: computed anyway
            want, plain = _bias_grads(h, wd, wu, go, act, scaling, i)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert_close_to_reference(got, want, plain, name)
    return out, z, grads


def _bias_grads(h, wd, wu, go, act, scaling, i):
    """grad_b_down / grad_b_up (index 2 / 4) of a zero bias, fp64 and in h's dtype."""
    res = []
    for dtype in (torch.float64, h.dtype):
        R, D = wd.shape
        bd = torch.zeros(R, dtype=dtype, device=h.device, requires_grad=True)
        bu = torch.zeros(D, dtype=dtype, device=h.device, requires_grad=True)
        out = reference.adapter_bottleneck(h.to(dtype), wd.to(dtype), bd, wu.to(dtype), bu, act,
                                           scaling)
        out.backward(go.to(dtype))
        res.append((bd if i == 2 else bu).grad)
    return res


# ------------------------------------------------------------------------------------------
# Host functions, interpreted
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_forward_backward_fp32(act, residual):
    check(*make_inputs(37, 45, 7, torch.float32, residual=residual, seed=1), act)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(-z) -> inf
@pytest.mark.parametrize("act", ACTS)
def test_activations_wide_range(act):
    """Pre-activations up to |z| ~ 20 (exp / sigmoid saturation, erf tails)."""
    check(*make_inputs(40, 32, 16, torch.float32, seed=2, z_spread=8.0), act, scaling=1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_forward_backward_16bit(dtype, act):
    """bf16 runs upcast to fp32 under the interpreter (z rounded as stored); fp16 runs fp16."""
    check(*make_inputs(33, 40, 12, dtype, residual=act == "silu", seed=3), act)


def test_no_bias():
    check(*make_inputs(21, 30, 9, torch.float32, bias=False, seed=4), "gelu_tanh",
          mask=(True, True, True, True, True))


def test_odd_sizes():
    """D = 577 (masked edges), bottleneck 7, M = 70 (two row blocks)."""
    check(*make_inputs(70, 577, 7, torch.float32, seed=5), "relu", scaling=2.0)


def test_one_row_and_wide_bottleneck():
    check(*make_inputs(1, 48, 80, torch.float32, residual=True, seed=6), "silu")


def test_zero_rows():
    h, wd, bd, wu, bu, _, go = make_inputs(0, 13, 5, torch.float32)
    out, z = tab.adapter_bottleneck_triton_impl(h, wd, bd, wu, bu, "gelu", 1.0, None)
    assert out.shape == (0, 13) and z.shape == (0, 5)
    grads = tab.adapter_bottleneck_triton_backward_impl(go, h, wd, wu, z, "gelu", 1.0, True,
                                                        [True] * 5)
    for got, shape in zip(grads, [(0, 13), (5, 13), (5,), (13, 5), (13,)]):
        assert tuple(got.shape) == shape
        assert not got.any()


@pytest.mark.parametrize("D,R", [(9, 0), (0, 3)])
def test_empty_hidden_or_bottleneck(D, R):
    """bottleneck 0 (out = h + scaling * b_up) or hidden 0: empty GEMMs."""
    check(*make_inputs(5, D, R, torch.float32), "silu")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mask", [(True, False, False, False, False),
                                  (False, True, False, False, False),
                                  (False, False, True, False, False),
                                  (False, False, False, True, False),
                                  (False, False, False, False, True),
                                  (False, True, True, True, True), (False,) * 5])
def test_output_mask(residual, mask):
    check(*make_inputs(19, 21, 6, torch.float32, residual=residual, seed=7), "silu", mask=mask)


def test_rejects_bad_inputs():
    h, wd, bd, wu, bu, res, go = make_inputs(4, 6, 3, torch.float32, residual=True)
    impl = tab.adapter_bottleneck_triton_impl
    with pytest.raises(RuntimeError, match="activation must be one of"):
        impl(h, wd, bd, wu, bu, "tanh", 1.0, None)
    with pytest.raises(RuntimeError, match="w_up must be \\[6, 3\\]"):
        impl(h, wd, bd, wu.T.contiguous(), bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="b_down must be \\[3\\]"):
        impl(h, wd, bu, wu, bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="residual dtype"):
        impl(h, wd, bd, wu, bu, "relu", 1.0, res.double())
    with pytest.raises(RuntimeError, match="z must be \\[4, 3\\]"):
        tab.adapter_bottleneck_triton_backward_impl(go, h, wd, wu, h, "relu", 1.0, True,
                                                    [True] * 5)


# ------------------------------------------------------------------------------------------
# Through the registered ops and the public wrapper
# ------------------------------------------------------------------------------------------


def test_registered_ops_and_opcheck():
    tab.register()
    tab.register()  # idempotent
    ops = torch.ops.fastpeft
    check(*make_inputs(9, 12, 4, torch.float32, residual=True), "gelu",
          impl=(ops.adapter_bottleneck_triton, ops.adapter_bottleneck_triton_backward))
    h, wd, bd, wu, bu, res, go = make_inputs(6, 12, 4, torch.float32, residual=True)
    for r in (None, res):
        torch.library.opcheck(ops.adapter_bottleneck_triton.default,
                              (h, wd, bd, wu, bu, "silu", 0.5, r))
    _, z = ops.adapter_bottleneck_triton(h, wd, bd, wu, bu, "silu", 0.5, None)
    torch.library.opcheck(ops.adapter_bottleneck_triton_backward.default,
                          (go, h, wd, wu, z, "silu", 0.5, True, [True, True, False, True, True]))


@pytest.mark.parametrize("residual", [False, True])
def test_public_wrapper_triton_backend(monkeypatch, residual):
    import fastpeft.ops as fops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h, wd, bd, wu, bu, res, go = make_inputs(2 * 5, 16, 4, torch.float32, residual=residual,
                                             seed=8)
    leaves = [t.view(2, 5, 16) if i == 0 else t for i, t in enumerate((h, wd, bd, wu, bu))]
    leaves = [t.clone().requires_grad_() for t in leaves]
    r = res.view(2, 5, 16).clone().requires_grad_() if residual else None
    with fops.use_backend("triton"):
        out = fops.adapter_bottleneck(*leaves, "gelu_new", 0.5, r)  # an alias of gelu_tanh
    out.backward(go.view(2, 5, 16))
    ref = [t.detach().double().requires_grad_() for t in leaves]
    r_ref = r.detach().double().requires_grad_() if residual else None
    out_ref = reference.adapter_bottleneck(*ref, "gelu_tanh", 0.5, r_ref)
    out_ref.backward(go.view(2, 5, 16).double())
    torch.testing.assert_close(out.double(), out_ref.detach(), rtol=0, atol=1e-4)
    for got, want in zip(leaves + ([r] if residual else []), ref + ([r_ref] if residual else [])):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Triton's own interpreter mode, and compilation for sm_90 (no GPU needed)
# ------------------------------------------------------------------------------------------


def test_triton_interpret_env_subprocess():
    """Triton's own interpreter mode: TRITON_INTERPRET=1 before triton is imported."""
    run_under_triton_interpret("test_adapter_bottleneck_triton", """
    from fastpeft.ops.triton import gemm
    assert isinstance(gemm._gemm_kernel, InterpretedFunction)
    T.check(*T.make_inputs(21, 19, 5, torch.float32), "gelu")
    T.check(*T.make_inputs(21, 19, 5, torch.float32, residual=True), "gelu_tanh")
    """)


def test_kernels_compile_for_cuda():
    """The flag combinations adapter_bottleneck launches (every activation in the prologue
    and in act'), compiled to sm_90 cubins: bf16, and fp32 with ieee dots for two of them."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tg._gemm_kernel, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted")
    small = dict(BLOCK_N=16, BLOCK_K=64)  # z / gz: a bottleneck of <= 16
    cases = [(dict(B_TRANS=True, HAS_BIAS=True, **small), "*bf16"),  # z
             (dict(C_SCALE=False, AUX_OP=2), "*bf16"),  # grad_h (+ g)
             (dict(B_TRANS=True, A_ACT=True, ACT=2, HAS_BIAS=True, AUX_OP=2, BLOCK_K=16),
              "*fp32")]
    for act in range(1, 5):
        cases.append((dict(B_TRANS=True, A_ACT=True, ACT=act, HAS_BIAS=True, AUX_OP=2,
                           BLOCK_K=16), "*bf16"))  # out
        cases.append((dict(AUX_OP=1, ACT=act, COLSUM=1, **small), "*bf16"))  # gz
    for flags, dt in cases:
        constexprs = {**GEMM_FLAGS, **flags, "DOT_PRECISION": "ieee" if dt == "*fp32" else "tf32"}
        compile_for_sm90(tg._gemm_kernel, gemm_signature(dt), constexprs)
    for flags, c_dt in ((dict(B_ACT=True, ACT=3, ASUM=True, BLOCK_Q=16), "*bf16"),
                        (dict(BLOCK_P=16), "*fp32")):
        compile_for_sm90(tg._gemm_tn_kernel, tn_signature("*bf16", c_dt), {**TN_FLAGS, **flags})


# ------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels
# ------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("M,D,R", [(300, 577, 7), (1, 64, 16), (4096, 1024, 64)])
def test_cuda(M, D, R, dtype, act, residual):
    tab.register()
    ops = torch.ops.fastpeft
    check(*make_inputs(M, D, R, dtype, residual=residual, seed=M, device="cuda"), act,
          impl=(ops.adapter_bottleneck_triton, ops.adapter_bottleneck_triton_backward))


@needs_gpu
def test_cuda_zero_rows_no_bias():
    tab.register()
    h, wd, _, wu, _, _, go = make_inputs(0, 64, 8, torch.bfloat16, device="cuda")
    out, z = torch.ops.fastpeft.adapter_bottleneck_triton(h, wd, None, wu, None, "relu", 1.0,
                                                          None)
    assert out.shape == (0, 64) and z.shape == (0, 8)
    grads = torch.ops.fastpeft.adapter_bottleneck_triton_backward(go, h, wd, wu, z, "relu", 1.0,
                                                                  True, [True] * 5)
    assert [tuple(g.shape) for g in grads] == [(0, 64), (8, 64), (8,), (64, 8), (64,)]
    assert not any(g.any() for g in grads)
