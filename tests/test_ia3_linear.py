"""ia3_linear (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import ia3_linear, reference, use_backend
from _harness import compare_with_reference, run, saved_tensors

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, in, out): odd sizes on purpose; M = 1 and M = 0.
SHAPES = [((37,), 64, 48), ((1,), 577, 1531), ((0,), 33, 17), ((2, 3), 577, 129), ((300,), 129, 577)]


def make_inputs(lead, k, n, dtype, scale_input, bias=True, train_weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, shift=0.0, grad=False):
        v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        return v.requires_grad_(grad)

    x = t(*lead, k, grad=True)
    w = t(n, k, scale=k**-0.5, grad=train_weight)
    b = t(n, scale=0.1, grad=train_weight) if bias else None
    l = t(k if scale_input else n, scale=0.3, shift=1.0, grad=True)
    return x, w, b, l


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_reference(lead, k, n, dtype, scale_input, train_weight):
    tensors = make_inputs(lead, k, n, dtype, scale_input, train_weight=train_weight)
    grad_out = torch.randn(*lead, n, dtype=torch.float64)
    compare_with_reference(ia3_linear, reference.ia3_linear, tensors, [scale_input], grad_out, dtype)


@pytest.mark.parametrize("scale_input", [True, False])
def test_without_bias_and_with_frozen_scale(scale_input):
    x, w, _, l = make_inputs((9,), 31, 12, torch.float32, scale_input, bias=False)
    grad_out = torch.randn(9, 12, dtype=torch.float64)
    compare_with_reference(ia3_linear, reference.ia3_linear, [x, w, None, l], [scale_input],
                           grad_out, torch.float32)
    compare_with_reference(ia3_linear, reference.ia3_linear, [x, w, None, l.detach()],
                           [scale_input], grad_out, torch.float32)


@pytest.mark.parametrize("scale_input", [True, False])
def test_peft_parameter_shapes_get_gradients_in_their_shape(scale_input):
    # peft keeps ia3_l as [1, in] (feed-forward) or [out, 1] (k, v).
    x, w, b, l = make_inputs((5, 4), 24, 16, torch.float64, scale_input)
    l2 = l.detach().reshape((1, -1) if scale_input else (-1, 1)).requires_grad_(True)
    grad_out = torch.randn(5, 4, 16, dtype=torch.float64)
    y, grads = run(ia3_linear, [x, w, b, l2], [scale_input], grad_out)
    y_ref, grads_ref = run(reference.ia3_linear, [x, w, b, l2], [scale_input], grad_out)
    torch.testing.assert_close(y, y_ref)
    assert grads[1].shape == l2.shape
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("special", [0.0, 1e-30])
def test_output_scaling_with_zero_or_tiny_scale(special):
    # A frozen W on the CPU keeps y and divides by l, unless an l is 0 or tiny: then x is kept.
    x, w, b, l = make_inputs((40,), 24, 16, torch.float64, False)
    l = l.detach().clone()
    l[3] = special
    l.requires_grad_(True)
    grad_out = torch.randn(40, 16, dtype=torch.float64)
    y, grads = run(ia3_linear, [x, w, b, l], [False], grad_out)
    y_ref, grads_ref = run(reference.ia3_linear, [x, w, b, l], [False], grad_out)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)
    assert grads[1][3] != 0  # l[3]'s gradient still sees x W^T + b


def test_non_contiguous_x():
    x, w, b, l = make_inputs((16,), 48, 20, torch.float32, True)
    wide = torch.randn(16, 96)[:, ::2].requires_grad_(True)
    grad_out = torch.randn(16, 20, dtype=torch.float64)
    for scale_input in (True, False):
        l = make_inputs((16,), 48, 20, torch.float32, scale_input)[3]
        compare_with_reference(ia3_linear, reference.ia3_linear, [wide, w, b, l], [scale_input],
                               grad_out, torch.float32)


def _saved_activation_bytes(scale_input, train_weight):
    x, w, b, l = make_inputs((64,), 96, 32, torch.float32, scale_input, train_weight=train_weight)
    params = {p.untyped_storage().data_ptr() for p in (w, b, l)}
    saved = saved_tensors(ia3_linear, x, w, b, l, scale_input)
    return {ptr: (shape, nbytes) for shape, nbytes, ptr in saved if ptr not in params}, x


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("train_weight", [False, True])
def test_saves_no_scaled_copy_of_x(scale_input, train_weight):
    saved, x = _saved_activation_bytes(scale_input, train_weight)
    kept = [shape for shape, nbytes in saved.values() if nbytes > 0]
    if scale_input or train_weight:
        # x itself (its own storage), nothing the size of x besides it.
        assert kept == [tuple(x.shape)], kept
        assert x.untyped_storage().data_ptr() in saved
    else:
        # (x W^T + b) * l with a frozen W: the unscaled [M, out] output replaces x.
        assert kept == [(64, 32)], kept


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("train_weight", [False, True])
def test_gradcheck_fp64(scale_input, train_weight):
    x, w, b, l = make_inputs((6,), 10, 7, torch.float64, scale_input, train_weight=train_weight)
    assert torch.autograd.gradcheck(lambda *a: ia3_linear(*a, scale_input), (x, w, b, l))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for scale_input in (True, False):
            for keep in (True, False):
                for bias in (True, False):
                    x, w, b, l = make_inputs((5,), 12, 9, dtype, scale_input, bias=bias,
                                             train_weight=True)
                    yield (x, w, b, l, scale_input, keep)
    x, w, b, l = make_inputs((0,), 12, 9, torch.float32, False)
    yield (x, w, b, l, False, True)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.ia3_linear.default, args)


@pytest.mark.parametrize("scale_input", [True, False])
def test_opcheck_backward(scale_input):
    x, w, b, l = [t.detach() if t is not None else None
                  for t in make_inputs((5,), 12, 9, torch.float32, scale_input)]
    keep = not scale_input
    y, unscaled = torch.ops.fastpeft.ia3_linear(x, w, b, l, scale_input, keep)
    g = torch.randn_like(y)
    empty = x.new_empty(0)
    cases = [(x, unscaled, [True] * 4), (x, unscaled, [True, False, False, True]),
             (empty, unscaled, [True, False, True, False])]
    if not scale_input:
        cases.append((empty, unscaled, [True, False, True, True]))  # grad_scale from unscaled
        cases.append((x, empty, [False, True, True, True]))  # grad_scale from g^T x
    for xx, un, mask in cases:
        opcheck(torch.ops.fastpeft.ia3_linear_backward.default,
                (g, xx, w, b, l, un, scale_input, mask))


class TinyIA3(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(24, 32)
        self.base.requires_grad_(False)
        self.l_in = torch.nn.Parameter(torch.rand(24) + 0.5)
        self.l_out = torch.nn.Parameter(torch.rand(32) + 0.5)

    def forward(self, x):
        h = ia3_linear(x, self.base.weight, self.base.bias, self.l_in, True)
        h = ia3_linear(x, self.base.weight, self.base.bias, self.l_out, False) + h
        return torch.nn.functional.gelu(h).sum(-1)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyIA3()
    x = torch.randn(3, 5, 24, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model.l_in.grad is not None and model.l_out.grad is not None and x.grad is not None


def test_reference_backend_matches():
    x, w, b, l = make_inputs((4, 3), 20, 10, torch.float64, False)
    y_kernel = ia3_linear(x, w, b, l, False)
    with use_backend("reference"):
        y_ref = ia3_linear(x, w, b, l, False)
    torch.testing.assert_close(y_kernel, y_ref)


def _bad(**change):
    x, w, b, l = [t.detach() for t in make_inputs((4,), 8, 6, torch.float32, True)]
    args = dict(x=x, weight=w, bias=b, scale=l, scale_input=True)
    args.update(change)
    return args


BAD_INPUTS = [
    ("weight in != x", dict(weight=torch.randn(6, 9)), r"weight must be \[out_features, 8\].*got \(6, 9\)"),
    ("scale size (input)", dict(scale=torch.randn(6)),
     r"scale must hold 8 values \(in_features, scale_input=True\).*got shape \(6,\)"),
    ("scale size (output)", dict(scale=torch.randn(8), scale_input=False),
     r"scale must hold 6 values \(out_features, scale_input=False\).*got shape \(8,\)"),
    ("scale 2-D full", dict(scale=torch.randn(2, 4)), r"scale must hold 8 values .*got shape \(2, 4\)"),
    ("scale dtype", dict(scale=torch.randn(8, dtype=torch.float64)),
     r"scale must have dtype torch.float32 like x, got torch.float64"),
    ("scale device", dict(scale=torch.randn(8, device="meta")), r"scale must be on cpu like x, got meta"),
    ("bias size", dict(bias=torch.randn(5)), r"bias must be \[6\].*got \(5,\)"),
    ("x int", dict(x=torch.ones(4, 8, dtype=torch.int64)), r"x must have dtype one of .* got torch.int64"),
    ("scale_input not bool", dict(scale_input=1), r"scale_input must be a bool, got int"),
    ("scale not a tensor", dict(scale=[1.0] * 8), r"scale must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        ia3_linear(**_bad(**change))


def test_raw_op_checks_in_cpp():
    a = _bad()
    x, w, b, l = a["x"], a["weight"], a["bias"], a["scale"]
    with pytest.raises(RuntimeError, match=r"scale must be \[6\] \(out_features, scale_input=False\)"):
        torch.ops.fastpeft.ia3_linear(x, w, b, l, False, False)
    with pytest.raises(RuntimeError, match=r"weight must be \[out_features, 8\]"):
        torch.ops.fastpeft.ia3_linear(x, torch.randn(6, 5), b, l, True, False)
    y, _ = torch.ops.fastpeft.ia3_linear(x, w, b, l, True, False)
    with pytest.raises(RuntimeError, match=r"x must be \[4, 8\] \(it is needed"):
        torch.ops.fastpeft.ia3_linear_backward(y, x.new_empty(0), w, b, l, x.new_empty(0), True,
                                               [True, False, False, True])
