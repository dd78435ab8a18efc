"""linear_token_logprobs' CUDA kernel (csrc/cuda/linear_cross_entropy.cu) against the fp64
reference, plain PyTorch in the kernel's dtype on CUDA setting the tolerance; the CPU kernel's
result; opcheck; bad tokens. Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import linear_token_logprobs, reference
from _harness import compare_with_reference
from test_linear_token_logprobs import SHAPES, _fn, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d,v,chunk", SHAPES + [((300,), 128, 32768, 128)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(lead, d, v, chunk, dtype, temperature):
    hidden, weight, tokens = make_inputs(lead, d, v, dtype, device="cuda")
    grad_out = torch.randn(lead, dtype=torch.float64, device="cuda")
    compare_with_reference(_fn(linear_token_logprobs), _fn(reference.linear_token_logprobs),
                           [hidden, weight, tokens], [temperature, chunk], grad_out, dtype)


def test_fp64_matches_cpu_kernel():
    hidden, weight, tokens = make_inputs((2, 33), 24, 1531, torch.float64)
    g = torch.randn(2, 33, dtype=torch.float64)
    cpu = linear_token_logprobs(hidden, weight, tokens, 0.8, chunk_size=7)
    gcpu = torch.autograd.grad(cpu, (hidden, weight), g)
    h, w = (t.detach().cuda().requires_grad_() for t in (hidden, weight))
    gpu = linear_token_logprobs(h, w, tokens.cuda(), 0.8, chunk_size=7)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(gpu, (h, w), g.cuda()), gcpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    h, w, tok = make_inputs((7,), 6, 31, dtype, device="cuda")
    opcheck(torch.ops.fastpeft.linear_token_logprobs.default, (h, w, tok, 0.9, 3))


def test_bad_tokens_raise_in_cpp():
    h, w, _ = make_inputs((4,), 8, 11, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, 11\), got -100"):
        linear_token_logprobs(h, w, torch.tensor([0, -100, 1, 1], device="cuda"))
