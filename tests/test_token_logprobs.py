"""token_logprobs (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import reference, token_logprobs, use_backend
from _harness import compare_with_reference, saved_tensors

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, vocab): odd vocabs, one crossing the kernel's 1024-value blocks with a tail,
# V = 1, a single row and an empty batch.
SHAPES = [((37,), 64), ((1,), 577), ((0,), 33), ((2, 3), 1531), ((5,), 2049), ((4,), 1),
          ((3, 2), 7)]
KINDS = ["logp", "entropy", "both"]


def make_inputs(lead, v, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, v, lead, generator=g)
    return logits.requires_grad_(True), tokens


def _fn(impl, kind):
    """The op as one tensor output: logp, entropy, or both stacked on a last dim."""
    def f(logits, tokens, temperature):
        if kind == "logp":
            return impl(logits, tokens, temperature)
        logp, entropy = impl(logits, tokens, temperature, True)
        return entropy if kind == "entropy" else torch.stack([logp, entropy], -1)

    return f


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,v", SHAPES)
def test_matches_reference(lead, v, dtype, temperature, kind):
    logits, tokens = make_inputs(lead, v, dtype)
    shape = (*lead, 2) if kind == "both" else lead
    grad_out = torch.randn(*shape, dtype=torch.float64)
    compare_with_reference(_fn(token_logprobs, kind), _fn(reference.token_logprobs, kind),
                           [logits, tokens], [temperature], grad_out, dtype)


def test_output_dtype_is_the_logits_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits, tokens = make_inputs((3, 4), 50, dtype)
        logp, entropy = token_logprobs(logits, tokens, 1.0, True)
        assert logp.dtype == entropy.dtype == dtype and logp.shape == entropy.shape == (3, 4)


def test_large_and_shifted_logits_are_stable():
    logits, tokens = make_inputs((6,), 3000, torch.float32, scale=40.0)
    logits = (logits.detach() + 1e4).requires_grad_(True)
    grad_out = torch.randn(6, 2, dtype=torch.float64)
    compare_with_reference(_fn(token_logprobs, "both"), _fn(reference.token_logprobs, "both"),
                           [logits, tokens], [1.3], grad_out, torch.float32)


def test_minus_inf_logits_as_masked_vocab():
    """-inf entries (a masked vocab) are probability 0: finite logp and entropy, zero grads."""
    logits, tokens = make_inputs((8,), 2500, torch.float32)
    masked = torch.zeros(8, 2500, dtype=torch.bool)
    masked[:, 1000:2200] = True
    masked[3, :1500] = True  # a row whose first blocks are all -inf
    tokens = torch.where(masked.gather(1, tokens[:, None])[:, 0], 2300, tokens)
    x = logits.detach().masked_fill(masked, float("-inf")).requires_grad_(True)
    logp, entropy = token_logprobs(x, tokens, 0.9, True)
    (logp.sum() + entropy.sum()).backward()
    # the same distribution with a very negative finite value instead of -inf, in fp64
    x64 = logits.detach().double().masked_fill(masked, -1e5).requires_grad_(True)
    lp64, h64 = reference.token_logprobs(x64, tokens, 0.9, True)
    (lp64.sum() + h64.sum()).backward()
    torch.testing.assert_close(logp.double(), lp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), h64, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all() and (x.grad[masked] == 0).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_non_contiguous_logits():
    logits = torch.randn(301, 6).t().requires_grad_(True)  # transposed: not contiguous
    tokens = torch.randint(0, 301, (6,))
    grad_out = torch.randn(6, 2, dtype=torch.float64)
    compare_with_reference(_fn(token_logprobs, "both"), _fn(reference.token_logprobs, "both"),
                           [logits, tokens], [1.0], grad_out, torch.float32)


def test_saves_only_logits_and_per_row_stats():
    logits, tokens = make_inputs((4, 16), 1000, torch.float32)
    saved = saved_tensors(lambda x, t: token_logprobs(x, t, 1.0, True), logits, tokens)
    shapes = sorted(shape for shape, _, _ in saved)
    assert shapes == [(64,), (64, 3), (64, 1000)], shapes
    # the unfused path keeps a [N, V] log-softmax on top of what it reads
    ref_saved = saved_tensors(reference.token_logprobs, logits, tokens)
    ref_big = [s for s, _, ptr in ref_saved if s == (4, 16, 1000)
               and ptr != logits.untyped_storage().data_ptr()]
    assert ref_big, ref_saved


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_gradcheck_fp64(kind, temperature):
    logits, tokens = make_inputs((3, 2), 17, torch.float64)
    f = _fn(token_logprobs, kind)
    assert torch.autograd.gradcheck(lambda x: f(x, tokens, temperature), (logits,))


def test_frozen_logits_get_no_gradient_work():
    logits, tokens = make_inputs((4,), 10, torch.float32)
    out = token_logprobs(logits.detach(), tokens)
    assert not out.requires_grad


def opcheck_samples():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for return_entropy in (False, True):
            logits, tokens = make_inputs((5,), 37, dtype)
            yield (logits, tokens, 0.8, return_entropy)
    logits, tokens = make_inputs((0,), 12, torch.float32)
    yield (logits, tokens, 1.0, True)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.token_logprobs.default, args)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_opcheck_backward(with_entropy):
    logits, tokens = make_inputs((5,), 37, torch.float32)
    logits = logits.detach()
    logp, _, stats = torch.ops.fastpeft.token_logprobs(logits, tokens, 0.8, True)
    ge = torch.randn(5) if with_entropy else None
    opcheck(torch.ops.fastpeft.token_logprobs_backward.default,
            (torch.randn(5), ge, logits, tokens, stats, 0.8))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def loss(logits, tokens):
        logp, entropy = token_logprobs(logits, tokens, 0.9, True)
        return -(logp.mean() + 0.01 * entropy.mean())

    logits, tokens = make_inputs((3, 5), 100, torch.float32)
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(logits, tokens), loss(logits, tokens))
    (g,) = torch.autograd.grad(compiled(logits, tokens), logits)
    (g_eager,) = torch.autograd.grad(loss(logits, tokens), logits)
    torch.testing.assert_close(g, g_eager)


def test_reference_backend_matches():
    logits, tokens = make_inputs((4, 3), 20, torch.float64)
    out = token_logprobs(logits, tokens, 1.5, True)
    with use_backend("reference"):
        ref = token_logprobs(logits, tokens, 1.5, True)
    torch.testing.assert_close(out, ref)


def _bad(**change):
    logits, tokens = make_inputs((2, 3), 10, torch.float32)
    args = dict(logits=logits.detach(), tokens=tokens, temperature=1.0, return_entropy=False)
    args.update(change)
    return args


BAD_INPUTS = [
    ("token too large", dict(tokens=torch.full((2, 3), 10)),
     r"tokens must be in \[0, 10\) \(the vocab of logits\), got 10"),
    ("token negative", dict(tokens=torch.full((2, 3), -100)),
     r"tokens must be in \[0, 10\) \(the vocab of logits\), got -100"),
    ("tokens shape", dict(tokens=torch.zeros(2, 4, dtype=torch.int64)),
     r"tokens must have logits' leading shape \(2, 3\), got \(2, 4\)"),
    ("tokens int32", dict(tokens=torch.zeros(2, 3, dtype=torch.int32)),
     r"tokens must have dtype torch.int64, got torch.int32"),
    ("tokens float", dict(tokens=torch.zeros(2, 3)), r"tokens must have dtype torch.int64"),
    ("logits int", dict(logits=torch.zeros(2, 3, 10, dtype=torch.int64)),
     r"logits must have dtype one of .* got torch.int64"),
    ("logits fp16 on cpu", dict(logits=torch.zeros(2, 3, 10, dtype=torch.float16)),
     r"logits must have dtype one of .* got torch.float16"),
    ("logits 0-d", dict(logits=torch.tensor(1.0)), r"logits must be \[..., vocab\]"),
    ("empty vocab", dict(logits=torch.zeros(2, 3, 0)),
     r"logits must be \[..., vocab\] with vocab >= 1, got shape \(2, 3, 0\)"),
    ("temperature zero", dict(temperature=0.0), r"temperature must be > 0, got 0.0"),
    ("temperature negative", dict(temperature=-1.0), r"temperature must be > 0, got -1.0"),
    ("temperature nan", dict(temperature=float("nan")), r"temperature must be > 0, got nan"),
    ("temperature str", dict(temperature="1"), r"temperature must be a float, got str"),
    ("return_entropy int", dict(return_entropy=1), r"return_entropy must be a bool, got int"),
    ("tokens list", dict(tokens=[[0, 1, 2]]), r"tokens must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        token_logprobs(**_bad(**change))


def test_raw_op_checks_in_cpp():
    logits, tokens = torch.randn(4, 10), torch.randint(0, 10, (4,))
    op = torch.ops.fastpeft.token_logprobs
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, 10\) .*got 12 at position 2"):
        op(logits, torch.tensor([0, 1, 12, 3]), 1.0, False)
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, 10\) .*got -1 at position 0"):
        op(logits, torch.tensor([-1, 1, 2, 3]), 1.0, False)
    with pytest.raises(RuntimeError, match=r"temperature must be > 0, got 0"):
        op(logits, tokens, 0.0, False)
    with pytest.raises(RuntimeError, match=r"tokens must be \[4\] like logits' rows, got \[3\]"):
        op(logits, tokens[:3], 1.0, False)
    with pytest.raises(RuntimeError, match=r"tokens must have dtype int64, got Int"):
        op(logits, tokens.int(), 1.0, False)
    with pytest.raises(RuntimeError, match=r"logits must be 2-D \[N, vocab\], got shape \[2, 2, 10\]"):
        op(logits.view(2, 2, 10), tokens, 1.0, False)
    with pytest.raises(RuntimeError, match=r"supports float32, bfloat16 and float64 logits, got Half"):
        op(logits.half(), tokens, 1.0, False)
    _, _, stats = op(logits, tokens, 1.0, False)
    bwd = torch.ops.fastpeft.token_logprobs_backward
    with pytest.raises(RuntimeError, match=r"stats must be \[4, 3\], got \[4, 1\]"):
        bwd(torch.randn(4), None, logits, tokens, stats[:, :1], 1.0)
    with pytest.raises(RuntimeError, match=r"grad_entropy must be \[4\], got \[5\]"):
        bwd(torch.randn(4), torch.randn(5), logits, tokens, stats, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_logp must have dtype Float like logits, got Double"):
        bwd(torch.randn(4, dtype=torch.float64), None, logits, tokens, stats, 1.0)
