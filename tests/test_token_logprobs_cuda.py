"""The CUDA kernels of token_logprobs (csrc/cuda/token_logprobs.cu) against the fp64 reference,
with plain PyTorch in the kernel's dtype on CUDA setting the tolerance (tests/_tolerance.py);
opcheck; bad inputs. Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

import fastpeft  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from fastpeft.ops import reference, token_logprobs
from _tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, V): one warp per row (V <= 512), 128 / 256 / 512 threads; V odd (scalar loads) and a
# multiple of 8 (vector loads); N = 1 and 0.
SHAPES = [(37, 64), (1, 577), (0, 33), (6, 1531), (5, 4099), (3, 49152), (2, 50257), (4, 1),
          (9, 7)]


def run(fn, logits, tokens, temperature, entropy, grads):
    """logp (and entropy) and the logits' gradient for upstream grads (gl, gh)."""
    x = logits.detach().clone().requires_grad_(True)
    if entropy:
        logp, ent = fn(x, tokens, temperature, True)
        outs, gouts = [logp, ent], list(grads)
    else:
        logp = fn(x, tokens, temperature)
        outs, gouts = [logp], [grads[0]]
    if x.numel():
        (g,) = torch.autograd.grad(outs, [x], gouts)
    else:
        g = torch.zeros_like(x)
    return [o.detach() for o in outs], g


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_matches_reference(n, v, dtype, temperature, entropy):
    g = torch.Generator().manual_seed(0)
    logits64 = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, v, (n,), generator=g)
    gl, gh = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
                                                                           dtype=torch.float64)
    outs, grad = run(token_logprobs, logits64.to(CUDA, dtype), tokens.to(CUDA), temperature,
                     entropy, (gl.to(CUDA, dtype), gh.to(CUDA, dtype)))
    ref_outs, ref_grad = run(reference.token_logprobs, logits64, tokens, temperature, entropy,
                             (gl, gh))
    plain_outs, plain_grad = run(reference.token_logprobs, logits64.to(CUDA, dtype),
                                 tokens.to(CUDA), temperature, entropy,
                                 (gl.to(CUDA, dtype), gh.to(CUDA, dtype)))
    for name, o, r, p in zip(["logp", "entropy"], outs, ref_outs, plain_outs):
        assert o.device.type == "cuda" and o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o.double()).all(), name
        assert_close_to_reference(o.cpu(), r, p.cpu(), name)
    assert grad.dtype == dtype and grad.shape == ref_grad.shape
    assert_close_to_reference(grad.cpu(), ref_grad, plain_grad.cpu(), "grad_logits")


def test_matches_the_cpu_kernel_in_fp64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 3001, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 3001, (7,), generator=g)
    cpu = torch.ops.fastpeft.token_logprobs(logits, tokens, 0.8, True)
    gpu = torch.ops.fastpeft.token_logprobs(logits.to(CUDA), tokens.to(CUDA), 0.8, True)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-10, rtol=1e-10)
    gl, gh = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    bwd = torch.ops.fastpeft.token_logprobs_backward
    torch.testing.assert_close(
        bwd(gl.to(CUDA), gh.to(CUDA), logits.to(CUDA), tokens.to(CUDA), gpu[2], 0.8).cpu(),
        bwd(gl, gh, logits, tokens, cpu[2], 0.8), atol=1e-12, rtol=1e-10)


def test_minus_inf_logits_and_unaligned_rows():
    logits = torch.randn(5, 1029, device=CUDA)  # V not a multiple of 4: the scalar path
    logits[:, 100:900] = float("-inf")
    tokens = torch.randint(0, 100, (5,), device=CUDA)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, tokens, 1.0, True)
    (logp.sum() + ent.sum()).backward()
    x64 = logits.double().cpu().masked_fill(logits.cpu().isinf(), -1e5).requires_grad_(True)
    lp64, h64 = reference.token_logprobs(x64, tokens.cpu(), 1.0, True)
    (lp64.sum() + h64.sum()).backward()
    torch.testing.assert_close(logp.double().cpu(), lp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), h64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=1e-6, rtol=1e-5)


def test_out_of_range_token_gives_nan_row_on_cuda():
    logits = torch.randn(3, 50, device=CUDA)
    logp = token_logprobs(logits, torch.tensor([1, 50, 2], device=CUDA))
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()


def test_peak_memory_below_half_of_log_softmax_gather():
    logits = torch.randn(4, 256, 8192, device=CUDA, requires_grad=True)
    tokens = torch.randint(0, 8192, (4, 256), device=CUDA)

    def peak(fn):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    unfused = peak(lambda: torch.log_softmax(logits, -1).gather(-1, tokens[..., None]))
    fused = peak(lambda: token_logprobs(logits, tokens))
    assert fused <= 0.5 * unfused, (fused, unfused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entropy", [False, True])
def test_opcheck(dtype, entropy):
    logits = torch.randn(5, 37, device=CUDA, dtype=dtype)
    tokens = torch.randint(0, 37, (5,), device=CUDA)
    opcheck(torch.ops.fastpeft.token_logprobs.default, (logits, tokens, 0.8, entropy))
    _, _, stats = torch.ops.fastpeft.token_logprobs(logits, tokens, 0.8, True)
    ge = torch.randn(5, device=CUDA, dtype=dtype) if entropy else None
    opcheck(torch.ops.fastpeft.token_logprobs_backward.default,
            (torch.randn(5, device=CUDA, dtype=dtype), ge, logits, tokens, stats, 0.8))


def test_bad_inputs_on_cuda():
    logits = torch.randn(4, 10, device=CUDA)
    with pytest.raises(ValueError, match=r"tokens must be on cuda:0 like logits, got cpu"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"logits must have dtype one of .* got torch.float64"):
        token_logprobs(logits.double(), torch.zeros(4, dtype=torch.int64, device=CUDA))
    with pytest.raises(RuntimeError, match=r"tokens must be on cuda:0 like logits, got cpu"):
        torch.ops.fastpeft.token_logprobs(logits, torch.zeros(4, dtype=torch.int64), 1.0, False)
