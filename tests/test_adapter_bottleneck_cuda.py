"""The CUDA kernels of adapter_bottleneck (csrc/cuda/adapter_bottleneck.cu) against the fp64
reference (python/fastpeft/ops/reference.py and its autograd), with plain PyTorch in the
kernel's dtype on CUDA setting the tolerance (tests/_tolerance.py); opcheck; bad inputs.
Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import _backend, adapter_bottleneck, reference
from _tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
ALL = [True] * 5
GRAD_NAMES = ("grad_h", "grad_w_down", "grad_b_down", "grad_w_up", "grad_b_up")
# (M, D, R): odd sizes, M = 1 and M = 0, M = 577 and 1531 (several 64-row chunks of the bias
# reductions), R = 1 and a bottleneck wider than one 32-column block.
SHAPES = [(37, 64, 16), (1, 577, 7), (0, 33, 5), (577, 96, 70), (1531, 40, 3), (3, 1, 1)]
SCALING = 0.7


def make_inputs(M, D, R, seed=0):
    """fp64 CPU tensors: h, w_down, b_down, w_up, b_up, residual, grad_out."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return (rand(M, D), rand(R, D, scale=D**-0.5), rand(R, scale=0.3), rand(D, R, scale=R**-0.5),
            rand(D, scale=0.1), rand(M, D), rand(M, D))


