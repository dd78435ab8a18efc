"""ppo_value_loss (CPU C++ kernel) against the pure-PyTorch reference and TRL's formula."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import ppo_value_loss, reference, use_backend
from _ppo import compare_loss, randn, random_mask, right_padded_mask, trl_value_loss

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(4, 37), (1, 577), (3, 1531), (1, 1), (7,), (2, 3, 129), (70000,)]


def make_inputs(shape, dtype=torch.float64, seed=0):
    """values, old_values, returns, mask: |v - old| spread around clip so both branches occur."""
    old = randn(shape, dtype, seed)
    v = (old.double() + randn(shape, torch.float64, seed + 1, 0.3)).to(dtype)
    ret = randn(shape, dtype, seed + 2)
    mask = right_padded_mask(shape, seed + 3) if len(shape) > 1 else random_mask(shape, seed + 3)
    return v, old, ret, mask


def _fn(impl):
    def f(v, old, ret, mask, clip):
        return impl(v, old, ret, mask, clip)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.2, 0.0, 10.0])
def test_matches_reference(shape, dtype, clip):
    ts = make_inputs(shape, dtype)
    out = compare_loss(_fn(ppo_value_loss), _fn(reference.ppo_value_loss), list(ts), [clip],
                       dtype, ["vf_clipfrac"], grad_scale=0.6)
    if shape[-1] > 30 and clip == 0.2:
        assert 0.05 < out[1]["vf_clipfrac"].item() < 0.9
    if clip == 10.0:
        assert out[1]["vf_clipfrac"].item() == 0.0


def test_matches_trl_formula():
    v, old, ret, mask = make_inputs((8, 200), torch.float32, seed=4)
    x = v.clone().requires_grad_(True)
    loss, stats = ppo_value_loss(x, old, ret, mask, 0.2)
    loss.backward()
    y = v.clone().requires_grad_(True)
    trl_loss, trl_clipfrac = trl_value_loss(y, old, ret, ~mask, 0.2)
    trl_loss.backward()
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(stats["vf_clipfrac"], trl_clipfrac)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_empty_mask_gives_zero_not_nan(dtype):
    v, old, ret, _ = make_inputs((3, 17), dtype)
    mask = torch.zeros(3, 17, dtype=torch.bool)
    x = v.clone().requires_grad_(True)
    loss, stats = ppo_value_loss(x, old, ret, mask)
    loss.backward()
    assert loss.item() == 0.0 and stats["vf_clipfrac"].item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(v))
    assert reference.ppo_value_loss(v, old, ret, mask)[0].item() == 0.0


def test_zero_tokens():
    v, old, ret, mask = make_inputs((0,), torch.float32)
    x = v.clone().requires_grad_(True)
    loss, _ = ppo_value_loss(x, old, ret, mask)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0,)


def test_masked_out_garbage_is_ignored():
    v, old, ret, mask = make_inputs((4, 50), torch.float32)
    gv, gold, gret = (t.clone() for t in (v, old, ret))
    gv[~mask], gold[~mask], gret[~mask] = float("nan"), float("inf"), -float("inf")
    x = gv.clone().requires_grad_(True)
    loss, stats = ppo_value_loss(x, gold, gret, mask)
    loss.backward()
    want, want_stats = reference.ppo_value_loss(v, old, ret, mask)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(stats["vf_clipfrac"], want_stats["vf_clipfrac"])
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


def test_only_values_gets_a_gradient():
    ts = [t.clone().requires_grad_(True) for t in make_inputs((3, 20), torch.float64)[:3]]
    mask = make_inputs((3, 20))[3]
    ppo_value_loss(ts[0], ts[1], ts[2], mask)[0].backward()
    assert ts[0].grad is not None and ts[1].grad is None and ts[2].grad is None


def test_gradcheck_fp64():
    v, old, ret, mask = make_inputs((3, 9), torch.float64, seed=2)
    # away from the clip edges and from the ties of the two squares
    v = torch.where(((v - old).abs() - 0.2).abs() < 1e-3, v + 0.01, v)
    f = lambda x: ppo_value_loss(x, old, ret, mask, 0.2)[0]
    assert torch.autograd.gradcheck(f, (v.clone().requires_grad_(True),))


def opcheck_samples():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        v, old, ret, mask = make_inputs((13,), dtype)
        yield (v.requires_grad_(True), old, ret, mask, 0.2)
    v, old, ret, mask = make_inputs((0,), torch.float32)
    yield (v, old, ret, mask, 0.1)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.ppo_value_loss.default, args)


def test_opcheck_backward():
    opcheck(torch.ops.fastpeft.ppo_value_loss_backward.default,
            (torch.tensor(0.5), torch.randn(11)))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    v, old, ret, mask = make_inputs((4, 33), torch.float32)
    f = lambda x: ppo_value_loss(x, old, ret, mask, 0.2)[0]
    x1, x2 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out_c = torch.compile(f, fullgraph=True)(x1)
    out_e = f(x2)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_reference_backend_matches():
    v, old, ret, mask = make_inputs((3, 21), torch.float64)
    loss, stats = ppo_value_loss(v, old, ret, mask, 0.3)
    with use_backend("reference"):
        loss_r, stats_r = ppo_value_loss(v, old, ret, mask, 0.3)
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(stats["vf_clipfrac"], stats_r["vf_clipfrac"])


def _bad(**change):
    v, old, ret, mask = make_inputs((4, 8), torch.float32)
    args = dict(values=v, old_values=old, returns=ret, mask=mask)
    args.update(change)
    return args


BAD_INPUTS = [
    ("old shape", dict(old_values=torch.randn(4, 7)),
     r"old_values must have values's shape \(4, 8\), got \(4, 7\)"),
    ("returns dtype", dict(returns=torch.randn(4, 8, dtype=torch.bfloat16)),
     r"returns must have dtype torch.float32 like values, got torch.bfloat16"),
    ("mask shape", dict(mask=torch.ones(8, dtype=torch.bool)),
     r"mask must have values's shape \(4, 8\), got \(8,\)"),
    ("values int", dict(values=torch.ones(4, 8, dtype=torch.int32)),
     r"values must have dtype one of .* got torch.int32"),
    ("negative clip", dict(clip=-1.0), r"clip must be >= 0.0, got -1.0"),
    ("clip None", dict(clip=None), r"clip must be a float, got NoneType"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        ppo_value_loss(**_bad(**change))


def test_raw_op_checks_in_cpp():
    v, old, ret, mask = make_inputs((9,), torch.float32)
    op = torch.ops.fastpeft.ppo_value_loss
    with pytest.raises(RuntimeError, match=r"mask must have values's shape \[9\], got \[8\]"):
        op(v, old, ret, mask[:8], 0.2)
    with pytest.raises(RuntimeError, match=r"returns must have dtype Double like values, got Float"):
        op(v.double(), old.double(), ret, mask, 0.2)
