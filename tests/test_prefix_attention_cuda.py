"""The CUDA implementation of prefix_attention (csrc/cuda/prefix_attention.cu: PyTorch's
memory-efficient attention on the prefix and on the sequence, merged by log-sum-exp) against the
fp64 reference (python/fastpeft/ops/reference.py and its autograd), with plain PyTorch in the
kernel's dtype on CUDA setting the tolerance (tests/_tolerance.py); the lse convention; opcheck;
bad inputs. float64 is rejected on CUDA (the ATen kernels have no float64 variant), and so is a
head_dim that is not a multiple of 8 (16-bit) / 4 (float32). Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import _backend, prefix_attention, reference
from _tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_NAMES = ("grad_q", "grad_k", "grad_v", "grad_prefix_k", "grad_prefix_v")
# (B, Hq, Hkv, T, P, D): T = 1 and P = 1, B = 0, P = 0, GQA (2, 3, 4 q heads per kv head) and
# MQA, head dims 64 / 80 / 96 / 128, T not a multiple of 32 (the kernels' lse padding).
SHAPES = [
    (2, 4, 4, 37, 5, 64),
    (1, 8, 2, 1, 1, 128),
    (0, 4, 2, 16, 3, 64),
    (3, 6, 2, 129, 16, 80),
    (2, 4, 1, 64, 0, 96),
    (1, 2, 2, 200, 30, 128),
]


def make_inputs(B, Hq, Hkv, T, P, D, Bp, seed=0):
    """fp64 CPU tensors: q, k, v, prefix_k, prefix_v, grad_out."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return (rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D), rand(Bp, Hkv, P, D),
            rand(Bp, Hkv, P, D), rand(B, Hq, T, D))


def make_mask(B, T, seed=0):
    """Key padding mask [B, T]: row 0 left-padded (its first queries see no sequence key under
    causal), row 1 all padding (only the prefix is visible), row 2 right-padded, row 3 random;
    rows beyond repeat."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        kind = b % 4
        if kind == 0:
            mask[b, : T // 3] = False
        elif kind == 1:
            mask[b] = False
        elif kind == 2:
            mask[b, T - T // 4:] = False
        else:
            mask[b] = torch.rand(T, generator=g) > 0.3
    return mask


def reference_lse(q, k, prefix_k, mask, causal, scale):
    """log-sum-exp over the visible keys (fp64), +inf where a query sees none."""
    B, Hq, T, _ = q.shape
    group = Hq // k.shape[1]
    P = prefix_k.shape[2]
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    scores = (q @ keys.transpose(-1, -2)) * scale
    visible = torch.ones(B, 1, T, P + T, dtype=torch.bool)
    if causal:
        visible[..., P:] &= torch.ones(T, T, dtype=torch.bool).tril()
    if mask is not None:
        visible[..., P:] &= mask[:, None, None, :]
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)
    return torch.where(visible.any(-1), lse, torch.full_like(lse, float("inf")))


def reference_grads(q, k, v, pk, pv, mask, causal, scale, go):
    """out and (dq, dk, dv, dprefix_k, dprefix_v) by autograd through the reference, in the
    inputs' dtype and device."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = reference.prefix_attention(*leaves, mask, causal, scale)
    grads = torch.autograd.grad(out, leaves, go)
    return out.detach(), grads


def check(out, ref64, plain, name):
    assert out.device.type == "cuda", name
    assert out.dtype == plain.dtype, f"{name}: dtype {out.dtype} != {plain.dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.is_contiguous(), name
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    assert_close_to_reference(out.cpu(), ref64, plain.cpu(), name)


