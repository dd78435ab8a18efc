"""linear_token_logprobs (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import linear_token_logprobs, reference, use_backend
from _harness import compare_with_reference, saved_tensors

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, hidden, vocab, chunk_size)
SHAPES = [((37,), 64, 577, None), ((37,), 64, 577, 8), ((1,), 33, 1531, None),
          ((0,), 16, 577, None), ((3, 50), 40, 1531, 64), ((130,), 24, 97, 7)]


def make_inputs(lead, d, v, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * d**-0.5 * 2
    tokens = torch.randint(0, v, lead, generator=g)
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(),
            tokens.to(device))


def _fn(impl):
    def f(hidden, weight, tokens, temperature, chunk_size):
        return impl(hidden, weight, tokens, temperature, chunk_size)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d,v,chunk", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(lead, d, v, chunk, dtype, temperature):
    hidden, weight, tokens = make_inputs(lead, d, v, dtype)
    grad_out = torch.randn(lead, dtype=torch.float64)
    compare_with_reference(_fn(linear_token_logprobs), _fn(reference.linear_token_logprobs),
                           [hidden, weight, tokens], [temperature, chunk], grad_out, dtype)


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    hidden, weight, tokens = make_inputs((23,), 16, 577, torch.float64)
    g = torch.randn(23, dtype=torch.float64)
    base = linear_token_logprobs(hidden, weight, tokens, 1.3, chunk_size=23)
    gb = torch.autograd.grad(base, (hidden, weight), g)
    out = linear_token_logprobs(hidden, weight, tokens, 1.3, chunk_size=chunk)
    torch.testing.assert_close(out, base, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (hidden, weight), g), gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_fp64_matches_log_softmax_gather_closely():
    hidden, weight, tokens = make_inputs((4, 6), 12, 1531, torch.float64)
    out = linear_token_logprobs(hidden, weight, tokens, 0.8, chunk_size=5)
    ref = torch.log_softmax(hidden @ weight.T / 0.8, -1).gather(-1, tokens[..., None])[..., 0]
    assert out.shape == (4, 6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_frozen_weight_and_no_grad():
    hidden, weight, tokens = make_inputs((8,), 12, 97, torch.float64)
    w = weight.detach()
    out = linear_token_logprobs(hidden, w, tokens)
    g = torch.randn(8, dtype=torch.float64)
    (gh,) = torch.autograd.grad(out, (hidden,), g)
    (gr,) = torch.autograd.grad(reference.linear_token_logprobs(hidden, w, tokens), (hidden,), g)
    torch.testing.assert_close(gh, gr)
    with torch.no_grad():
        assert linear_token_logprobs(hidden, weight, tokens).grad_fn is None


def test_saves_no_logits():
    hidden, weight, tokens = make_inputs((64,), 32, 1531, torch.float32)
    params = {t.untyped_storage().data_ptr() for t in (hidden, weight, tokens)}
    saved = saved_tensors(linear_token_logprobs, hidden, weight, tokens)
    kept = [s for s, _, ptr in saved if ptr not in params]
    assert kept == [(64,)], saved  # the per-row log-sum-exp only


def test_gradcheck_fp64():
    hidden, weight, tokens = make_inputs((7,), 5, 13, torch.float64, seed=3)

    def f(h, w):
        return linear_token_logprobs(h, w, tokens, 0.9, chunk_size=3)

    assert torch.autograd.gradcheck(f, (hidden, weight))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for chunk in (None, 3):
            h, w, tok = make_inputs((7,), 6, 31, dtype)
            yield (h, w, tok, 0.8, chunk)
    h, w, tok = make_inputs((0,), 6, 31, torch.float32)
    yield (h, w, tok, 1.0, None)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.linear_token_logprobs.default, args)


def test_opcheck_backward():
    h, w, tok = make_inputs((7,), 6, 31, torch.float32)
    h, w = h.detach(), w.detach()
    _, lse = torch.ops.fastpeft.linear_token_logprobs(h, w, tok, 1.0, 2)
    for mask in ([True, True], [True, False], [False, True]):
        opcheck(torch.ops.fastpeft.linear_token_logprobs_backward.default,
                (torch.randn(7), h, w, tok, lse, 1.0, 2, mask))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    proj = torch.nn.Linear(16, 16)
    head = torch.nn.Linear(16, 97, bias=False)

    def f(x, tokens):
        return linear_token_logprobs(torch.tanh(proj(x)), head.weight, tokens, 0.9, 5).sum()

    x = torch.randn(3, 7, 16)
    tokens = torch.randint(0, 97, (3, 7))
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, tokens), f(x, tokens))
    compiled(x, tokens).backward()
    g = head.weight.grad.clone()
    head.weight.grad = None
    f(x, tokens).backward()
    torch.testing.assert_close(g, head.weight.grad)


def test_reference_backend_matches():
    hidden, weight, tokens = make_inputs((4, 3), 20, 577, torch.float64)
    y = linear_token_logprobs(hidden, weight, tokens)
    with use_backend("reference"):
        y_ref = linear_token_logprobs(hidden, weight, tokens)
    torch.testing.assert_close(y, y_ref)


def _bad(**change):
    h, w, tok = make_inputs((4,), 8, 11, torch.float32)
    args = dict(hidden=h.detach(), weight=w.detach(), tokens=tok, temperature=1.0,
                chunk_size=None)
    args.update(change)
    return args


BAD_INPUTS = [
    ("weight hidden", dict(weight=torch.randn(11, 9)), r"weight must be \[vocab > 0, 8\].*got \(11, 9\)"),
    ("weight dtype", dict(weight=torch.randn(11, 8, dtype=torch.bfloat16)),
     r"weight must have dtype torch.float32 like hidden, got torch.bfloat16"),
    ("hidden int", dict(hidden=torch.ones(4, 8, dtype=torch.int32)), r"hidden must have dtype one of .* got torch.int32"),
    ("tokens dtype", dict(tokens=torch.zeros(4, dtype=torch.int32)), r"tokens must have dtype torch.int64, got torch.int32"),
    ("tokens shape", dict(tokens=torch.zeros(2, 2, dtype=torch.int64)), r"tokens must have hidden's leading shape \(4,\), got \(2, 2\)"),
    ("tokens too big", dict(tokens=torch.tensor([0, 1, 11, 3])), r"tokens must be in \[0, 11\), got 11"),
    ("tokens -100", dict(tokens=torch.tensor([0, -100, 1, 3])), r"tokens must be in \[0, 11\), got -100"),
    ("temperature zero", dict(temperature=0.0), r"temperature must be a float > 0, got 0.0"),
    ("temperature str", dict(temperature="1"), r"temperature must be a float > 0, got '1'"),
    ("chunk negative", dict(chunk_size=-4), r"chunk_size must be a positive int or None, got -4"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        linear_token_logprobs(**_bad(**change))


def test_raw_op_checks_in_cpp():
    a = _bad()
    h, w, tok = a["hidden"], a["weight"], a["tokens"]
    op = torch.ops.fastpeft.linear_token_logprobs
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, 11\), got -1"):
        op(h, w, torch.tensor([0, -1, 1, 1]), 1.0, None)
    with pytest.raises(RuntimeError, match=r"temperature must be > 0, got -1"):
        op(h, w, tok, -1.0, None)
    with pytest.raises(RuntimeError, match=r"tokens must have dtype torch.int64"):
        op(h, w, tok.int(), 1.0, None)
    _, lse = op(h, w, tok, 1.0, None)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[4\], got \[3\]"):
        torch.ops.fastpeft.linear_token_logprobs_backward(torch.ones(3), h, w, tok, lse, 1.0,
                                                          None, [True, True])
