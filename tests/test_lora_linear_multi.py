"""lora_linear_multi (CPU C++ kernel): several adapters per batch against the reference."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import lora_linear, lora_linear_multi, reference
from _tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, in, out, r, n_adapters)
SHAPES = [((40,), 64, 48, 8, 3), ((1,), 577, 1531, 7, 2), ((0,), 16, 12, 4, 2), ((3, 5), 33, 17, 5, 4)]


def make_inputs(lead, k, n, r, n_adapters, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)

    x = t(*lead, k, grad=True)
    w = t(n, k, scale=k**-0.5)
    b = t(n, scale=0.1)
    a = t(n_adapters, r, k, scale=k**-0.5, grad=True)
    bb = t(n_adapters, n, r, scale=0.5, grad=True)
    ids = torch.randint(-1, n_adapters, lead, generator=g)
    scalings = torch.rand(n_adapters, generator=g, dtype=torch.float64) * 2 + 0.5
    return x, w, b, a, bb, scalings, ids


def run(fn, tensors, rest, grad_out):
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    y = fn(*tensors, *rest)
    leaves = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(y, leaves, grad_out) if y.numel() else [torch.zeros_like(t) for t in leaves]
    return y.detach(), [g.detach() for g in grads]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n,r,n_adapters", SHAPES)
def test_matches_reference(lead, k, n, r, n_adapters, dtype):
    x, w, b, a, bb, s, ids = make_inputs(lead, k, n, r, n_adapters, dtype)
    grad_out = torch.randn(*lead, n, dtype=torch.float64)
    out = run(lora_linear_multi, [x, w, b, a, bb], [s, ids], grad_out.to(dtype))
    ref64 = run(reference.lora_linear_multi, [t.double() for t in (x, w, b, a, bb)], [s, ids], grad_out)
    plain = run(reference.lora_linear_multi, [x, w, b, a, bb], [s, ids], grad_out.to(dtype))
    assert_close_to_reference(out[0], ref64[0], plain[0], "y")
    for i, (go, gr, gp) in enumerate(zip(out[1], ref64[1], plain[1])):
        assert_close_to_reference(go, gr, gp, f"grad {i}")


def test_rows_equal_single_adapter_results():
    x, w, b, a, bb, s, _ = make_inputs((12,), 20, 16, 4, 3, torch.float64)
    ids = torch.tensor([0, 1, 2, -1] * 3)
    y = lora_linear_multi(x, w, b, a, bb, s.tolist(), ids)
    for row, j in enumerate(ids.tolist()):
        expected = (torch.nn.functional.linear(x[row], w, b) if j < 0 else
                    lora_linear(x[row:row + 1], w, b, a[j], bb[j], float(s[j]))[0])
        torch.testing.assert_close(y[row], expected)


def test_one_id_per_batch_row_is_broadcast_over_the_sequence():
    x, w, b, a, bb, s, _ = make_inputs((3, 5), 20, 16, 4, 2, torch.float64)
    per_batch = torch.tensor([1, -1, 0])
    y = lora_linear_multi(x, w, b, a, bb, s, per_batch)
    y_full = lora_linear_multi(x, w, b, a, bb, s, per_batch[:, None].expand(3, 5))
    torch.testing.assert_close(y, y_full)


def test_gradcheck_fp64():
    x, w, b, a, bb, s, ids = make_inputs((7,), 9, 6, 3, 3, torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    s32 = s.float()

    def f(x, w, b, a, bb):
        return torch.ops.fastpeft.lora_linear_multi(x, w, b, a, bb, s32, ids)[0]

    assert torch.autograd.gradcheck(f, (x, w, b, a, bb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x, w, b, a, bb, s, ids = make_inputs((6,), 10, 8, 3, 2, dtype)
    opcheck(torch.ops.fastpeft.lora_linear_multi.default, (x, w, b, a, bb, s.float(), ids))
    y, t = torch.ops.fastpeft.lora_linear_multi(x, w, b, a, bb, s.float(), ids)
    opcheck(torch.ops.fastpeft.lora_linear_multi_backward.default,
            (torch.randn_like(y), x.detach(), w, a.detach(), bb.detach(), s.float(), ids, t,
             [True, True, True, True, True]))


BAD = [
    ("id too large", dict(adapter_ids=torch.tensor([0, 1, 2, 0])), r"adapter_ids must be in \[-1, 2\) for 2 adapters, got 2"),
    ("id below -1", dict(adapter_ids=torch.tensor([0, -2, 1, 0])), r"adapter_ids must be in \[-1, 2\) for 2 adapters, got -2"),
    ("ids shape", dict(adapter_ids=torch.tensor([0, 1])), r"adapter_ids must have shape \(4,\)"),
    ("ids float", dict(adapter_ids=torch.zeros(4)), r"adapter_ids must be an integer tensor, got dtype torch.float32"),
    ("scalings count", dict(scalings=[1.0]), r"scalings must have 2 entries .* got shape \(1,\)"),
    ("lora_b stack", dict(lora_b=torch.randn(3, 6, 2)), r"lora_b must be \[2, 6, 2\].*got \(3, 6, 2\)"),
    ("lora_a in", dict(lora_a=torch.randn(2, 2, 5)), r"lora_a must be \[n_adapters, r, 8\].*got \(2, 2, 5\)"),
    ("lora_a 2-D", dict(lora_a=torch.randn(2, 8)), r"lora_a must be 3-D, got shape \(2, 8\)"),
]


@pytest.mark.parametrize("name,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(name, change, message):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=None, lora_a=torch.randn(2, 2, 8),
                lora_b=torch.randn(2, 6, 2), scalings=[1.0, 2.0], adapter_ids=torch.tensor([0, 1, -1, 0]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        lora_linear_multi(**args)


def test_raw_op_rejects_out_of_range_id():
    x, w, b = torch.randn(3, 8), torch.randn(6, 8), None
    with pytest.raises(RuntimeError, match="adapter_ids"):
        torch.ops.fastpeft.lora_linear_multi(x, w, b, torch.randn(2, 2, 8), torch.randn(2, 6, 2),
                                             torch.ones(2), torch.tensor([0, 5, 1]))
