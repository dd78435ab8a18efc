"""gae (CPU C++ kernel) against the reference, which is the Python loop over time, and against
TRL's PPOTrainer loop on right-padded masks."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import gae, reference, use_backend
from _ppo import randn, random_mask, right_padded_mask, trl_gae
from _tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(4, 37), (1, 577), (3, 1531), (1, 1), (0, 9), (5, 0), (2, 3, 129), (64, 1024),
          (300, 257)]  # the last: rows split over threads (from 64K elements on)


def make_inputs(shape, dtype=torch.float64, seed=0, padding="right"):
    r = randn(shape, dtype, seed, 0.5)
    v = randn(shape, dtype, seed + 1)
    mask = (right_padded_mask(shape, seed + 2) if padding == "right"
            else random_mask(shape, seed + 2))
    return r, v, mask


def check(shape, dtype, gamma, lam, padding="right"):
    r, v, mask = make_inputs(shape, dtype, padding=padding)
    adv, ret = gae(r, v, mask, gamma, lam)
    adv64, ret64 = reference.gae(r.double(), v.double(), mask, gamma, lam)
    adv_p, ret_p = reference.gae(r, v, mask, gamma, lam)
    for name, out, want, plain in (("advantages", adv, adv64, adv_p), ("returns", ret, ret64, ret_p)):
        assert out.dtype == dtype and out.shape == r.shape, name
        assert_close_to_reference(out, want, plain, name)
        assert (out[~mask] == 0).all(), name
    return adv, ret


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_matches_python_loop(shape, dtype, gamma, lam):
    check(shape, dtype, gamma, lam)


@pytest.mark.parametrize("dtype", DTYPES)
def test_holes_in_the_mask_are_skipped(dtype):
    check((6, 200), dtype, 0.97, 0.9, padding="random")


def test_matches_trl_loop_on_right_padding():
    r, v, mask = make_inputs((8, 300), torch.float64, seed=7)
    adv, ret = gae(r, v, mask, 0.99, 0.95)
    trl_adv, trl_ret = trl_gae(r, v, ~mask, 0.99, 0.95)
    torch.testing.assert_close(adv, torch.where(mask, trl_adv, 0))
    torch.testing.assert_close(ret, torch.where(mask, trl_ret, 0))


def test_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    v = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    g, lam = 0.5, 0.5
    d2 = 2.0 + g * 0 - 1.5
    d1 = 0.0 + g * 1.5 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]]))


def test_no_gradient_and_inputs_untouched():
    r, v, mask = make_inputs((3, 10), torch.float32)
    r0, v0 = r.clone(), v.clone()
    adv, ret = gae(r.requires_grad_(True), v.requires_grad_(True), mask)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(r.detach(), r0) and torch.equal(v.detach(), v0)


def test_non_contiguous_and_int_mask():
    r, v, mask = make_inputs((5, 40), torch.float32)
    rt, vt = (torch.stack([t, t], -1)[..., 0] for t in (r, v))
    adv, ret = gae(rt, vt, mask.int(), 0.99, 0.95)
    want = reference.gae(r, v, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, want[0])
    torch.testing.assert_close(ret, want[1])


def opcheck_samples():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        r, v, mask = make_inputs((3, 17), dtype)
        yield (r, v, mask, 0.99, 0.95)
    r, v, mask = make_inputs((0, 4), torch.float32)
    yield (r, v, mask, 1.0, 0.95)


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    opcheck(torch.ops.fastpeft.gae.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    r, v, mask = make_inputs((4, 33), torch.float32)
    f = lambda r, v: gae(r, v, mask, 0.99, 0.95)
    out_c = torch.compile(f, fullgraph=True)(r, v)
    out_e = f(r, v)
    torch.testing.assert_close(out_c, out_e)


def test_reference_backend_matches():
    r, v, mask = make_inputs((3, 21), torch.float64)
    out = gae(r, v, mask, 0.9, 0.8)
    with use_backend("reference"):
        out_r = gae(r, v, mask, 0.9, 0.8)
    torch.testing.assert_close(out, out_r)


def _bad(**change):
    r, v, mask = make_inputs((4, 8), torch.float32)
    args = dict(rewards=r, values=v, mask=mask)
    args.update(change)
    return args


BAD_INPUTS = [
    ("values shape", dict(values=torch.randn(4, 7)),
     r"values must have rewards's shape \(4, 8\), got \(4, 7\)"),
    ("values dtype", dict(values=torch.randn(4, 8, dtype=torch.float64)),
     r"values must have dtype torch.float32 like rewards, got torch.float64"),
    ("mask shape", dict(mask=torch.ones(4, 8, 1, dtype=torch.bool)),
     r"mask must have rewards's shape \(4, 8\), got \(4, 8, 1\)"),
    ("rewards 0-d", dict(rewards=torch.tensor(1.0)),
     r"rewards must have at least 1 dim \[..., T\], got shape \(\)"),
    ("rewards int", dict(rewards=torch.ones(4, 8, dtype=torch.int64)),
     r"rewards must have dtype one of .* got torch.int64"),
    ("gamma str", dict(gamma="0.9"), r"gamma must be a float, got str"),
]


@pytest.mark.parametrize("name,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        gae(**_bad(**change))


def test_raw_op_checks_in_cpp():
    r, v, mask = make_inputs((3, 5), torch.float32)
    with pytest.raises(RuntimeError, match=r"rewards must be 2-D \[rows, T\], got shape \[15\]"):
        torch.ops.fastpeft.gae(r.reshape(-1), v.reshape(-1), mask.reshape(-1), 1.0, 0.95)
    with pytest.raises(RuntimeError, match=r"mask must have dtype bool, got Int"):
        torch.ops.fastpeft.gae(r, v, mask.int(), 1.0, 0.95)
