"""masked_whiten (CPU C++ kernel) against the pure-PyTorch reference and TRL's formula."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import masked_whiten, reference, use_backend
from _ppo import randn, random_mask, right_padded_mask, trl_masked_whiten
from _tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(4, 37), (1, 577), (3, 1531), (2, 1), (7,), (2, 3, 129), (70000,), (64, 1024)]


def make_inputs(shape, dtype=torch.float64, seed=0):
    x = randn(shape, dtype, seed, 2.0, 0.7)
    mask = right_padded_mask(shape, seed + 1, min_len=1) if len(shape) > 1 else random_mask(
        shape, seed + 1)
    return x, mask


def run(fn, x, mask, shift_mean, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, mask, shift_mean)
    (g,) = torch.autograd.grad(y, x, grad_out)
    return y.detach(), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_matches_reference(shape, dtype, shift_mean):
    x, mask = make_inputs(shape, dtype)
    go = randn(shape, torch.float64, 9)
    out = run(masked_whiten, x, mask, shift_mean, go.to(dtype))
    ref64 = run(reference.masked_whiten, x.double(), mask, shift_mean, go)
    plain = run(reference.masked_whiten, x, mask, shift_mean, go.to(dtype))
    for name, o, r, p in zip(("out", "grad"), out, ref64, plain):
        assert o.dtype == dtype and o.shape == x.shape, name
        assert_close_to_reference(o, r, p, name)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_matches_trl_formula(shift_mean):
    """TRL's masked_whiten (trl.core, unbiased var), unmasked entries included."""
    x, mask = make_inputs((8, 100), torch.float32, seed=3)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ya = masked_whiten(a, mask, shift_mean)
    yb = trl_masked_whiten(b, mask.float(), shift_mean)
    torch.testing.assert_close(ya, yb)
    go = torch.randn_like(x)
    ya.backward(go)
    yb.backward(go)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    w = ya[mask]
    if shift_mean:
        assert abs(w.mean().item()) < 1e-5 and abs(w.var().item() - 1) < 1e-4


def test_small_masks_are_finite():
    x = torch.tensor([3.0, 5.0, -1.0])
    one = torch.tensor([False, True, False])
    y = masked_whiten(x, one)
    assert torch.isfinite(y).all() and y[1].item() == 0.0  # var 0 for one entry (TRL: NaN)
    none = torch.zeros(3, dtype=torch.bool)
    y0 = masked_whiten(x.clone().requires_grad_(True), none)
    torch.testing.assert_close(y0, x * 1e4)  # mean 0, var 0: x * rsqrt(1e-8)
    torch.testing.assert_close(reference.masked_whiten(x, none), y0.detach())
    xg = x.clone().requires_grad_(True)
    masked_whiten(xg, one).sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_non_contiguous_and_float_mask():
    x, mask = make_inputs((5, 40), torch.float32)
    xt = torch.stack([x, x], -1)[..., 0]
    torch.testing.assert_close(masked_whiten(xt, mask.float()), reference.masked_whiten(x, mask))


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_kind", ["some", "one", "all"])
def test_gradcheck_fp64(shift_mean, mask_kind):
    x, mask = make_inputs((3, 7), torch.float64, seed=1)
    if mask_kind == "one":
        mask = torch.zeros_like(mask)
        mask[1, 2] = True
    elif mask_kind == "all":
        mask = torch.ones_like(mask)
    f = lambda t: masked_whiten(t, mask, shift_mean)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shift in (True, False):
            x, mask = make_inputs((13,), dtype)
            yield (x.requires_grad_(True), mask, shift)
    x, mask = make_inputs((0,), torch.float32)
    yield (x, mask, True)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.masked_whiten.default, args)


def test_opcheck_backward():
    x, mask = make_inputs((11,), torch.float32)
    _, stats = torch.ops.fastpeft.masked_whiten(x, mask, False)
    opcheck(torch.ops.fastpeft.masked_whiten_backward.default,
            (torch.randn(11), x, mask, stats, False))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, mask = make_inputs((4, 33), torch.float32)
    f = lambda t: (masked_whiten(t, mask) ** 2).sum()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_c = torch.compile(f, fullgraph=True)(x1)
    out_e = f(x2)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_reference_backend_matches():
    x, mask = make_inputs((3, 21), torch.float64)
    y = masked_whiten(x, mask, False)
    with use_backend("reference"):
        torch.testing.assert_close(y, masked_whiten(x, mask, False))


BAD_INPUTS = [
    ("mask shape", dict(mask=torch.ones(4, 7, dtype=torch.bool)),
     r"mask must have x's shape \(4, 8\), got \(4, 7\)"),
    ("x int", dict(x=torch.ones(4, 8, dtype=torch.int64)), r"x must have dtype one of .* got torch.int64"),
    ("x list", dict(x=[1.0]), r"x must be a torch.Tensor, got list"),
    ("shift_mean int", dict(shift_mean=1), r"shift_mean must be a bool, got int"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    x, mask = make_inputs((4, 8), torch.float32)
    args = dict(x=x, mask=mask, shift_mean=True)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        masked_whiten(**args)


def test_raw_op_checks_in_cpp():
    x, mask = make_inputs((9,), torch.float32)
    with pytest.raises(RuntimeError, match=r"mask must have dtype bool, got Float"):
        torch.ops.fastpeft.masked_whiten(x, mask.float(), True)
    with pytest.raises(RuntimeError, match=r"stats must have dtype Float, got Double"):
        torch.ops.fastpeft.masked_whiten_backward(x, x, mask, torch.zeros(4, dtype=torch.float64),
                                                  True)