def reference_grads(h, wd, bd, wu, bu, act, residual, go):
    """out, z and (grad_h, grad_w_down, grad_b_down, grad_w_up, grad_b_up) by autograd through
    the reference in the inputs' dtype and device (a None bias gets a None grad)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (h, wd, bd, wu, bu)]
    out = reference.adapter_bottleneck(*leaves[:5], act, SCALING, residual)
    z = torch.nn.functional.linear(h, wd, bd)
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(out, present, go))
    grads = [next(got) if t is not None else None for t in leaves]
    return out.detach(), z.detach(), grads


def check(out, ref64, plain, name):
    assert out.device.type == "cuda", name
    assert out.dtype == plain.dtype, f"{name}: dtype {out.dtype} != {plain.dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.is_contiguous(), name
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    assert_close_to_reference(out.cpu(), ref64, plain.cpu(), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,R", SHAPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual,with_bias", [(False, True), (True, False)])
def test_adapter_bottleneck_matches_reference(M, D, R, dtype, act, with_residual, with_bias):
    h, wd, bd, wu, bu, res, go = make_inputs(M, D, R)
    low = [t.to(dtype) for t in (h, wd, bd, wu, bu, res, go)]
    hi = [t.double() for t in low]
    hc, wdc, bdc, wuc, buc, resc, goc = [t.to(CUDA) for t in low]
    if not with_bias:
        bdc = buc = None
    residual = resc if with_residual else None

    out, z = torch.ops.fastpeft.adapter_bottleneck(hc, wdc, bdc, wuc, buc, act, SCALING, residual)
    out64, z64, g64 = reference_grads(hi[0], hi[1], hi[2] if with_bias else None, hi[3],
                                      hi[4] if with_bias else None, act,
                                      hi[5] if with_residual else None, hi[6])
    outp, zp, gp = reference_grads(hc, wdc, bdc, wuc, buc, act, residual, goc)
    check(out, out64, outp, "out")
    check(z, z64, zp, "z")

    mask = [True, True, with_bias, True, with_bias]
    grads = torch.ops.fastpeft.adapter_bottleneck_backward(goc, hc, wdc, wuc, z, act, SCALING,
                                                           not with_residual, mask)
    for i, name in enumerate(GRAD_NAMES):
        if mask[i]:
            check(grads[i], g64[i], gp[i], name)
        else:
            assert grads[i].numel() == 0, name


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("residual_is_h", [True, False])
@pytest.mark.parametrize("M,D,R", [(37, 64, 16), (300, 129, 70), (0, 9, 5)])
def test_adapter_bottleneck_float64_on_cuda_is_exact(M, D, R, act, residual_is_h):
    """fp64 on CUDA (allowed for testing) agrees with the fp64 reference to rounding."""
    h, wd, bd, wu, bu, res, go = make_inputs(M, D, R, seed=1)
    residual = None if residual_is_h else res
    out, z = torch.ops.fastpeft.adapter_bottleneck(
        *(t.to(CUDA) for t in (h, wd, bd, wu, bu)), act, SCALING,
        None if residual is None else residual.to(CUDA))
    out64, z64, g64 = reference_grads(h, wd, bd, wu, bu, act, residual, go)
    torch.testing.assert_close(out.cpu(), out64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z.cpu(), z64, rtol=1e-10, atol=1e-10)
    grads = torch.ops.fastpeft.adapter_bottleneck_backward(
        go.to(CUDA), h.to(CUDA), wd.to(CUDA), wu.to(CUDA), z, act, SCALING, residual_is_h, ALL)
    for name, gg, gr in zip(GRAD_NAMES, grads, g64):
        torch.testing.assert_close(gg.cpu(), gr, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("residual_is_h", [True, False])
def test_adapter_bottleneck_backward_output_mask(residual_is_h):
    M, D, R = 19, 40, 12
    h, wd, bd, wu, bu, res, go = (t.float().to(CUDA) for t in make_inputs(M, D, R, seed=2))
    _, z = torch.ops.fastpeft.adapter_bottleneck(h, wd, bd, wu, bu, "gelu", SCALING,
                                                 None if residual_is_h else res)
    bw = torch.ops.fastpeft.adapter_bottleneck_backward
    full = bw(go, h, wd, wu, z, "gelu", SCALING, residual_is_h, ALL)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = bw(go, h, wd, wu, z, "gelu", SCALING, residual_is_h, mask)
        for j in range(5):
            if j == i:
                torch.testing.assert_close(part[j], full[j], rtol=1e-5, atol=1e-5)
            else:
                assert part[j].numel() == 0 and part[j].device.type == "cuda", (i, j)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_adapter_bottleneck_autograd_on_cuda(dtype, with_residual, monkeypatch):
    """The public op (autograd through the backward op, leading batch dims, an alias name of the
    activation) on the CUDA C++ kernels, against the reference."""
    monkeypatch.setitem(_backend.CUDA_AUTO_CHOICE, "adapter_bottleneck", "cuda")
    M, D, R = 2 * 45, 96, 24
    h, wd, bd, wu, bu, res, go = make_inputs(M, D, R, seed=3)
    low = [t.to(dtype).to(CUDA) for t in (h, wd, bd, wu, bu, res, go)]
    leaves = [low[0].reshape(2, 45, D).requires_grad_()] + [
        t.clone().requires_grad_() for t in low[1:5]]
    res_leaf = low[5].reshape(2, 45, D).requires_grad_() if with_residual else None
    out = adapter_bottleneck(*leaves, "swish", SCALING, res_leaf)
    assert out.shape == (2, 45, D)
    wrt = leaves + ([res_leaf] if with_residual else [])
    got = torch.autograd.grad(out, wrt, low[6].reshape(2, 45, D))
    hi = [t.double().cpu() for t in low]
    out64, _, g64 = reference_grads(*hi[:5], "silu", hi[5] if with_residual else None, hi[6])
    outp, _, gp = reference_grads(*low[:5], "silu", low[5] if with_residual else None, low[6])
    check(out.detach().reshape(M, D), out64, outp, "out")
    check(got[0].reshape(M, D), g64[0], gp[0], "grad_h")
    for i in range(1, 5):
        check(got[i], g64[i], gp[i], GRAD_NAMES[i])
    if with_residual:
        torch.testing.assert_close(got[5].reshape(M, D), low[6])


def test_adapter_bottleneck_non_contiguous_inputs():
    M, D, R = 21, 50, 8
    h, wd, bd, wu, bu, res, _ = (t.float() for t in make_inputs(M, D, R, seed=4))
    ref, _ = torch.ops.fastpeft.adapter_bottleneck(*(t.to(CUDA) for t in (h, wd, bd, wu, bu)),
                                                   "relu", SCALING, res.to(CUDA))
    wd_nc = wd.t().contiguous().to(CUDA).t()
    wu_nc = wu.t().contiguous().to(CUDA).t()
    h_nc = torch.stack([h, h], dim=2).reshape(M, 2 * D).to(CUDA)[:, ::2]
    res_nc = res.t().contiguous().to(CUDA).t()
    assert not any(t.is_contiguous() for t in (wd_nc, wu_nc, h_nc, res_nc))
    out, _ = torch.ops.fastpeft.adapter_bottleneck(h_nc, wd_nc, bd.to(CUDA), wu_nc, bu.to(CUDA),
                                                   "relu", SCALING, res_nc)
    torch.testing.assert_close(out, ref)


def test_adapter_bottleneck_bad_inputs_raise():
    h = torch.randn(4, 8, device=CUDA)
    wd, wu = torch.randn(3, 8, device=CUDA), torch.randn(8, 3, device=CUDA)
    bd, bu = torch.randn(3, device=CUDA), torch.randn(8, device=CUDA)
    op = torch.ops.fastpeft.adapter_bottleneck
    with pytest.raises(RuntimeError, match="activation must be one of"):
        op(h, wd, bd, wu, bu, "tanh", 1.0, None)
    with pytest.raises(RuntimeError, match="w_up must be \\[8, 3\\]"):
        op(h, wd, bd, wu.t().contiguous(), bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="w_down must be \\[bottleneck, 8\\]"):
        op(h, wd[:, :7], bd, wu, bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="b_down must be \\[3\\]"):
        op(h, wd, bu, wu, bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="b_up must be \\[8\\]"):
        op(h, wd, bd, wu, bd, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="residual must be \\[4, 8\\]"):
        op(h, wd, bd, wu, bu, "relu", 1.0, h[:3])
    with pytest.raises(RuntimeError, match="w_down must have dtype"):
        op(h, wd.half(), bd, wu, bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="w_up must be on"):
        op(h, wd, bd, wu.cpu(), bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match="supports float32, bfloat16 and float16"):
        op(h.int(), wd.int(), None, wu.int(), None, "relu", 1.0, None)
    _, z = op(h, wd, bd, wu, bu, "relu", 1.0, None)
    bw = torch.ops.fastpeft.adapter_bottleneck_backward
    with pytest.raises(RuntimeError, match="z must be \\[4, 3\\]"):
        bw(h, h, wd, wu, z[:, :2], "relu", 1.0, True, ALL)
    with pytest.raises(RuntimeError, match="grad_out must be \\[4, 8\\]"):
        bw(h[:3], h, wd, wu, z, "relu", 1.0, True, ALL)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        bw(h, h, wd, wu, z, "swish", 1.0, True, ALL)  # aliases are resolved in Python


def test_adapter_bottleneck_opcheck():
    h, wd, bd, wu, bu, res, go = (t.float().to(CUDA) for t in make_inputs(6, 12, 5, seed=5))
    op = torch.ops.fastpeft.adapter_bottleneck.default
    opcheck(op, (h.clone().requires_grad_(), wd.clone().requires_grad_(), bd,
                 wu.clone().requires_grad_(), bu, "gelu", SCALING, None))
    opcheck(op, (h, wd, None, wu, None, "silu", SCALING, res.clone().requires_grad_()))
    _, z = torch.ops.fastpeft.adapter_bottleneck(h, wd, bd, wu, bu, "gelu_tanh", SCALING, None)
    for mask in (ALL, [True, False, False, True, False], [False, True, True, False, True]):
        for residual_is_h in (True, False):
            opcheck(torch.ops.fastpeft.adapter_bottleneck_backward.default,
                    (go, h, wd, wu, z, "gelu_tanh", SCALING, residual_is_h, mask))
