"""The CUDA kernels of ppo_policy_loss, ppo_value_loss, gae and masked_whiten (csrc/cuda/) against
the fp64 reference, with the reference in the kernel's dtype on CUDA setting the tolerance
(tests/_tolerance.py); empty masks; determinism; opcheck; device errors. Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import gae, masked_whiten, ppo_policy_loss, ppo_value_loss, reference
from _ppo import compare_loss, randn, right_padded_mask
from _tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd sizes, one token, and enough tokens for many blocks of the grid-stride reductions
SHAPES = [(4, 37), (1, 577), (3, 1531), (1, 1), (64, 1024), (1, 300001)]
POLICY_STATS = ["clipfrac", "approx_kl", "ratio_mean", "kl_mean"]


def policy_inputs(shape, seed=0):
    lp = randn(shape, torch.float64, seed, 0.5, -2.0)
    old = lp + randn(shape, torch.float64, seed + 1, 0.3)
    adv = randn(shape, torch.float64, seed + 2)
    ref = lp + randn(shape, torch.float64, seed + 3, 0.4)
    mask = right_padded_mask(shape, seed + 4)
    return [t.to(CUDA) for t in (lp, old, adv, mask, ref)]


def _policy(impl):
    def f(lp, old, adv, mask, ref, kl_coef, est):
        return impl(lp, old, adv, mask, 0.2, 0.28, ref, kl_coef, est)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("est", [None, "k1", "k2", "k3"])
def test_policy_loss_matches_reference(shape, dtype, est):
    lp, old, adv, mask, ref = policy_inputs(shape)
    args = [lp, old, adv, mask, ref if est else None]
    out = compare_loss(_policy(ppo_policy_loss), _policy(reference.ppo_policy_loss), args,
                       [0.1 if est else 0.0, est or "k3"], dtype, POLICY_STATS, grad_scale=1.3)
    assert out[0].device.type == "cuda" and out[2].device.type == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_value_loss_matches_reference(shape, dtype):
    old = randn(shape, torch.float64, 0).to(CUDA)
    v = old + randn(shape, torch.float64, 1, 0.3).to(CUDA)
    ret = randn(shape, torch.float64, 2).to(CUDA)
    mask = right_padded_mask(shape, 3).to(CUDA)
    f = lambda impl: (lambda v, old, ret, mask: impl(v, old, ret, mask, 0.2))
    compare_loss(f(ppo_value_loss), f(reference.ppo_value_loss), [v, old, ret, mask], [], dtype,
                 ["vf_clipfrac"], grad_scale=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 37), (1, 577), (3, 1531), (1, 1), (64, 1024), (300, 257),
                                   (0, 8), (5, 0)])
def test_gae_matches_python_loop(shape, dtype):
    r = randn(shape, torch.float64, 0, 0.5).to(CUDA)
    v = randn(shape, torch.float64, 1).to(CUDA)
    mask = right_padded_mask(shape, 2).to(CUDA)
    mask[..., 1::7] = False  # holes too
    adv, ret = gae(r.to(dtype), v.to(dtype), mask, 0.99, 0.95)
    want = reference.gae(r, v, mask, 0.99, 0.95)
    plain = reference.gae(r.to(dtype), v.to(dtype), mask, 0.99, 0.95)
    for name, o, w, p in zip(("advantages", "returns"), (adv, ret), want, plain):
        assert o.device.type == "cuda" and o.dtype == dtype and o.shape == r.shape, name
        assert_close_to_reference(o, w, p, name)
        assert (o[~mask] == 0).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 37), (1, 577), (3, 1531), (2, 1), (64, 1024),
                                   (1, 300001)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shape, dtype, shift_mean):
    x = randn(shape, torch.float64, 0, 2.0, 0.7).to(CUDA)
    mask = right_padded_mask(shape, 1, min_len=1).to(CUDA)
    go = randn(shape, torch.float64, 2).to(CUDA)

    def run(fn, x, g):
        x = x.detach().clone().requires_grad_(True)
        y = fn(x, mask, shift_mean)
        return y.detach(), torch.autograd.grad(y, x, g)[0]

    out = run(masked_whiten, x.to(dtype), go.to(dtype))
    want = run(reference.masked_whiten, x, go)
    plain = run(reference.masked_whiten, x.to(dtype), go.to(dtype))
    for name, o, w, p in zip(("out", "grad"), out, want, plain):
        assert o.device.type == "cuda" and o.dtype == dtype, name
        assert_close_to_reference(o, w, p, name)


def test_empty_masks_give_zero_not_nan():
    lp, old, adv, mask, ref = policy_inputs((3, 50))
    none = torch.zeros_like(mask)
    x = lp.float().clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old.float(), adv.float(), none, ref_logprobs=ref.float(),
                                  kl_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    assert (x.grad == 0).all()
    vloss, vstats = ppo_value_loss(lp.float(), old.float(), adv.float(), none)
    assert vloss.item() == 0.0 and vstats["vf_clipfrac"].item() == 0.0
    y = masked_whiten(lp.float(), none)
    assert torch.isfinite(y).all()


def test_deterministic():
    lp, old, adv, mask, ref = policy_inputs((1, 300001))
    a = [ppo_policy_loss(lp.float(), old.float(), adv.float(), mask, ref_logprobs=ref.float(),
                         kl_coef=0.1)[0] for _ in range(3)]
    assert all(torch.equal(a[0], t) for t in a)
    w = [masked_whiten(lp.float(), mask) for _ in range(3)]
    assert all(torch.equal(w[0], t) for t in w)


def test_matches_cpu_kernels_fp64():
    """The raw ops in fp64 on CUDA against the CPU kernels (same per-token code)."""
    lp, old, adv, mask, ref = policy_inputs((5, 333))
    for op, args in (
        (torch.ops.fastpeft.ppo_policy_loss, (lp, old, adv, mask, ref, 0.2, 0.3, 0.1, "k3")),
        (torch.ops.fastpeft.ppo_value_loss, (lp, old, adv, mask, 0.2)),
        (torch.ops.fastpeft.masked_whiten, (lp, mask, False)),
    ):
        flat = [a.reshape(-1) if isinstance(a, torch.Tensor) else a for a in args]
        got = op(*flat)
        want = op(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in flat])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)
    got = torch.ops.fastpeft.gae(lp, old, mask, 0.9, 0.8)
    want = torch.ops.fastpeft.gae(lp.cpu(), old.cpu(), mask.cpu(), 0.9, 0.8)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    lp, old, adv, mask, ref = [t.reshape(-1)[:97] for t in policy_inputs((1, 97))]
    lp, old, adv, ref = (t.to(dtype) for t in (lp, old, adv, ref))
    opcheck(torch.ops.fastpeft.ppo_policy_loss.default,
            (lp.clone().requires_grad_(True), old, adv, mask, ref, 0.2, 0.2, 0.1, "k2"))
    opcheck(torch.ops.fastpeft.ppo_value_loss.default,
            (lp.clone().requires_grad_(True), old, adv, mask, 0.2))
    opcheck(torch.ops.fastpeft.gae.default, (lp.view(1, 97), old.view(1, 97), mask.view(1, 97),
                                             0.99, 0.95))
    opcheck(torch.ops.fastpeft.masked_whiten.default, (lp.clone().requires_grad_(True), mask, True))
    _, stats = torch.ops.fastpeft.masked_whiten(lp, mask, True)
    opcheck(torch.ops.fastpeft.masked_whiten_backward.default, (adv, lp, mask, stats, True))


def test_device_errors():
    lp, old, adv, mask, _ = policy_inputs((2, 9))
    with pytest.raises(ValueError, match=r"mask must be on cuda:0 like logprobs, got cpu"):
        ppo_policy_loss(lp.float(), old.float(), adv.float(), mask.cpu())
    with pytest.raises(ValueError, match=r"values must be on cuda:0 like rewards, got cpu"):
        gae(lp.float(), old.float().cpu(), mask)
    with pytest.raises(RuntimeError, match=r"mask must be on cuda:0 like x, got cpu"):
        torch.ops.fastpeft.masked_whiten(lp.reshape(-1), mask.reshape(-1).cpu(), True)
