"""The CUDA kernels of lora_linear / lora_linear_multi (csrc/cuda) against the op contract
(docs/lora_linear_contract.md): an fp64 reference of the contract computed on the CPU, plain
PyTorch in the kernel's dtype for the tolerance (tests/_tolerance.py), the CPU kernels in fp64
(the same seed must draw the same dropout mask on both devices), and opcheck. Skipped without a
CUDA GPU."""

import pytest
import torch
from torch.library import opcheck

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import lora_linear, lora_linear_multi, reference
from _tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_MASK = [True] * 5
# (M, K, N, r): odd sizes; M = 1 and M = 0; r = 70 crosses the kernels' 64-wide chunks of r,
# K = 577 several 256-wide tiles, M = 300 several row chunks of the adapter gradients.
SHAPES = [(37, 64, 48, 16), (1, 577, 1531, 7), (0, 33, 17, 5), (300, 577, 129, 70), (3, 1, 2, 1)]
# (M, K, N, r, n_adapters)
MULTI_SHAPES = [(37, 64, 48, 16, 3), (1, 577, 1531, 7, 2), (0, 33, 17, 5, 2),
                (300, 577, 129, 70, 4), (130, 577, 1531, 7, 1)]


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def single_inputs(M, K, N, r, seed=0):
    """fp64 CPU tensors: x, weight, bias, lora_a, lora_b, grad_out."""
    g = torch.Generator().manual_seed(seed)
    return (_rand(g, M, K), _rand(g, N, K, scale=K**-0.5), _rand(g, N, scale=0.1),
            _rand(g, r, K, scale=K**-0.5), _rand(g, N, r, scale=0.5), _rand(g, M, N))


def multi_inputs(M, K, N, r, n, seed=0):
    """fp64 CPU tensors: x, weight, bias, lora_a, lora_b, grad_out; fp32 scalings; int64 ids
    (every adapter and -1 represented when M allows)."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = _rand(g, M, K), _rand(g, N, K, scale=K**-0.5), _rand(g, N, scale=0.1)
    a, bb = _rand(g, n, r, K, scale=K**-0.5), _rand(g, n, N, r, scale=0.5)
    grad_out = _rand(g, M, N)
    scalings = torch.linspace(0.5, 2.0, n, dtype=torch.float32)
    ids = torch.randint(-1, n, (M,), generator=g, dtype=torch.int64)
    if M >= n + 1:
        ids[: n + 1] = torch.arange(-1, n)
    return x, w, b, a, bb, grad_out, scalings, ids


def ref_single(x, w, b, a, bb, scaling, p, seed, grad_out, lora_t):
    """The contract of lora_linear and its backward, in x's dtype and device."""
    xd = reference.seeded_dropout(x, p, seed)
    t = xd @ a.T
    y = x @ w.T + b + scaling * (t @ bb.T)
    g = grad_out @ bb
    h = reference.seeded_dropout(g @ a, p, seed)  # (g A) * keep / (1 - p): same mask, same shape
    grads = (grad_out @ w + scaling * h, grad_out.T @ x, grad_out.sum(0),
             scaling * (g.T @ xd), scaling * (grad_out.T @ lora_t))
    return (y, t), grads


def ref_multi(x, w, b, a, bb, scalings, ids, grad_out, lora_t):
    """The contract of lora_linear_multi and its backward, in x's dtype and device."""
    M, r = x.shape[0], a.shape[1]
    y = x @ w.T + b
    t = x.new_zeros(M, r)
    grad_x = grad_out @ w
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(bb)
    for j in range(a.shape[0]):
        rows = ids == j
        s = float(scalings[j])
        tj = x[rows] @ a[j].T
        t[rows] = tj
        y[rows] += s * (tj @ bb[j].T)
        gj = grad_out[rows] @ bb[j]
        grad_x[rows] += s * (gj @ a[j])
        grad_a[j] = s * (gj.T @ x[rows])
        grad_b[j] = s * (grad_out[rows].T @ lora_t[rows])
    return (y, t), (grad_x, grad_out.T @ x, grad_out.sum(0), grad_a, grad_b)


