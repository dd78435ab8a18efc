"""ppo_policy_loss (CPU C++ kernel) against the pure-PyTorch reference and TRL's formula: the op
contract."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import ppo_policy_loss, reference, use_backend
from _ppo import compare_loss, randn, random_mask, right_padded_mask, trl_policy_loss

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(4, 37), (1, 577), (3, 1531), (1, 1), (7,), (2, 3, 129), (70000,)]
STATS = ["clipfrac", "approx_kl", "ratio_mean", "kl_mean"]


def make_inputs(shape, dtype=torch.float64, seed=0, ref=False, spread=0.3):
    """logprobs, old_logprobs, advantages, mask, ref_logprobs: ratios spread around 1 so that
    both clip branches and the unclipped one occur."""
    lp = randn(shape, dtype, seed, 0.5, -2.0)
    old = (lp.double() + randn(shape, torch.float64, seed + 1, spread)).to(dtype)
    adv = randn(shape, dtype, seed + 2)
    mask = right_padded_mask(shape, seed + 3) if len(shape) > 1 else random_mask(shape, seed + 3)
    r = (lp.double() + randn(shape, torch.float64, seed + 4, 0.4)).to(dtype) if ref else None
    return lp, old, adv, mask, r


def _fn(impl):
    def f(lp, old, adv, mask, ref, clip_low, clip_high, kl_coef, est):
        return impl(lp, old, adv, mask, clip_low, clip_high, ref, kl_coef, est)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_no_kl(shape, dtype):
    lp, old, adv, mask, _ = make_inputs(shape, dtype)
    out = compare_loss(_fn(ppo_policy_loss), _fn(reference.ppo_policy_loss),
                       [lp, old, adv, mask, None], [0.2, 0.28, 0.0, "k3"], dtype, STATS,
                       grad_scale=1.7)
    if shape[-1] > 30:
        assert 0.05 < out[1]["clipfrac"].item() < 0.9  # both branches exercised
    assert out[1]["kl_mean"].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 37), (3, 1531), (1, 1)])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_matches_reference_with_kl(shape, dtype, est):
    lp, old, adv, mask, ref = make_inputs(shape, dtype, seed=5, ref=True)
    compare_loss(_fn(ppo_policy_loss), _fn(reference.ppo_policy_loss),
                 [lp, old, adv, mask, ref], [0.1, 0.3, 0.05, est], dtype, STATS)


def test_matches_trl_formula():
    """TRL's PPOTrainer policy loss and pg_clipfrac (symmetric clip, no KL in the loss)."""
    lp, old, adv, mask, _ = make_inputs((8, 200), torch.float32, seed=11)
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, 0.2, 0.2)
    loss.backward()
    y = lp.clone().requires_grad_(True)
    trl_loss, trl_clipfrac = trl_policy_loss(y, old, adv, ~mask, 0.2)
    trl_loss.backward()
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(stats["clipfrac"], trl_clipfrac)
    torch.testing.assert_close(x.grad, y.grad)
    diff = (lp - old)[mask]
    torch.testing.assert_close(stats["approx_kl"], 0.5 * (diff**2).mean())
    torch.testing.assert_close(stats["ratio_mean"], diff.exp().mean())


