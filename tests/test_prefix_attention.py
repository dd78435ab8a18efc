"""prefix_attention (CPU C++ kernel) against the pure-PyTorch reference: the op contract."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastpeft.ops import prefix_attention, reference, use_backend
from _harness import compare_with_reference, saved_tensors

DTYPES = [torch.float32, torch.bfloat16]
# (B, Hq, Hkv, T, P, D, prefix batch 1?, mask?, causal)
CASES = [
    (2, 6, 2, 37, 5, 16, False, True, True),    # GQA, padding, odd T / P
    (2, 4, 4, 33, 8, 40, True, False, True),    # MHA, shared prefix, odd D
    (1, 3, 1, 1, 1, 8, True, False, True),      # T = 1, P = 1
    (3, 2, 1, 20, 1, 24, False, True, False),   # not causal, P = 1
    (0, 4, 2, 7, 3, 16, True, False, True),     # B = 0
    (2, 9, 3, 70, 32, 64, True, True, True),    # several blocks, the head layout
    (2, 2, 2, 9, 0, 16, False, True, True),     # P = 0: rows that see no key return 0
]


def make_inputs(B, Hq, Hkv, T, P, D, shared_prefix, masked, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)

    Bp = 1 if shared_prefix else B
    q, k, v = t(B, Hq, T, D), t(B, Hkv, T, D), t(B, Hkv, T, D)
    pk, pv = t(Bp, Hkv, P, D), t(Bp, Hkv, P, D)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        for b in range(B):  # left padding of a different length per row, some right padding
            mask[b, : (3 * b) % max(T, 1)] = False
        if B > 1 and T > 2:
            mask[-1, -2:] = False
    return [q, k, v, pk, pv], mask


def _fn(impl):
    def f(q, k, v, pk, pv, mask, causal):
        return impl(q, k, v, pk, pv, mask, causal)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}H{c[1]}/{c[2]}T{c[3]}P{c[4]}D{c[5]}" for c in CASES])
def test_matches_reference(case, dtype):
    B, Hq, Hkv, T, P, D, shared, masked, causal = case
    tensors, mask = make_inputs(B, Hq, Hkv, T, P, D, shared, masked, dtype)
    grad_out = torch.randn(B, Hq, T, D, dtype=torch.float64)
    compare_with_reference(_fn(prefix_attention), _fn(reference.prefix_attention), tensors,
                           [mask, causal], grad_out, dtype)


def test_matches_sdpa_on_the_concat():
    # The formulation users compare with: concat + SDPA with a lower-right causal mask and GQA.
    tensors, _ = make_inputs(2, 6, 3, 12, 4, 16, False, False, torch.float64)
    q, k, v, pk, pv = tensors
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    visible = torch.ones(12, 16, dtype=torch.bool).tril(diagonal=4)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(prefix_attention(q, k, v, pk, pv), expected)


def test_integer_mask_and_custom_scale():
    tensors, mask = make_inputs(2, 2, 1, 10, 3, 8, True, True, torch.float64)
    out = prefix_attention(*tensors, attn_mask=mask.long(), scale=0.3)
    torch.testing.assert_close(out, reference.prefix_attention(*tensors, mask, True, 0.3))


def test_non_contiguous_inputs():
    # [B, T, H, D] projections transposed to [B, H, T, D], as attention layers produce them.
    tensors, mask = make_inputs(2, 4, 2, 11, 3, 8, False, True, torch.float32)
    q, k, v, pk, pv = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
                       for t in tensors)
    assert not q.is_contiguous()
    grad_out = torch.randn(2, 4, 11, 8, dtype=torch.float64)
    compare_with_reference(_fn(prefix_attention), _fn(reference.prefix_attention),
                           [q, k, v, pk, pv], [mask, True], grad_out, torch.float32)


def test_saves_no_concatenated_keys():
    tensors, mask = make_inputs(2, 6, 2, 16, 8, 8, False, True, torch.float32)
    saved = saved_tensors(prefix_attention, *tensors, mask)
    shapes = {shape for shape, _, _ in saved}
    assert shapes <= {(2, 6, 16, 8), (2, 2, 16, 8), (2, 2, 8, 8), (2, 16), (2, 6, 16)}, shapes
    assert not any(len(s) == 4 and s[2] == 24 for s in shapes)


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("masked,causal", [(True, True), (False, False)])
def test_gradcheck_fp64(shared_prefix, masked, causal):
    tensors, mask = make_inputs(2, 4, 2, 5, 3, 4, shared_prefix, masked, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: prefix_attention(*a, mask, causal), tensors)


def opcheck_samples():
    for dtype in (torch.float32, torch.float64):
        for shared, masked, causal in ((False, True, True), (True, False, False)):
            tensors, mask = make_inputs(2, 4, 2, 6, 3, 8, shared, masked, dtype)
            yield (*tensors, mask, causal, 0.35)
    tensors, mask = make_inputs(0, 2, 1, 4, 2, 8, True, False, torch.float32)
    yield (*tensors, None, True, 0.35)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.prefix_attention.default, args)


def test_opcheck_backward():
    tensors, mask = make_inputs(2, 4, 2, 6, 3, 8, True, True, torch.float32)
    tensors = [t.detach() for t in tensors]
    out, lse = torch.ops.fastpeft.prefix_attention(*tensors, mask, True, 0.35)
    opcheck(torch.ops.fastpeft.prefix_attention_backward.default,
            (torch.randn_like(out), *tensors, mask, out, lse, True, 0.35))


class TinyPrefixAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.prefix_k = torch.nn.Parameter(torch.randn(1, 2, 3, 8))
        self.prefix_v = torch.nn.Parameter(torch.randn(1, 2, 3, 8))

    def forward(self, q, k, v):
        return prefix_attention(q, k, v, self.prefix_k, self.prefix_v).sum((-1, -2))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyPrefixAttention()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
    compiled(q, k, v).sum().backward()
    assert model.prefix_k.grad is not None and model.prefix_v.grad.shape == (1, 2, 3, 8)


def test_reference_backend_matches():
    tensors, mask = make_inputs(2, 4, 2, 6, 3, 8, False, True, torch.float64)
    y_kernel = prefix_attention(*tensors, mask)
    with use_backend("reference"):
        y_ref = prefix_attention(*tensors, mask)
    torch.testing.assert_close(y_kernel, y_ref)


def _bad(**change):
    tensors, mask = make_inputs(2, 4, 2, 6, 3, 8, False, True, torch.float32)
    q, k, v, pk, pv = [t.detach() for t in tensors]
    args = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, attn_mask=mask, causal=True, scale=None)
    args.update(change)
    return args


BAD_INPUTS = [
    ("Hq not a multiple of Hkv", dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8),
                                      prefix_k=torch.randn(2, 3, 3, 8), prefix_v=torch.randn(2, 3, 3, 8)),
     r"q_heads \(4\) must be a multiple of kv_heads \(3\)"),
    ("prefix head dim", dict(prefix_k=torch.randn(2, 2, 3, 6)),
     r"prefix_k must be \[2 or 1, 2, prefix_len, 8\], got \(2, 2, 3, 6\)"),
    ("prefix batch", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)),
     r"prefix_k must be \[2 or 1, 2, prefix_len, 8\], got \(3, 2, 3, 8\)"),
    ("prefix_v shape", dict(prefix_v=torch.randn(2, 2, 4, 8)),
     r"prefix_v must have prefix_k's shape \(2, 2, 3, 8\), got \(2, 2, 4, 8\)"),
    ("mask shape", dict(attn_mask=torch.ones(2, 5, dtype=torch.bool)),
     r"attn_mask must be \[2, 6\] \(batch, seq\), got \(2, 5\)"),
    ("mask float", dict(attn_mask=torch.zeros(2, 6)), r"attn_mask must be a bool .* got torch.float32"),
    ("k seq", dict(k=torch.randn(2, 2, 5, 8)), r"k must be \[2, kv_heads, 6, 8\] to match q, got \(2, 2, 5, 8\)"),
    ("v shape", dict(v=torch.randn(2, 2, 6, 4)), r"v must have k's shape \(2, 2, 6, 8\), got \(2, 2, 6, 4\)"),
    ("q 3-D", dict(q=torch.randn(4, 6, 8)), r"q must be 4-D \[batch, q_heads, seq, head_dim\], got shape \(4, 6, 8\)"),
    ("dtype", dict(v=torch.randn(2, 2, 6, 8, dtype=torch.float64)),
     r"v must have dtype torch.float32 like q, got torch.float64"),
    ("causal not bool", dict(causal=1), r"causal must be a bool, got int"),
    ("q int", dict(q=torch.ones(2, 4, 6, 8, dtype=torch.int64)), r"q must have dtype one of .* got torch.int64"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        prefix_attention(**_bad(**change))


def test_raw_op_checks_in_cpp():
    a = _bad()
    q, k, v, pk, pv, mask = a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], a["attn_mask"]
    with pytest.raises(RuntimeError, match=r"q_heads \(4\) must be a multiple of kv_heads \(3\)"):
        kk = torch.randn(2, 3, 6, 8)
        torch.ops.fastpeft.prefix_attention(q, kk, kk, torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8),
                                            mask, True, 0.3)
    with pytest.raises(RuntimeError, match=r"attn_mask must be a bool tensor"):
        torch.ops.fastpeft.prefix_attention(q, k, v, pk, pv, mask.float(), True, 0.3)
    with pytest.raises(RuntimeError, match=r"prefix_k must be \[2 or 1, 2, prefix_len, 8\]"):
        torch.ops.fastpeft.prefix_attention(q, k, v, pk[..., :4], pv, mask, True, 0.3)