def check_all(outs, refs64, plains, names):
    for out, ref64, plain, name in zip(outs, refs64, plains, names):
        assert out.device.type == "cuda", name
        assert out.dtype == plain.dtype, f"{name}: dtype {out.dtype} != {plain.dtype}"
        assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
        assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
        assert_close_to_reference(out.cpu(), ref64, plain.cpu(), name)


GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias", "grad_lora_a", "grad_lora_b")


# ------------------------------------------------------------------------------------------
# lora_linear

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_matches_contract(M, K, N, r, dtype, p):
    x, w, b, a, bb, go = single_inputs(M, K, N, r)
    scaling, seed = 1.75, 123456789012345
    # Inputs rounded to dtype once; the fp64 reference sees exactly those values.
    low = [v.to(dtype) for v in (x, w, b, a, bb, go)]
    hi = [v.double() for v in low]
    seed_t = torch.tensor([seed], dtype=torch.int64)

    xc, wc, bc, ac, bbc, goc = [v.to(CUDA) for v in low]
    y, t = torch.ops.fastpeft.lora_linear(xc, wc, bc, ac, bbc, scaling, p, seed_t)
    # Backward gets the same lora_t as the references (the fp64 reference t, rounded).
    no_t = torch.zeros(M, r, dtype=torch.float64)
    (_, t64), _ = ref_single(*hi[:5], scaling, p, seed, hi[5], no_t)
    lora_t = t64.to(dtype)
    grads = torch.ops.fastpeft.lora_linear_backward(goc, xc, wc, ac, bbc, lora_t.to(CUDA),
                                                    scaling, p, seed_t, ALL_MASK)

    fwd64, grads64 = ref_single(*hi[:5], scaling, p, seed, hi[5], lora_t.double())
    fwd_plain, grads_plain = ref_single(xc, wc, bc, ac, bbc, scaling, p, seed, goc,
                                        lora_t.to(CUDA))
    check_all((y, t), fwd64, fwd_plain, ("y", "t"))
    check_all(grads, grads64, grads_plain, GRAD_NAMES)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M,K,N,r", [(37, 64, 48, 16), (300, 577, 129, 70), (0, 33, 17, 5)])