def check_lse(lse, lse64):
    assert lse.dtype == torch.float32 and lse.device.type == "cuda" and lse.is_contiguous()
    assert lse.shape == lse64.shape
    lse = lse.cpu().double()
    no_key = torch.isinf(lse64)
    assert torch.equal(torch.isposinf(lse), no_key), "lse must be +inf exactly where no key is seen"
    torch.testing.assert_close(lse[~no_key], lse64[~no_key], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,T,P,D", SHAPES)
@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("causal,masked", [(True, False), (True, True), (False, True),
                                           (False, False)])
def test_prefix_attention_matches_reference(B, Hq, Hkv, T, P, D, dtype, shared_prefix, causal,
                                            masked):
    Bp = 1 if shared_prefix else B
    q, k, v, pk, pv, go = make_inputs(B, Hq, Hkv, T, P, D, Bp)
    mask = make_mask(B, T) if masked else None
    scale = D**-0.5
    low = [t.to(dtype) for t in (q, k, v, pk, pv, go)]
    hi = [t.double() for t in low]
    cu = [t.to(CUDA) for t in low]
    mask_c = None if mask is None else mask.to(CUDA)

    out, lse = torch.ops.fastpeft.prefix_attention(*cu[:5], mask_c, causal, scale)
    out64, g64 = reference_grads(*hi[:5], mask, causal, scale, hi[5])
    outp, gp = reference_grads(*cu[:5], mask_c, causal, scale, cu[5])
    check(out, out64, outp, "out")
    lse64 = reference_lse(hi[0], hi[1], hi[3], mask, causal, scale)
    check_lse(lse, lse64)
    if B and T:  # queries that see no key output exactly 0
        assert (out.cpu()[torch.isinf(lse64)] == 0).all()

    grads = torch.ops.fastpeft.prefix_attention_backward(cu[5], *cu[:5], mask_c, out, lse, causal,
                                                         scale)
    for name, got, r64, rp in zip(GRAD_NAMES, grads, g64, gp):
        check(got, r64, rp, name)


@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_prefix_attention_head_dims(D):
    """Every head dim the models use, bf16, GQA, shared prefix, mask and causal."""
    B, Hq, Hkv, T, P = 2, 6, 3, 45, 7
    q, k, v, pk, pv, go = make_inputs(B, Hq, Hkv, T, P, D, 1, seed=1)
    mask = make_mask(B, T, seed=1)
    low = [t.to(torch.bfloat16) for t in (q, k, v, pk, pv, go)]
    cu = [t.to(CUDA) for t in low]
    out, lse = torch.ops.fastpeft.prefix_attention(*cu[:5], mask.to(CUDA), True, 0.1)
    out64, g64 = reference_grads(*(t.double() for t in low[:5]), mask, True, 0.1,
                                 low[5].double())
    outp, gp = reference_grads(*cu[:5], mask.to(CUDA), True, 0.1, cu[5])
    check(out, out64, outp, "out")
    grads = torch.ops.fastpeft.prefix_attention_backward(cu[5], *cu[:5], mask.to(CUDA), out, lse,
                                                         True, 0.1)
    for name, got, r64, rp in zip(GRAD_NAMES, grads, g64, gp):
        check(got, r64, rp, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_prefix_attention_autograd_on_cuda(dtype, masked, monkeypatch):
    """The public op (autograd through the backward op, default scale, a 0/1 integer mask) on
    the CUDA implementation, against the reference."""
    monkeypatch.setitem(_backend.CUDA_AUTO_CHOICE, "prefix_attention", "cuda")
    B, Hq, Hkv, T, P, D = 3, 4, 2, 50, 6, 64
    q, k, v, pk, pv, go = make_inputs(B, Hq, Hkv, T, P, D, 1, seed=2)
    mask = make_mask(B, T, seed=2) if masked else None
    low = [t.to(dtype).to(CUDA) for t in (q, k, v, pk, pv, go)]
    leaves = [t.clone().requires_grad_() for t in low[:5]]
    mask_c = None if mask is None else mask.to(CUDA).long()
    out = prefix_attention(*leaves, mask_c)
    got = torch.autograd.grad(out, leaves, low[5])
    scale = D**-0.5
    out64, g64 = reference_grads(*(t.double().cpu() for t in low[:5]), mask, True, scale,
                                 low[5].double().cpu())
    outp, gp = reference_grads(*low[:5], None if mask is None else mask.to(CUDA), True, scale,
                               low[5])
    check(out.detach(), out64, outp, "out")
    for name, g, r64, rp in zip(GRAD_NAMES, got, g64, gp):
        check(g, r64, rp, name)


def test_prefix_attention_no_visible_key_without_prefix():
    """P = 0 and a fully padded row: out is 0, lse is +inf, and the gradients are finite (0 for
    that row's query)."""
    B, Hq, Hkv, T, P, D = 2, 2, 2, 9, 0, 64
    q, k, v, pk, pv, go = (t.float().to(CUDA) for t in make_inputs(B, Hq, Hkv, T, P, D, B, 3))
    mask = torch.ones(B, T, dtype=torch.bool, device=CUDA)
    mask[1] = False
    out, lse = torch.ops.fastpeft.prefix_attention(q, k, v, pk, pv, mask, True, 0.125)
    assert (out[1] == 0).all() and torch.isposinf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()
    grads = torch.ops.fastpeft.prefix_attention_backward(go, q, k, v, pk, pv, mask, out, lse,
                                                         True, 0.125)
    for name, g in zip(GRAD_NAMES, grads):
        assert torch.isfinite(g).all(), name
    assert (grads[0][1] == 0).all()


def test_prefix_attention_float64_raises_on_cuda():
    q = torch.randn(1, 2, 4, 64, dtype=torch.float64, device=CUDA)
    k = torch.randn(1, 2, 4, 64, dtype=torch.float64, device=CUDA)
    pk = torch.randn(1, 2, 3, 64, dtype=torch.float64, device=CUDA)
    with pytest.raises(RuntimeError, match="no float64"):
        torch.ops.fastpeft.prefix_attention(q, k, k, pk, pk, None, True, 0.125)


def test_prefix_attention_bad_inputs_raise():
    q = torch.randn(2, 4, 8, 64, device=CUDA)
    k = torch.randn(2, 2, 8, 64, device=CUDA)
    pk = torch.randn(1, 2, 3, 64, device=CUDA)
    op = torch.ops.fastpeft.prefix_attention
    with pytest.raises(RuntimeError, match="head_dim to be a positive multiple of 8"):
        q2, k2, p2 = (t[..., :60].half().contiguous() for t in (q, k, pk))
        op(q2, k2, k2, p2, p2, None, True, 0.125)
    with pytest.raises(RuntimeError, match="q_heads \\(4\\) must be a multiple of kv_heads"):
        k3 = torch.randn(2, 3, 8, 64, device=CUDA)
        op(q, k3, k3, torch.randn(1, 3, 3, 64, device=CUDA),
           torch.randn(1, 3, 3, 64, device=CUDA), None, True, 0.125)
    with pytest.raises(RuntimeError, match="prefix_k must be \\[2 or 1, 2, prefix_len, 64\\]"):
        op(q, k, k, pk[..., :32].contiguous(), pk[..., :32].contiguous(), None, True, 0.125)
    with pytest.raises(RuntimeError, match="attn_mask must be \\[2, 8\\]"):
        op(q, k, k, pk, pk, torch.ones(2, 7, dtype=torch.bool, device=CUDA), True, 0.125)
    with pytest.raises(RuntimeError, match="attn_mask must be a bool tensor"):
        op(q, k, k, pk, pk, torch.ones(2, 8, device=CUDA), True, 0.125)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        op(q, k, k[:, :, :7], pk, pk, None, True, 0.125)
    with pytest.raises(RuntimeError, match="k must have dtype"):
        op(q, k.half(), k, pk, pk, None, True, 0.125)
    out, lse = op(q, k, k, pk, pk, None, True, 0.125)
    bw = torch.ops.fastpeft.prefix_attention_backward
    with pytest.raises(RuntimeError, match="lse must be Float"):
        bw(q, q, k, k, pk, pk, None, out, lse.double(), True, 0.125)
    with pytest.raises(RuntimeError, match="grad_out must have q's shape"):
        bw(q[:1], q, k, k, pk, pk, None, out, lse, True, 0.125)


def test_prefix_attention_opcheck():
    B, Hq, Hkv, T, P, D = 2, 4, 2, 10, 3, 64
    q, k, v, pk, pv, go = (t.float().to(CUDA) for t in make_inputs(B, Hq, Hkv, T, P, D, 1, 4))
    mask = make_mask(B, T, seed=4).to(CUDA)
    op = torch.ops.fastpeft.prefix_attention.default
    opcheck(op, tuple(t.clone().requires_grad_() for t in (q, k, v, pk, pv)) +
            (mask, True, 0.125))
    opcheck(op, (q, k, v, pk, pv, None, False, 0.2))
    out, lse = torch.ops.fastpeft.prefix_attention(q, k, v, pk, pv, mask, True, 0.125)
    opcheck(torch.ops.fastpeft.prefix_attention_backward.default,
            (go, q, k, v, pk, pv, mask, out, lse, True, 0.125))
