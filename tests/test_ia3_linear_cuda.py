"""The CUDA kernels of ia3_linear (csrc/cuda/ia3_linear.cu) against the fp64 reference
(python/fastpeft/ops/reference.py and its autograd), with plain PyTorch in the kernel's dtype on
CUDA setting the tolerance (tests/_tolerance.py); opcheck; bad inputs. Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import _backend, ia3_linear, reference
from _tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL = [True] * 4
GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias", "grad_scale")
# (M, K, N): odd sizes, M = 1 and M = 0, M = 577 and 1531 (several 64-row chunks of the
# column reductions), K = 1 / N = 2.
SHAPES = [(37, 64, 48), (1, 577, 1531), (0, 33, 17), (577, 129, 70), (1531, 40, 96), (3, 1, 2)]


def make_inputs(M, K, N, scale_input, seed=0):
    """fp64 CPU tensors: x, weight, bias, scale, grad_out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * K**-0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) * 0.1
    n = K if scale_input else N
    l = 1.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    go = torch.randn(M, N, generator=g, dtype=torch.float64)
    return x, w, b, l, go


def reference_grads(x, w, b, l, go, scale_input):
    """y and (grad_x, grad_weight, grad_bias, grad_scale) by autograd through the reference, in
    the inputs' dtype and device (b may be None: its grad is then None)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, l)]
    bb = None if b is None else b.detach().clone().requires_grad_()
    y = reference.ia3_linear(leaves[0], leaves[1], bb, leaves[2], scale_input)
    inputs = [leaves[0], leaves[1]] + ([bb] if bb is not None else []) + [leaves[2]]
    grads = list(torch.autograd.grad(y, inputs, go))
    if bb is None:
        grads.insert(2, None)
    return y.detach(), grads


def check(out, ref64, plain, name):
    assert out.device.type == "cuda", name
    assert out.dtype == plain.dtype, f"{name}: dtype {out.dtype} != {plain.dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.is_contiguous(), name
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    assert_close_to_reference(out.cpu(), ref64, plain.cpu(), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("scale_input,keep", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ia3_linear_matches_reference(M, K, N, dtype, scale_input, keep, with_bias):
    x, w, b, l, go = make_inputs(M, K, N, scale_input)
    low = [t.to(dtype) for t in (x, w, b, l, go)]
    hi = [t.double() for t in low]  # the reference sees exactly the rounded inputs
    xc, wc, bc, lc, goc = [t.to(CUDA) for t in low]
    bias_c = bc if with_bias else None

    y, unscaled = torch.ops.fastpeft.ia3_linear(xc, wc, bias_c, lc, scale_input, keep)
    y64, g64 = reference_grads(hi[0], hi[1], hi[2] if with_bias else None, hi[3], hi[4],
                               scale_input)
    yp, gp = reference_grads(xc, wc, bias_c, lc, goc, scale_input)
    check(y, y64, yp, "y")
    if keep and not scale_input:
        pre64 = hi[0] @ hi[1].T + (hi[2] if with_bias else 0)
        pre_plain = xc @ wc.T + (bc if with_bias else 0)
        check(unscaled, pre64, pre_plain, "unscaled")
    else:
        assert unscaled.dim() == 1 and unscaled.numel() == 0

    mask = [True, True, with_bias, True]
    grads = torch.ops.fastpeft.ia3_linear_backward(goc, xc, wc, bias_c, lc, unscaled,
                                                   scale_input, mask)
    for i, name in enumerate(GRAD_NAMES):
        if mask[i]:
            check(grads[i], g64[i], gp[i], name)
        else:
            assert grads[i].numel() == 0, name


@pytest.mark.parametrize("scale_input,keep", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("M,K,N", [(37, 64, 48), (300, 129, 70), (0, 9, 5)])
def test_ia3_linear_float64_on_cuda_is_exact(M, K, N, scale_input, keep):
    """fp64 on CUDA (allowed for testing) agrees with the fp64 reference to rounding."""
    x, w, b, l, go = make_inputs(M, K, N, scale_input, seed=1)
    y, unscaled = torch.ops.fastpeft.ia3_linear(*(t.to(CUDA) for t in (x, w, b, l)), scale_input,
                                                keep)
    y64, g64 = reference_grads(x, w, b, l, go, scale_input)
    torch.testing.assert_close(y.cpu(), y64, rtol=1e-10, atol=1e-10)
    grads = torch.ops.fastpeft.ia3_linear_backward(
        go.to(CUDA), x.to(CUDA), w.to(CUDA), b.to(CUDA), l.to(CUDA), unscaled, scale_input, ALL)
    for name, gg, gr in zip(GRAD_NAMES, grads, g64):
        torch.testing.assert_close(gg.cpu(), gr, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("scale_input,keep", [(True, False), (False, False), (False, True)])
def test_ia3_linear_backward_output_mask(scale_input, keep):
    M, K, N = 19, 40, 24
    x, w, b, l, go = (t.float().to(CUDA) for t in make_inputs(M, K, N, scale_input, seed=2))
    _, unscaled = torch.ops.fastpeft.ia3_linear(x, w, b, l, scale_input, keep)
    full = torch.ops.fastpeft.ia3_linear_backward(go, x, w, b, l, unscaled, scale_input, ALL)
    for i in range(4):
        mask = [j == i for j in range(4)]
        part = torch.ops.fastpeft.ia3_linear_backward(go, x, w, b, l, unscaled, scale_input, mask)
        for j in range(4):
            if j == i:
                torch.testing.assert_close(part[j], full[j], rtol=1e-5, atol=1e-5)
            else:
                assert part[j].numel() == 0 and part[j].device.type == "cuda", (i, j)


def test_ia3_linear_backward_without_x():
    """scale_input=False with the unscaled output kept: grad_x, grad_bias and grad_scale need no
    x (the autograd layer then saves a 1-D empty tensor instead)."""
    M, K, N = 33, 20, 12
    x, w, b, l, go = (t.float().to(CUDA) for t in make_inputs(M, K, N, False, seed=3))
    _, unscaled = torch.ops.fastpeft.ia3_linear(x, w, b, l, False, True)
    mask = [True, False, True, True]
    with_x = torch.ops.fastpeft.ia3_linear_backward(go, x, w, b, l, unscaled, False, mask)
    no_x = torch.ops.fastpeft.ia3_linear_backward(go, x.new_empty(0), w, b, l, unscaled, False,
                                                  mask)
    for i in (0, 2, 3):
        torch.testing.assert_close(no_x[i], with_x[i])


def test_ia3_linear_grad_scale_without_bias_or_unscaled():
    """grad_scale from G = g^T x with no bias (scale_input=False, weight trainable)."""
    M, K, N = 45, 30, 21
    x, w, _, l, go = make_inputs(M, K, N, False, seed=4)
    grads = torch.ops.fastpeft.ia3_linear_backward(
        go.to(CUDA), x.to(CUDA), w.to(CUDA), None, l.to(CUDA), x.new_empty(0).to(CUDA), False,
        [False, True, False, True])
    _, g64 = reference_grads(x, w, None, l, go, False)
    torch.testing.assert_close(grads[1].cpu(), g64[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[3].cpu(), g64[3], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_ia3_linear_autograd_on_cuda(dtype, scale_input, weight_grad, monkeypatch):
    """The public op (autograd through the backward op, leading batch dims, peft's [1, n] /
    [n, 1] scale shapes) on the CUDA C++ kernels, against the reference."""
    monkeypatch.setitem(_backend.CUDA_AUTO_CHOICE, "ia3_linear", "cuda")
    M, K, N = 2 * 35, 96, 80
    x, w, b, l, go = make_inputs(M, K, N, scale_input, seed=5)
    shape = (1, K) if scale_input else (N, 1)
    low = [t.to(dtype).to(CUDA) for t in (x, w, b, l, go)]
    xl = low[0].reshape(2, 35, K).requires_grad_()
    wl = low[1].clone().requires_grad_(weight_grad)
    ll = low[3].reshape(shape).requires_grad_()
    y = ia3_linear(xl, wl, low[2], ll, scale_input)
    assert y.shape == (2, 35, N)
    leaves = [xl, ll] + ([wl] if weight_grad else [])
    got = torch.autograd.grad(y, leaves, low[4].reshape(2, 35, N))
    hi = [t.detach().double().cpu() for t in low]
    y64, g64 = reference_grads(hi[0], hi[1], hi[2], hi[3], hi[4], scale_input)
    yp, gp = reference_grads(*(t.detach() for t in low), scale_input)
    check(y.detach().reshape(M, N), y64, yp, "y")
    check(got[0].reshape(M, K), g64[0], gp[0], "grad_x")
    check(got[1].reshape(-1), g64[3], gp[3], "grad_scale")
    if weight_grad:
        check(got[2], g64[1], gp[1], "grad_weight")


def test_ia3_linear_non_contiguous_inputs():
    M, K, N = 21, 50, 30
    x, w, b, l, _ = (t.float() for t in make_inputs(M, K, N, True, seed=6))
    y_ref, _ = torch.ops.fastpeft.ia3_linear(*(t.to(CUDA) for t in (x, w, b, l)), True, False)
    w_nc = w.t().contiguous().to(CUDA).t()
    x_nc = torch.stack([x, x], dim=2).reshape(M, 2 * K).to(CUDA)[:, ::2]
    assert not (w_nc.is_contiguous() or x_nc.is_contiguous())
    y, _ = torch.ops.fastpeft.ia3_linear(x_nc, w_nc, b.to(CUDA), l.to(CUDA), True, False)
    torch.testing.assert_close(y, y_ref)


def test_ia3_linear_bad_inputs_raise():
    x = torch.randn(4, 8, device=CUDA)
    w, b = torch.randn(5, 8, device=CUDA), torch.randn(5, device=CUDA)
    l_in, l_out = torch.randn(8, device=CUDA), torch.randn(5, device=CUDA)
    op = torch.ops.fastpeft.ia3_linear
    with pytest.raises(RuntimeError, match="scale must be \\[8\\]"):
        op(x, w, b, l_out, True, False)
    with pytest.raises(RuntimeError, match="scale must be \\[5\\]"):
        op(x, w, b, l_in, False, False)
    with pytest.raises(RuntimeError, match="weight must have dtype"):
        op(x, w.half(), b, l_in, True, False)
    with pytest.raises(RuntimeError, match="weight must be on"):
        op(x, w.cpu(), b, l_in, True, False)
    with pytest.raises(RuntimeError, match="bias must be \\[5\\]"):
        op(x, w, b[:4], l_in, True, False)
    with pytest.raises(RuntimeError, match="weight must be \\[out_features, 8\\]"):
        op(x, w[:, :7], b, l_in, True, False)
    with pytest.raises(RuntimeError, match="supports float32, bfloat16 and float16"):
        op(x.int(), w.int(), None, l_in.int(), True, False)
    go = torch.randn(4, 5, device=CUDA)
    bw = torch.ops.fastpeft.ia3_linear_backward
    with pytest.raises(RuntimeError, match="grad_out must be \\[M, 5\\]"):
        bw(go[:, :4], x, w, b, l_in, x.new_empty(0), True, ALL)
    with pytest.raises(RuntimeError, match="unscaled is only used with scale_input=False"):
        bw(go, x, w, b, l_in, go.clone(), True, ALL)
    with pytest.raises(RuntimeError, match="unscaled must be \\[4, 5\\]"):
        bw(go, x, w, b, l_out, go[:3].clone(), False, ALL)
    with pytest.raises(RuntimeError, match="x must be \\[4, 8\\]"):
        bw(go, x.new_empty(0), w, b, l_out, x.new_empty(0), False, ALL)


def test_ia3_linear_opcheck():
    for scale_input, keep in ((True, False), (False, False), (False, True)):
        x, w, b, l, go = (t.float().to(CUDA) for t in make_inputs(6, 12, 9, scale_input, seed=7))
        opcheck(torch.ops.fastpeft.ia3_linear.default,
                (x.clone().requires_grad_(), w, b, l.clone().requires_grad_(), scale_input, keep))
        opcheck(torch.ops.fastpeft.ia3_linear.default, (x, w, None, l, scale_input, keep))
        _, unscaled = torch.ops.fastpeft.ia3_linear(x, w, b, l, scale_input, keep)
        for mask in (ALL, [True, False, False, True], [False, True, True, False]):
            opcheck(torch.ops.fastpeft.ia3_linear_backward.default,
                    (go, x, w, b, l, unscaled, scale_input, mask))