def test_lora_linear_same_mask_as_cpu_kernel(M, K, N, r, p):
    """fp64 on both devices: the CUDA kernels and the CPU kernels agree to rounding, so the
    same seed tensor draws the same dropout mask forward and backward."""
    x, w, b, a, bb, go = single_inputs(M, K, N, r, seed=1)
    seed_t = torch.tensor([987654321], dtype=torch.int64)
    y_cpu, t_cpu = torch.ops.fastpeft.lora_linear(x, w, b, a, bb, 0.5, p, seed_t)
    y_cuda, t_cuda = torch.ops.fastpeft.lora_linear(
        *(v.to(CUDA) for v in (x, w, b, a, bb)), 0.5, p, seed_t)
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(t_cuda.cpu(), t_cpu, rtol=1e-9, atol=1e-9)
    g_cpu = torch.ops.fastpeft.lora_linear_backward(go, x, w, a, bb, t_cpu, 0.5, p, seed_t,
                                                    ALL_MASK)
    g_cuda = torch.ops.fastpeft.lora_linear_backward(
        *(v.to(CUDA) for v in (go, x, w, a, bb, t_cpu)), 0.5, p, seed_t, ALL_MASK)
    for name, gc, gg in zip(GRAD_NAMES, g_cpu, g_cuda):
        torch.testing.assert_close(gg.cpu(), gc, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_dropout_mask_is_the_reference_mask(dtype):
    """With A = identity rows, t is dropout(x) itself: compare it with the reference mask."""
    M, K = 33, 9
    x = torch.randn(M, K, dtype=torch.float64).to(dtype)
    a = torch.eye(K, dtype=dtype)
    w, bb = torch.zeros(4, K, dtype=dtype), torch.zeros(4, K, dtype=dtype)
    p, seed = 0.5, 42
    _, t = torch.ops.fastpeft.lora_linear(x.to(CUDA), w.to(CUDA), None, a.to(CUDA),
                                          bb.to(CUDA), 1.0, p, torch.tensor([seed]))
    keep = reference.philox_keep_mask(seed, (M, K), p)
    assert torch.equal(t.cpu() != 0, keep & (x != 0))
    torch.testing.assert_close(t.cpu().double(), (x.double() * keep / (1 - p)).to(dtype).double())


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_backward_output_mask(p):
    M, K, N, r = 19, 40, 24, 4
    x, w, b, a, bb, go = (v.float().to(CUDA) for v in single_inputs(M, K, N, r, seed=2))
    seed_t = torch.tensor([7])
    _, t = torch.ops.fastpeft.lora_linear(x, w, b, a, bb, 0.5, p, seed_t)
    full = torch.ops.fastpeft.lora_linear_backward(go, x, w, a, bb, t, 0.5, p, seed_t, ALL_MASK)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = torch.ops.fastpeft.lora_linear_backward(go, x, w, a, bb, t, 0.5, p, seed_t, mask)
        for j in range(5):
            if j == i:
                torch.testing.assert_close(part[j], full[j], rtol=1e-5, atol=1e-5)
            else:
                assert part[j].numel() == 0 and part[j].device.type == "cuda", (i, j)


def test_lora_linear_non_contiguous_inputs():
    M, K, N, r = 21, 50, 30, 6
    x, w, b, a, bb, go = (v.float() for v in single_inputs(M, K, N, r, seed=3))
    seed_t = torch.tensor([11])
    y_ref, t_ref = torch.ops.fastpeft.lora_linear(*(v.to(CUDA) for v in (x, w, b, a, bb)),
                                                  2.0, 0.1, seed_t)
    w_nc = w.t().contiguous().to(CUDA).t()
    a_nc = a.t().contiguous().to(CUDA).t()
    x_nc = torch.stack([x, x], dim=2).reshape(M, 2 * K).to(CUDA)[:, ::2]  # == x, strided
    assert not (w_nc.is_contiguous() or a_nc.is_contiguous() or x_nc.is_contiguous())
    y, t = torch.ops.fastpeft.lora_linear(x_nc, w_nc, b.to(CUDA), a_nc, bb.to(CUDA), 2.0, 0.1,
                                          seed_t)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(t, t_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_autograd_on_cuda(dtype, p):
    """The public functional op (autograd through the backward op) on CUDA vs the reference."""
    x, w, b, a, bb, go = single_inputs(37, 577, 129, 7, seed=4)
    x = x.reshape(37, 577)
    low = [v.to(dtype).to(CUDA) for v in (x, w, b, a, bb, go)]
    leaves = [low[0].requires_grad_(), low[3].requires_grad_(), low[4].requires_grad_()]
    torch.manual_seed(5)
    y = lora_linear(low[0], low[1], low[2], low[3], low[4], 2.0, p)
    grads = torch.autograd.grad(y, leaves, low[5])
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64)) if p > 0 else 0
    hi = [v.detach().double().cpu() for v in low]
    no_t64 = torch.zeros(37, 7, dtype=torch.float64)
    (y64, t64), g64 = ref_single(*hi[:5], 2.0, p, seed, hi[5], no_t64)
    lo = [v.detach() for v in low]
    no_t = torch.zeros(37, 7, dtype=dtype, device=CUDA)
    (yp, tp), gp = ref_single(*lo[:5], 2.0, p, seed, lo[5], no_t)
    check_all([y.detach()], [y64], [yp], ["y"])
    # grad_lora_b uses t: the references' own t.
    g64 = (g64[0], g64[3], 2.0 * (hi[5].T @ t64))
    gp = (gp[0], gp[3], 2.0 * (lo[5].T @ tp))
    check_all(grads, g64, gp, ("grad_x", "grad_lora_a", "grad_lora_b"))


def test_lora_linear_bad_inputs_raise():
    x = torch.randn(4, 8, device=CUDA)
    w, a = torch.randn(5, 8, device=CUDA), torch.randn(2, 8, device=CUDA)
    bb = torch.randn(5, 2, device=CUDA)
    seed_t = torch.tensor([1])
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 CPU tensor"):
        torch.ops.fastpeft.lora_linear(x, w, None, a, bb, 1.0, 0.1, seed_t.to(CUDA))
    with pytest.raises(RuntimeError, match="lora_a must have dtype"):
        torch.ops.fastpeft.lora_linear(x, w, None, a.half(), bb, 1.0, 0.1, seed_t)
    with pytest.raises(RuntimeError, match="lora_b must be"):
        torch.ops.fastpeft.lora_linear(x, w, None, a, bb.t().contiguous(), 1.0, 0.1, seed_t)
    with pytest.raises(RuntimeError, match="weight must be on"):
        torch.ops.fastpeft.lora_linear(x, w.cpu(), None, a, bb, 1.0, 0.1, seed_t)


