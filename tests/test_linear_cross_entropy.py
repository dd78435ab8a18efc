"""linear_cross_entropy (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastpeft.ops import linear_cross_entropy, reference, use_backend
from _harness import compare_with_reference, saved_tensors

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, hidden, vocab, chunk_size)
SHAPES = [((37,), 64, 577, None), ((37,), 64, 577, 8), ((1,), 33, 1531, None),
          ((0,), 16, 577, None), ((3, 50), 40, 1531, 64), ((130,), 24, 97, 7)]


def make_inputs(lead, d, v, dtype, ignore_frac=0.2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * d**-0.5 * 2
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    return (hidden.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(),
            labels.to(device))


def _fn(impl):
    def f(hidden, weight, labels, ignore_index, chunk_size):
        return impl(hidden, weight, labels, ignore_index, chunk_size)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d,v,chunk", SHAPES)
def test_matches_reference(lead, d, v, chunk, dtype):
    hidden, weight, labels = make_inputs(lead, d, v, dtype)
    compare_with_reference(_fn(linear_cross_entropy), _fn(reference.linear_cross_entropy),
                           [hidden, weight, labels], [-100, chunk],
                           torch.tensor(1.7, dtype=torch.float64), dtype)


def test_matches_f_cross_entropy_and_fp64_exactly():
    hidden, weight, labels = make_inputs((5, 9), 12, 577, torch.float64)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 577), labels.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    gk = torch.autograd.grad(loss, (hidden, weight))
    gr = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    hidden, weight, labels = make_inputs((23,), 16, 577, torch.float64)
    base = linear_cross_entropy(hidden, weight, labels, chunk_size=23)
    gb = torch.autograd.grad(base, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    torch.testing.assert_close(loss, base, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (hidden, weight)), gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("lead", [(6,), (0,)])
def test_all_ignored_is_zero_with_zero_grads(lead):
    hidden, weight, labels = make_inputs(lead, 8, 577, torch.float32, ignore_frac=1.0)
    assert (labels == -100).all()
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.shape == () and loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert torch.equal(gh, torch.zeros_like(hidden)) and torch.equal(gw, torch.zeros_like(weight))


def test_custom_ignore_index_and_grad_scaling():
    hidden, weight, labels = make_inputs((40,), 10, 97, torch.float64, ignore_frac=0.0)
    labels[::3] = 5  # ignore a real token id
    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=5, chunk_size=6)
    ref = reference.linear_cross_entropy(hidden, weight, labels, ignore_index=5)
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(3.5 * loss, (hidden, weight))
    gr = torch.autograd.grad(3.5 * ref, (hidden, weight))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, labels = make_inputs((8,), 12, 97, torch.float64)
    w = weight.detach()
    loss = linear_cross_entropy(hidden, w, labels)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    torch.testing.assert_close(gh, torch.autograd.grad(
        reference.linear_cross_entropy(hidden, w, labels), (hidden,))[0])
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, labels).grad_fn is None


def test_saves_no_logits():
    hidden, weight, labels = make_inputs((64,), 32, 1531, torch.float32)
    saved = saved_tensors(linear_cross_entropy, hidden, weight, labels)
    # only the gradients of hidden [64, 32] and weight [1531, 32], never [64, 1531] logits
    assert sorted(s for s, _, _ in saved) == [(64, 32), (1531, 32)], saved
    ref = saved_tensors(reference.linear_cross_entropy, hidden, weight, labels)
    assert any(s == (64, 1531) for s, _, _ in ref)


def test_non_contiguous_inputs():
    hidden, weight, labels = make_inputs((16,), 48, 97, torch.float32)
    h = torch.randn(16, 96)[:, ::2].requires_grad_()
    wt = torch.randn(48, 97).T.requires_grad_()
    lab = torch.randint(0, 97, (32,))[::2]
    compare_with_reference(_fn(linear_cross_entropy), _fn(reference.linear_cross_entropy),
                           [h, wt, lab], [-100, 5], torch.tensor(1.0, dtype=torch.float64),
                           torch.float32)


def test_gradcheck_fp64():
    hidden, weight, labels = make_inputs((7,), 5, 13, torch.float64, ignore_frac=0.3, seed=3)
    labels[0] = 2

    def f(h, w):
        return linear_cross_entropy(h, w, labels, chunk_size=3)

    assert torch.autograd.gradcheck(f, (hidden, weight))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for chunk in (None, 3):
            for mask in ([True, True], [True, False], [False, True], [False, False]):
                h, w, lab = make_inputs((7,), 6, 31, dtype)
                # the mask is what the wrapper derives from requires_grad
                yield (h.requires_grad_(mask[0]), w.requires_grad_(mask[1]), lab, -100, chunk,
                       mask)
    h, w, lab = make_inputs((0,), 6, 31, torch.float32)
    yield (h, w, lab, -100, None, [True, True])


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.linear_cross_entropy.default, args)


def test_opcheck_backward():
    h, w, lab = make_inputs((7,), 6, 31, torch.float32)
    _, gh, gw = torch.ops.fastpeft.linear_cross_entropy(h.detach(), w.detach(), lab, -100, 2,
                                                        [True, True])
    for mask in ([True, True], [True, False], [False, True]):
        opcheck(torch.ops.fastpeft.linear_cross_entropy_backward.default,
                (torch.tensor(0.3), gh, gw, mask))


class TinyHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 97, bias=False)

    def forward(self, x, labels):
        return linear_cross_entropy(torch.tanh(self.proj(x)), self.lm_head.weight, labels,
                                    chunk_size=5)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyHead()
    x = torch.randn(3, 7, 16)
    labels = torch.randint(0, 97, (3, 7))
    labels[0, :2] = -100
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, labels), model(x, labels))
    compiled(x, labels).backward()
    assert model.lm_head.weight.grad is not None and model.proj.weight.grad is not None
    g = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model(x, labels).backward()
    torch.testing.assert_close(g, model.lm_head.weight.grad)


def test_reference_backend_matches():
    hidden, weight, labels = make_inputs((4, 3), 20, 577, torch.float64)
    y = linear_cross_entropy(hidden, weight, labels)
    with use_backend("reference"):
        y_ref = linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(y, y_ref)


def _bad(**change):
    h, w, lab = make_inputs((4,), 8, 11, torch.float32)
    args = dict(hidden=h.detach(), weight=w.detach(), labels=lab, ignore_index=-100,
                chunk_size=None)
    args.update(change)
    return args


BAD_INPUTS = [
    ("weight hidden", dict(weight=torch.randn(11, 9)), r"weight must be \[vocab > 0, 8\].*got \(11, 9\)"),
    ("weight 1-D", dict(weight=torch.randn(8)), r"weight must be 2-D, got shape \(8,\)"),
    ("weight empty vocab", dict(weight=torch.randn(0, 8)), r"weight must be \[vocab > 0, 8\].*got \(0, 8\)"),
    ("weight dtype", dict(weight=torch.randn(11, 8, dtype=torch.float64)),
     r"weight must have dtype torch.float32 like hidden, got torch.float64"),
    ("hidden int", dict(hidden=torch.ones(4, 8, dtype=torch.int64)), r"hidden must have dtype one of .* got torch.int64"),
    ("hidden 0-D", dict(hidden=torch.tensor(1.0)), r"hidden must have at least 1 dim"),
    ("labels dtype", dict(labels=torch.zeros(4, dtype=torch.int32)), r"labels must have dtype torch.int64, got torch.int32"),
    ("labels shape", dict(labels=torch.zeros(5, dtype=torch.int64)), r"labels must have hidden's leading shape \(4,\), got \(5,\)"),
    ("labels too big", dict(labels=torch.tensor([0, 11, 2, 3])), r"labels must be in \[0, 11\) or ignore_index \(-100\), got 11"),
    ("labels negative", dict(labels=torch.tensor([0, -1, 2, 3])), r"labels must be in \[0, 11\) or ignore_index \(-100\), got -1"),
    ("labels float", dict(labels=torch.zeros(4)), r"labels must have dtype torch.int64, got torch.float32"),
    ("chunk zero", dict(chunk_size=0), r"chunk_size must be a positive int or None, got 0"),
    ("chunk float", dict(chunk_size=2.0), r"chunk_size must be a positive int or None, got 2.0"),
    ("ignore_index str", dict(ignore_index="-100"), r"ignore_index must be an int, got str"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**_bad(**change))


def test_raw_op_checks_in_cpp():
    a = _bad()
    h, w, lab = a["hidden"], a["weight"], a["labels"]
    op = torch.ops.fastpeft.linear_cross_entropy
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 11\) or ignore_index \(-100\), got 12"):
        op(h, w, torch.tensor([0, 12, 1, 1]), -100, None, [False, False])
    with pytest.raises(RuntimeError, match=r"weight must be \[vocab, 8\] to match"):
        op(h, torch.randn(11, 7), lab, -100, None, [False, False])
    with pytest.raises(RuntimeError, match=r"labels must be \[4\] \(one per row of hidden\)"):
        op(h, w, lab[:3], -100, None, [False, False])
    with pytest.raises(RuntimeError, match=r"chunk_size must be positive, got -2"):
        op(h, w, lab, -100, -2, [False, False])
    with pytest.raises(RuntimeError, match=r"grad_hidden must be the 2-D gradient"):
        _, gh, gw = op(h, w, lab, -100, None, [False, True])
        torch.ops.fastpeft.linear_cross_entropy_backward(torch.tensor(1.0), gh, gw, [True, True])


def test_backward_twice_with_retain_graph():
    # the forward's gradients are scaled into new tensors, so the graph can be replayed
    hidden, weight, labels = make_inputs((9,), 8, 97, torch.float64)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward(retain_graph=True)
    once = weight.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(weight.grad, 3 * once)