def test_kl_estimators_by_hand():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    zeros, mask = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    d = lp - ref
    want = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}
    for est, kl in want.items():
        x = lp.clone().requires_grad_(True)
        # advantages 0: the surrogate is 0, the loss is kl_coef * mean(kl)
        loss, stats = ppo_policy_loss(x, lp, zeros, mask, ref_logprobs=ref, kl_coef=2.0,
                                      kl_estimator=est)
        torch.testing.assert_close(loss, 2.0 * kl.mean())
        torch.testing.assert_close(stats["kl_mean"], kl.mean())
        loss.backward()
        dkl = {"k1": torch.ones(3), "k2": d, "k3": 1 - torch.exp(-d)}[est]
        torch.testing.assert_close(x.grad, 2.0 * dkl / 3)
    assert want["k3"].min() >= 0 and want["k2"].min() >= 0


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_empty_mask_gives_zero_not_nan(dtype):
    lp, old, adv, _, ref = make_inputs((3, 17), dtype, ref=True)
    mask = torch.zeros(3, 17, dtype=torch.bool)
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    assert torch.equal(x.grad, torch.zeros_like(lp))
    ref_loss, ref_stats = reference.ppo_policy_loss(lp, old, adv, mask, ref_logprobs=ref,
                                                    kl_coef=0.1)
    assert ref_loss.item() == 0.0 and all(v.item() == 0.0 for v in ref_stats.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tokens(dtype):
    lp, old, adv, mask, _ = make_inputs((0, 5), dtype)
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 5)


def test_masked_out_garbage_is_ignored():
    """Padding may hold anything (inf / NaN log-probs): it must not leak into loss or grads."""
    lp, old, adv, mask, ref = make_inputs((4, 50), torch.float32, ref=True)
    garbage = [t.clone() for t in (lp, old, adv, ref)]
    for t, v in zip(garbage, (float("nan"), float("inf"), float("nan"), -float("inf"))):
        t[~mask] = v
    x = garbage[0].clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, garbage[1], garbage[2], mask, ref_logprobs=garbage[3],
                                  kl_coef=0.1)
    loss.backward()
    want, want_stats = reference.ppo_policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    torch.testing.assert_close(loss, want)
    for k in STATS:
        torch.testing.assert_close(stats[k], want_stats[k])
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


def test_only_logprobs_gets_a_gradient():
    lp, old, adv, mask, ref = make_inputs((3, 20), torch.float64, ref=True)
    ts = [t.clone().requires_grad_(True) for t in (lp, old, adv, ref)]
    loss, _ = ppo_policy_loss(ts[0], ts[1], ts[2], mask, ref_logprobs=ts[3], kl_coef=0.1)
    loss.backward()
    assert ts[0].grad is not None and all(t.grad is None for t in ts[1:])


def test_non_contiguous_and_float_mask():
    lp, old, adv, mask, _ = make_inputs((6, 40), torch.float32)
    lp_t, old_t, adv_t = (torch.stack([t, t], -1)[..., 0] for t in (lp, old, adv))
    loss, stats = ppo_policy_loss(lp_t, old_t, adv_t, mask.float())
    want, want_stats = reference.ppo_policy_loss(lp, old, adv, mask)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(stats["clipfrac"], want_stats["clipfrac"])


@pytest.mark.parametrize("ref", [False, True])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_gradcheck_fp64(ref, est):
    lp, old, adv, mask, r = make_inputs((3, 9), torch.float64, seed=3, ref=ref)
    # keep ratios away from the clip boundaries (the kinks)
    ratio = (lp - old).exp()
    for b in (0.8, 1.2):
        near = (ratio - b).abs() < 1e-3
        old = torch.where(near, old - 0.01, old)
    f = lambda x: ppo_policy_loss(x, old, adv, mask, 0.2, 0.2, r, 0.3 if ref else 0.0, est)[0]
    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for ref in (False, True):
            lp, old, adv, mask, r = make_inputs((13,), dtype, ref=ref)
            yield (lp.requires_grad_(True), old, adv, mask, r, 0.2, 0.25, 0.1 if ref else 0.0,
                   "k2")
    lp, old, adv, mask, _ = make_inputs((0,), torch.float32)
    yield (lp, old, adv, mask, None, 0.2, 0.2, 0.0, "k3")


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.ppo_policy_loss.default, args)