def test_lora_linear_opcheck():
    x, w, b, a, bb, go = (v.float().to(CUDA) for v in single_inputs(6, 12, 9, 3, seed=6))
    seed_t = torch.tensor([4])
    for p in (0.0, 0.2):
        opcheck(torch.ops.fastpeft.lora_linear.default,
                (x.clone().requires_grad_(), w, b, a.clone().requires_grad_(),
                 bb.clone().requires_grad_(), 2.0, p, seed_t))
        opcheck(torch.ops.fastpeft.lora_linear.default, (x, w, None, a, bb, 2.0, p, seed_t))
        _, t = torch.ops.fastpeft.lora_linear(x, w, b, a, bb, 2.0, p, seed_t)
        for mask in (ALL_MASK, [False, False, False, True, True],
                     [True, False, False, True, False]):
            opcheck(torch.ops.fastpeft.lora_linear_backward.default,
                    (go, x, w, a, bb, t, 2.0, p, seed_t, mask))


# ------------------------------------------------------------------------------------------
# lora_linear_multi

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r,n", MULTI_SHAPES)
def test_lora_linear_multi_matches_contract(M, K, N, r, n, dtype):
    x, w, b, a, bb, go, s, ids = multi_inputs(M, K, N, r, n)
    low = [v.to(dtype) for v in (x, w, b, a, bb, go)]
    hi = [v.double() for v in low]
    xc, wc, bc, ac, bbc, goc = [v.to(CUDA) for v in low]
    sc, idc = s.to(CUDA), ids.to(CUDA)

    y, t = torch.ops.fastpeft.lora_linear_multi(xc, wc, bc, ac, bbc, sc, idc)
    (_, t64), _ = ref_multi(*hi[:5], s, ids, hi[5], torch.zeros(M, r, dtype=torch.float64))
    lora_t = t64.to(dtype)
    grads = torch.ops.fastpeft.lora_linear_multi_backward(goc, xc, wc, ac, bbc, sc, idc,
                                                          lora_t.to(CUDA), ALL_MASK)
    fwd64, grads64 = ref_multi(*hi[:5], s, ids, hi[5], lora_t.double())
    fwd_plain, grads_plain = ref_multi(xc, wc, bc, ac, bbc, s, idc, goc, lora_t.to(CUDA))
    check_all((y, t), fwd64, fwd_plain, ("y", "t"))
    if M:
        assert (t[idc == -1] == 0).all()
    check_all(grads, grads64, grads_plain, GRAD_NAMES)


@pytest.mark.parametrize("M,K,N,r,n",
                         [(37, 64, 48, 16, 3), (300, 577, 129, 70, 4), (0, 9, 5, 2, 2)])
def test_lora_linear_multi_matches_cpu_kernel(M, K, N, r, n):
    x, w, b, a, bb, go, s, ids = multi_inputs(M, K, N, r, n, seed=1)
    y_cpu, t_cpu = torch.ops.fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids)
    y_cuda, t_cuda = torch.ops.fastpeft.lora_linear_multi(
        *(v.to(CUDA) for v in (x, w, b, a, bb, s, ids)))
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(t_cuda.cpu(), t_cpu, rtol=1e-9, atol=1e-9)
    g_cpu = torch.ops.fastpeft.lora_linear_multi_backward(go, x, w, a, bb, s, ids, t_cpu, ALL_MASK)
    g_cuda = torch.ops.fastpeft.lora_linear_multi_backward(
        *(v.to(CUDA) for v in (go, x, w, a, bb, s, ids, t_cpu)), ALL_MASK)
    for name, gc, gg in zip(GRAD_NAMES, g_cpu, g_cuda):
        torch.testing.assert_close(gg.cpu(), gc, rtol=1e-9, atol=1e-9, msg=name)


