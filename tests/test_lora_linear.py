"""lora_linear (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import lora_linear, reference, use_backend
from _tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, in, out, r): odd sizes on purpose; M = 1 and M = 0.
SHAPES = [((37,), 64, 48, 16), ((1,), 577, 1531, 7), ((0,), 33, 17, 5), ((2, 3), 577, 129, 7),
          ((1000,), 577, 300, 7)]  # the last: many row blocks per thread, many mask runs


def make_inputs(lead, k, n, r, dtype, bias=True, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=False):
        v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return v.requires_grad_(grad and requires_grad)

    x = t(*lead, k, grad=True)
    w = t(n, k, scale=k**-0.5)
    b = t(n, scale=0.1) if bias else None
    a = t(r, k, scale=k**-0.5, grad=True)
    bb = t(n, r, scale=0.5, grad=True)
    return x, w, b, a, bb


def run(fn, inputs, grad_out):
    """Output and gradients (x, lora_a, lora_b, and weight / bias if they require grad)."""
    inputs = [i.detach().clone().requires_grad_(i.requires_grad) if i is not None else None
              for i in inputs]
    y = fn(*inputs)
    leaves = [i for i in inputs if i is not None and i.requires_grad]
    grads = torch.autograd.grad(y, leaves, grad_out) if y.numel() or leaves else []
    return y.detach(), [g.detach() for g in grads]


def compare(inputs, dtype, scaling, p, seed_value):
    """Kernel vs fp64 reference vs plain PyTorch in dtype, forward and backward, same mask."""
    x = inputs[0]
    grad_out = torch.randn(*x.shape[:-1], inputs[1].shape[0], dtype=torch.float64)

    def kernel(*a):
        torch.manual_seed(seed_value)
        return lora_linear(*a, scaling, p)

    torch.manual_seed(seed_value)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64)) if p > 0 else 0

    def ref(*a):
        return reference.lora_linear(*a, scaling, p, True, seed)

    out = run(kernel, inputs, grad_out.to(dtype))
    ref64 = run(ref, [i.double() if i is not None else None for i in inputs], grad_out)
    plain = run(ref, inputs, grad_out.to(dtype))
    assert out[0].dtype == dtype and out[0].shape == ref64[0].shape
    assert_close_to_reference(out[0], ref64[0], plain[0], "y")
    for i, (go, gr, gp) in enumerate(zip(out[1], ref64[1], plain[1])):
        assert_close_to_reference(go, gr, gp, f"grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_matches_reference(lead, k, n, r, dtype, p):
    compare(make_inputs(lead, k, n, r, dtype), dtype, scaling=2.0, p=p, seed_value=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_and_bias_gradients_when_they_require_grad(dtype):
    x, w, b, a, bb = make_inputs((19,), 40, 24, 4, dtype)
    w.requires_grad_(True)
    b.requires_grad_(True)
    compare([x, w, b, a, bb], dtype, scaling=0.5, p=0.2, seed_value=5)


def test_without_bias():
    compare(make_inputs((9,), 31, 12, 3, torch.float32, bias=False), torch.float32, 1.5, 0.3, 1)


def test_non_contiguous_x():
    x, w, b, a, bb = make_inputs((16,), 48, 20, 4, torch.float32)
    wide = torch.randn(16, 96, dtype=torch.float32)[:, ::2]  # stride 2 in the last dim
    assert not wide.is_contiguous()
    wide.requires_grad_(True)
    compare([wide, w, b, a, bb], torch.float32, 2.0, 0.1, 2)
    xt = torch.randn(48, 16).t().requires_grad_(True)  # transposed
    compare([xt, w, b, a, bb], torch.float32, 2.0, 0.0, 2)


def test_eval_mode_has_no_dropout():
    x, w, b, a, bb = make_inputs((8,), 16, 8, 2, torch.float32, requires_grad=False)
    y_eval = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False)
    torch.testing.assert_close(y_eval, reference.lora_linear(x, w, b, a, bb, 2.0))


def test_same_seed_same_output_and_gradients():
    inputs = make_inputs((64,), 96, 32, 8, torch.float32)
    grad_out = torch.randn(64, 32)

    def once(seed):
        torch.manual_seed(seed)
        return run(lambda *i: lora_linear(*i, 2.0, 0.3), inputs, grad_out)

    y1, g1 = once(7)
    y2, g2 = once(7)
    y3, g3 = once(8)
    assert torch.equal(y1, y2) and all(torch.equal(u, v) for u, v in zip(g1, g2))
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_kernel_mask_rate_is_close_to_p(p):
    # With W = 0, A = B = I and scaling 1, y = dropout(x): count the dropped elements.
    k, m = 256, 512
    x = torch.ones(m, k)
    eye = torch.eye(k)
    y = lora_linear(x, torch.zeros(k, k), None, eye, eye, 1.0, dropout_p=p)
    dropped = (y == 0).double().mean().item()
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / (1.0 - p)))
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma, (dropped, p)


def test_reference_mask_is_uniform_and_seed_dependent():
    words = reference.philox4x32(torch.arange(1 << 14), 12345).reshape(-1)
    assert words.min() >= 0 and words.max() < 2**32
    hist = torch.histc(words.double(), bins=16, min=0, max=2**32)
    expected = words.numel() / 16
    assert ((hist - expected).abs() < 5 * expected**0.5).all(), hist
    m1 = reference.philox_keep_mask(1, (100, 50), 0.3)
    m2 = reference.philox_keep_mask(2, (100, 50), 0.3)
    assert not torch.equal(m1, m2)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_fp64(p):
    x, w, b, a, bb = make_inputs((6,), 10, 7, 3, torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    seed = torch.tensor([1234], dtype=torch.int64)

    def f(x, w, b, a, bb):
        return torch.ops.fastpeft.lora_linear(x, w, b, a, bb, 1.5, p, seed)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))


def opcheck_samples():
    seed = torch.tensor([99], dtype=torch.int64)
    for dtype in (torch.float32, torch.float64):
        for p in (0.0, 0.2):
            for bias in (True, False):
                x, w, b, a, bb = make_inputs((5,), 12, 9, 3, dtype, bias=bias)
                yield (x, w, b, a, bb, 2.0, p, seed)
    x, w, b, a, bb = make_inputs((0,), 12, 9, 3, torch.float32)
    yield (x, w, b, a, bb, 2.0, 0.1, seed)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.lora_linear.default, args)


def test_opcheck_backward():
    x, w, b, a, bb = make_inputs((5,), 12, 9, 3, torch.float32, requires_grad=False)
    y, t = torch.ops.fastpeft.lora_linear(x, w, b, a, bb, 2.0, 0.2, torch.tensor([4]))
    for mask in ([True] * 5, [False, False, False, True, True], [True, False, False, True, True]):
        opcheck(torch.ops.fastpeft.lora_linear_backward.default,
                (torch.randn_like(y), x, w, a, bb, t, 2.0, 0.2, torch.tensor([4]), mask))


class TinyLoraMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(24, 32)
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(4, 24) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(32, 4) * 0.1)

    def forward(self, x):
        h = lora_linear(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, 2.0, 0.1,
                        self.training)
        return torch.nn.functional.gelu(h).sum(-1)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyLoraMLP().eval()
    x = torch.randn(3, 5, 24)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    model.train()
    out = compiled(x.requires_grad_(True))
    out.sum().backward()
    assert model.lora_a.grad is not None and x.grad is not None
    # Dropout stays seeded from torch's generator under compile: same seed, same output.
    torch.manual_seed(1)
    y1 = compiled(x)
    torch.manual_seed(1)
    y2 = compiled(x)
    torch.testing.assert_close(y1, y2)


def test_reference_backend_matches():
    x, w, b, a, bb = make_inputs((4, 3), 20, 10, 2, torch.float64, requires_grad=False)
    torch.manual_seed(11)
    y_kernel = lora_linear(x, w, b, a, bb, 2.0, 0.3)
    with use_backend("reference"):
        torch.manual_seed(11)
        y_ref = lora_linear(x, w, b, a, bb, 2.0, 0.3)
    torch.testing.assert_close(y_kernel, y_ref)


def _good():
    return make_inputs((4,), 8, 6, 2, torch.float32, requires_grad=False)


def _bad(**change):
    x, w, b, a, bb = _good()
    args = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scaling=2.0, dropout_p=0.1)
    args.update(change)
    return args


BAD_INPUTS = [
    ("weight in != x", dict(weight=torch.randn(6, 9)), r"weight must be \[out_features, 8\].*got \(6, 9\)"),
    ("lora_a in != x", dict(lora_a=torch.randn(2, 7)), r"lora_a must be \[r, 8\].*got \(2, 7\)"),
    ("lora_b rank", dict(lora_b=torch.randn(6, 3)), r"lora_b must be \[6, 2\].*got \(6, 3\)"),
    ("lora_b out", dict(lora_b=torch.randn(5, 2)), r"lora_b must be \[6, 2\].*got \(5, 2\)"),
    ("bias size", dict(bias=torch.randn(5)), r"bias must be \[6\].*got \(5,\)"),
    ("bias 2-D", dict(bias=torch.randn(6, 1)), r"bias must be 1-D, got shape \(6, 1\)"),
    ("mixed dtype", dict(weight=torch.randn(6, 8, dtype=torch.float64)),
     r"weight must have dtype torch.float32 like x, got torch.float64"),
    ("mixed dtype A", dict(lora_a=torch.randn(2, 8, dtype=torch.bfloat16)),
     r"lora_a must have dtype torch.float32 like x, got torch.bfloat16"),
    ("mixed device", dict(lora_b=torch.randn(6, 2, device="meta")),
     r"lora_b must be on cpu like x, got meta"),
    ("p negative", dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\), got -0.1"),
    ("p one", dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1.0"),
    ("x int", dict(x=torch.ones(4, 8, dtype=torch.int64)), r"x must have dtype one of .* got torch.int64"),
    ("x not a tensor", dict(x=[[1.0] * 8]), r"x must be a torch.Tensor, got list"),
    ("scaling tensor", dict(scaling="2"), r"scaling must be a float, got str"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        lora_linear(**_bad(**change))


def test_raw_op_checks_in_cpp():
    x, w, b, a, bb = _good()
    seed = torch.tensor([1])
    with pytest.raises(RuntimeError, match=r"lora_a must be \[r, 8\]"):
        torch.ops.fastpeft.lora_linear(x, w, b, torch.randn(2, 5), bb, 1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        torch.ops.fastpeft.lora_linear(x, w, b, a, bb, 1.0, 1.5, seed)
    with pytest.raises(RuntimeError, match=r"bias must be \[6\]"):
        torch.ops.fastpeft.lora_linear(x, w, torch.randn(3), a, bb, 1.0, 0.0, seed)
