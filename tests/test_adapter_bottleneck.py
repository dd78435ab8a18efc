"""adapter_bottleneck (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import adapter_bottleneck, reference, use_backend
from _harness import compare_with_reference, saved_tensors

DTYPES = [torch.float32, torch.bfloat16]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
# (leading dims, hidden, bottleneck)
SHAPES = [((37,), 64, 4), ((1,), 577, 7), ((0,), 33, 5), ((2, 3), 129, 36), ((300,), 96, 16)]


def make_inputs(lead, d, r, dtype, bias=True, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=True):
        v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return v.requires_grad_(grad)

    h = t(*lead, d)
    w_down = t(r, d, scale=d**-0.5)
    b_down = t(r, scale=0.3) if bias else None
    w_up = t(d, r, scale=r**-0.5)
    b_up = t(d, scale=0.1) if bias else None
    res = t(*lead, d) if residual else None
    return [h, w_down, b_down, w_up, b_up], res


def _fn(impl):
    def f(h, w_down, b_down, w_up, b_up, residual, activation, scaling):
        return impl(h, w_down, b_down, w_up, b_up, activation, scaling, residual)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d,r", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(lead, d, r, dtype, activation):
    tensors, _ = make_inputs(lead, d, r, dtype)
    grad_out = torch.randn(*lead, d, dtype=torch.float64)
    compare_with_reference(_fn(adapter_bottleneck), _fn(reference.adapter_bottleneck),
                           [*tensors, None], [activation, 0.5], grad_out, dtype)


@pytest.mark.parametrize("activation", ["swish", "gelu_new", "GELU"])
@pytest.mark.parametrize("bias", [True, False])
def test_separate_residual_aliases_and_no_bias(activation, bias):
    tensors, res = make_inputs((2, 7), 40, 6, torch.float32, bias=bias, residual=True)
    grad_out = torch.randn(2, 7, 40, dtype=torch.float64)
    compare_with_reference(_fn(adapter_bottleneck), _fn(reference.adapter_bottleneck),
                           [*tensors, res], [activation, 2.0], grad_out, torch.float32)


def test_frozen_inputs_get_no_gradient_work():
    tensors, res = make_inputs((8,), 24, 4, torch.float64, residual=True)
    h = tensors[0].detach()
    w_down, b_down, w_up, b_up = tensors[1:]
    y = adapter_bottleneck(h, w_down, b_down, w_up, b_up, "relu", 1.0, res.detach())
    y.sum().backward()
    assert h.grad is None and w_up.grad is not None and b_down.grad is not None


def test_non_contiguous_h():
    tensors, _ = make_inputs((16,), 48, 8, torch.float32)
    tensors[0] = torch.randn(16, 96)[:, ::2].requires_grad_(True)
    grad_out = torch.randn(16, 48, dtype=torch.float64)
    compare_with_reference(_fn(adapter_bottleneck), _fn(reference.adapter_bottleneck),
                           [*tensors, None], ["silu", 1.0], grad_out, torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saves_only_h_and_the_pre_activation(activation):
    tensors, _ = make_inputs((64,), 96, 8, torch.float32)
    params = {t.untyped_storage().data_ptr() for t in tensors[1:]}
    saved = saved_tensors(adapter_bottleneck, *tensors, activation)
    kept = sorted({ptr: shape for shape, nbytes, ptr in saved if ptr not in params}.values())
    assert kept == [(64, 8), (64, 96)], kept
    # the unfused module keeps act(z) too (relu shares it with its own output)
    ref_saved = saved_tensors(reference.adapter_bottleneck, *tensors, activation)
    ref_kept = {ptr: shape for shape, nbytes, ptr in ref_saved if ptr not in params}
    assert len(ref_kept) >= len(kept)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_fp64(activation, residual):
    tensors, res = make_inputs((6,), 10, 3, torch.float64, residual=residual)
    # keep relu away from its kink at 0
    if activation == "relu":
        with torch.no_grad():
            tensors[2] += 0.05 * torch.sign(tensors[2])

    def f(h, wd, bd, wu, bu, *r):
        return adapter_bottleneck(h, wd, bd, wu, bu, activation, 0.7, r[0] if r else None)

    assert torch.autograd.gradcheck(f, (*tensors, *([res] if residual else [])))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for activation in ACTIVATIONS:
            for bias, residual in ((True, False), (False, True)):
                tensors, res = make_inputs((5,), 12, 3, dtype, bias=bias, residual=residual)
                yield (*tensors, activation, 1.5, res)
    tensors, _ = make_inputs((0,), 12, 3, torch.float32)
    yield (*tensors, "gelu", 1.0, None)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.adapter_bottleneck.default, args)


@pytest.mark.parametrize("residual_is_h", [True, False])
def test_opcheck_backward(residual_is_h):
    tensors, _ = make_inputs((5,), 12, 3, torch.float32)
    h, wd, bd, wu, bu = [t.detach() for t in tensors]
    out, z = torch.ops.fastpeft.adapter_bottleneck(h, wd, bd, wu, bu, "gelu_tanh", 2.0, None)
    for mask in ([True] * 5, [False, True, True, True, True], [True, False, False, False, False]):
        opcheck(torch.ops.fastpeft.adapter_bottleneck_backward.default,
                (torch.randn_like(out), h, wd, wu, z, "gelu_tanh", 2.0, residual_is_h, mask))


class TinyAdapterBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down = torch.nn.Linear(24, 4)
        self.up = torch.nn.Linear(4, 24)

    def forward(self, h):
        out = adapter_bottleneck(h, self.down.weight, self.down.bias, self.up.weight,
                                 self.up.bias, "silu", 1.0)
        return out.pow(2).sum(-1)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyAdapterBlock()
    h = torch.randn(3, 5, 24, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(h), model(h))
    compiled(h).sum().backward()
    assert model.down.weight.grad is not None and h.grad is not None


def test_reference_backend_matches():
    tensors, _ = make_inputs((4, 3), 20, 5, torch.float64)
    y_kernel = adapter_bottleneck(*tensors, "gelu")
    with use_backend("reference"):
        y_ref = adapter_bottleneck(*tensors, "gelu")
    torch.testing.assert_close(y_kernel, y_ref)


def _bad(**change):
    tensors, _ = make_inputs((4,), 8, 2, torch.float32)
    h, wd, bd, wu, bu = [t.detach() for t in tensors]
    args = dict(h=h, w_down=wd, b_down=bd, w_up=wu, b_up=bu, activation="relu", scaling=1.0,
                residual=None)
    args.update(change)
    return args


BAD_INPUTS = [
    ("unknown activation", dict(activation="tanhh"), r"activation must be one of .* got 'tanhh'"),
    ("w_down hidden", dict(w_down=torch.randn(2, 9)), r"w_down must be \[bottleneck, 8\].*got \(2, 9\)"),
    ("w_up shape", dict(w_up=torch.randn(2, 8)), r"w_up must be \[8, 2\] \(hidden, bottleneck\), got \(2, 8\)"),
    ("b_down size", dict(b_down=torch.randn(3)), r"b_down must be \[2\], got \(3,\)"),
    ("b_up size", dict(b_up=torch.randn(2)), r"b_up must be \[8\], got \(2,\)"),
    ("residual shape", dict(residual=torch.randn(4, 7)), r"residual must have h's shape \(4, 8\), got \(4, 7\)"),
    ("w_up dtype", dict(w_up=torch.randn(8, 2, dtype=torch.float64)),
     r"w_up must have dtype torch.float32 like h, got torch.float64"),
    ("h int", dict(h=torch.ones(4, 8, dtype=torch.int64)), r"h must have dtype one of .* got torch.int64"),
    ("scaling str", dict(scaling="1"), r"scaling must be a float, got str"),
    ("w_down 1-D", dict(w_down=torch.randn(8)), r"w_down must be 2-D, got shape \(8,\)"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        adapter_bottleneck(**_bad(**change))


def test_raw_op_checks_in_cpp():
    a = _bad()
    h, wd, bd, wu, bu = a["h"], a["w_down"], a["b_down"], a["w_up"], a["b_up"]
    with pytest.raises(RuntimeError, match=r"activation must be one of relu, gelu, gelu_tanh, silu, got 'swish'"):
        torch.ops.fastpeft.adapter_bottleneck(h, wd, bd, wu, bu, "swish", 1.0, None)
    with pytest.raises(RuntimeError, match=r"w_up must be \[8, 2\]"):
        torch.ops.fastpeft.adapter_bottleneck(h, wd, bd, torch.randn(8, 3), bu, "relu", 1.0, None)
    with pytest.raises(RuntimeError, match=r"residual must be \[4, 8\] like h"):
        torch.ops.fastpeft.adapter_bottleneck(h, wd, bd, wu, bu, "relu", 1.0, torch.randn(3, 8))