def test_lora_linear_multi_all_base_rows():
    """Every id -1: y is the base layer, t and the adapter gradients are zero."""
    x, w, b, a, bb, go, s, _ = multi_inputs(10, 20, 12, 4, 2, seed=2)
    ids = torch.full((10,), -1, dtype=torch.int64)
    args = [v.float().to(CUDA) for v in (x, w, b, a, bb)]
    y, t = torch.ops.fastpeft.lora_linear_multi(*args, s.to(CUDA), ids.to(CUDA))
    torch.testing.assert_close(y, args[0] @ args[1].T + args[2])
    assert (t == 0).all()
    grads = torch.ops.fastpeft.lora_linear_multi_backward(
        go.float().to(CUDA), args[0], args[1], args[3], args[4], s.to(CUDA), ids.to(CUDA), t,
        ALL_MASK)
    torch.testing.assert_close(grads[0], go.float().to(CUDA) @ args[1])
    assert (grads[3] == 0).all() and (grads[4] == 0).all()


def test_lora_linear_multi_backward_output_mask():
    x, w, b, a, bb, go, s, ids = (v.to(CUDA) for v in multi_inputs(19, 40, 24, 4, 3, seed=3))
    x, w, b, a, bb, go = (v.float() for v in (x, w, b, a, bb, go))
    _, t = torch.ops.fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids)
    full = torch.ops.fastpeft.lora_linear_multi_backward(go, x, w, a, bb, s, ids, t, ALL_MASK)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = torch.ops.fastpeft.lora_linear_multi_backward(go, x, w, a, bb, s, ids, t, mask)
        for j in range(5):
            if j == i:
                torch.testing.assert_close(part[j], full[j], rtol=1e-5, atol=1e-5)
            else:
                assert part[j].numel() == 0, (i, j)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_multi_autograd_on_cuda(dtype):
    x, w, b, a, bb, go, s, ids = multi_inputs(45, 577, 129, 7, 3, seed=4)
    low = [v.to(dtype).to(CUDA) for v in (x, w, b, a, bb, go)]
    leaves = [low[0].requires_grad_(), low[3].requires_grad_(), low[4].requires_grad_()]
    y = lora_linear_multi(low[0], low[1], low[2], low[3], low[4], s.to(CUDA), ids.to(CUDA))
    grads = torch.autograd.grad(y, leaves, low[5])
    hi = [v.detach().double().cpu() for v in low]
    (y64, t64), g64 = ref_multi(*hi[:5], s, ids, hi[5], torch.zeros(45, 7, dtype=torch.float64))
    (_, _), g64 = ref_multi(*hi[:5], s, ids, hi[5], t64)
    lo = [v.detach() for v in low]
    no_t = torch.zeros(45, 7, dtype=dtype, device=CUDA)
    (yp, tp), _ = ref_multi(*lo[:5], s, ids.to(CUDA), lo[5], no_t)
    (_, _), gp = ref_multi(*lo[:5], s, ids.to(CUDA), lo[5], tp)
    check_all([y.detach()], [y64], [yp], ["y"])
    check_all(grads, (g64[0], g64[3], g64[4]), (gp[0], gp[3], gp[4]),
              ("grad_x", "grad_lora_a", "grad_lora_b"))


def test_lora_linear_multi_opcheck():
    x, w, b, a, bb, go, s, ids = multi_inputs(6, 10, 8, 3, 2, seed=5)
    x, w, b, a, bb, go = (v.float().to(CUDA) for v in (x, w, b, a, bb, go))
    s, ids = s.to(CUDA), ids.to(CUDA)
    opcheck(torch.ops.fastpeft.lora_linear_multi.default,
            (x.clone().requires_grad_(), w, b, a.clone().requires_grad_(),
             bb.clone().requires_grad_(), s, ids))
    opcheck(torch.ops.fastpeft.lora_linear_multi.default, (x, w, None, a, bb, s, ids))
    _, t = torch.ops.fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids)
    for mask in (ALL_MASK, [False, False, False, True, True], [True, True, True, False, False]):
        opcheck(torch.ops.fastpeft.lora_linear_multi_backward.default,
                (go, x, w, a, bb, s, ids, t, mask))