def test_opcheck_backward():
    g = torch.randn(11)
    opcheck(torch.ops.fastpeft.ppo_policy_loss_backward.default, (torch.tensor(0.5), g))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    lp, old, adv, mask, ref = make_inputs((4, 33), torch.float32, ref=True)

    def f(x):
        loss, stats = ppo_policy_loss(x, old, adv, mask, 0.2, 0.3, ref, 0.05, "k3")
        return loss + 0 * stats["clipfrac"]

    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(x1)
    out_e = f(x2)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_saves_only_the_gradient():
    from _harness import saved_tensors
    lp, old, adv, mask, ref = make_inputs((8, 64), torch.float32, ref=True)
    x = lp.clone().requires_grad_(True)
    saved = saved_tensors(lambda: ppo_policy_loss(x, old, adv, mask, 0.2, 0.2, ref, 0.1)[0])
    assert [s[0] for s in saved] == [(512,)]


def test_reference_backend_matches():
    lp, old, adv, mask, ref = make_inputs((3, 21), torch.float64, ref=True)
    loss, stats = ppo_policy_loss(lp, old, adv, mask, 0.2, 0.2, ref, 0.1, "k1")
    with use_backend("reference"):
        loss_r, stats_r = ppo_policy_loss(lp, old, adv, mask, 0.2, 0.2, ref, 0.1, "k1")
    torch.testing.assert_close(loss, loss_r)
    for k in STATS:
        torch.testing.assert_close(stats[k], stats_r[k])


def _bad(**change):
    lp, old, adv, mask, _ = make_inputs((4, 8), torch.float32)
    args = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    args.update(change)
    return args


BAD_INPUTS = [
    ("old shape", dict(old_logprobs=torch.randn(4, 7)),
     r"old_logprobs must have logprobs's shape \(4, 8\), got \(4, 7\)"),
    ("adv dtype", dict(advantages=torch.randn(4, 8, dtype=torch.float64)),
     r"advantages must have dtype torch.float32 like logprobs, got torch.float64"),
    ("ref shape", dict(ref_logprobs=torch.randn(8, 4), kl_coef=0.1),
     r"ref_logprobs must have logprobs's shape \(4, 8\), got \(8, 4\)"),
    ("mask shape", dict(mask=torch.ones(4, 9, dtype=torch.bool)),
     r"mask must have logprobs's shape \(4, 8\), got \(4, 9\)"),
    ("mask not tensor", dict(mask=[1, 0]), r"mask must be a torch.Tensor, got list"),
    ("logprobs int", dict(logprobs=torch.ones(4, 8, dtype=torch.int64)),
     r"logprobs must have dtype one of .* got torch.int64"),
    ("estimator", dict(kl_estimator="k4"), r"kl_estimator must be one of k1, k2, k3, got 'k4'"),
    ("kl without ref", dict(kl_coef=0.1), r"kl_coef 0.1 needs ref_logprobs, got None"),
    ("negative clip", dict(clip_low=-0.1), r"clip_low must be >= 0.0, got -0.1"),
    ("clip str", dict(clip_high="0.2"), r"clip_high must be a float, got str"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        ppo_policy_loss(**_bad(**change))


def test_raw_op_checks_in_cpp():
    lp, old, adv, mask, _ = make_inputs((9,), torch.float32)
    op = torch.ops.fastpeft.ppo_policy_loss
    with pytest.raises(RuntimeError, match=r"kl_estimator must be one of k1, k2, k3, got 'kl'"):
        op(lp, old, adv, mask, None, 0.2, 0.2, 0.0, "kl")
    with pytest.raises(RuntimeError, match=r"mask must have dtype bool, got Float"):
        op(lp, old, adv, mask.float(), None, 0.2, 0.2, 0.0, "k3")
    with pytest.raises(RuntimeError, match=r"advantages must have logprobs's shape \[9\], got \[8\]"):
        op(lp, old, adv[:8], mask, None, 0.2, 0.2, 0.0, "k3")
    with pytest.raises(RuntimeError, match=r"logprobs must be 1-D \[tokens\], got shape \[3, 3\]"):
        op(lp.view(3, 3), old.view(3, 3), adv.view(3, 3), mask.view(3, 3), None, 0.2, 0.2, 0.0,
           "k3")
