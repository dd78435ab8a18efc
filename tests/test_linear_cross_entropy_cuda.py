"""linear_cross_entropy's CUDA kernel (csrc/cuda/linear_cross_entropy.cu) against the fp64
reference, plain PyTorch in the kernel's dtype on CUDA setting the tolerance; the CPU kernel's
result; opcheck; bad labels. Skipped without a GPU."""

import pytest
import torch
from torch.library import opcheck

from fastpeft.ops import linear_cross_entropy, reference
from _harness import compare_with_reference
from test_linear_cross_entropy import SHAPES, _fn, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,d,v,chunk", SHAPES + [((300,), 128, 32768, 128)])
def test_matches_reference(lead, d, v, chunk, dtype):
    hidden, weight, labels = make_inputs(lead, d, v, dtype, device="cuda")
    out = compare_with_reference(_fn(linear_cross_entropy), _fn(reference.linear_cross_entropy),
                                 [hidden, weight, labels], [-100, chunk],
                                 torch.tensor(1.7, dtype=torch.float64, device="cuda"), dtype)
    assert out[0].device.type == "cuda"


@pytest.mark.parametrize("lead", [(6,), (0,)])
def test_all_ignored_is_zero_with_zero_grads(lead):
    hidden, weight, labels = make_inputs(lead, 8, 577, torch.float32, ignore_frac=1.0,
                                         device="cuda")
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert not gh.any() and not gw.any()


def test_fp64_matches_cpu_kernel():
    hidden, weight, labels = make_inputs((2, 33), 24, 1531, torch.float64)
    cpu = linear_cross_entropy(hidden, weight, labels, chunk_size=7)
    gcpu = torch.autograd.grad(cpu, (hidden, weight))
    h, w = (t.detach().cuda().requires_grad_() for t in (hidden, weight))
    gpu = linear_cross_entropy(h, w, labels.cuda(), chunk_size=7)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(gpu, (h, w)), gcpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    h, w, lab = make_inputs((7,), 6, 31, dtype, device="cuda")
    opcheck(torch.ops.fastpeft.linear_cross_entropy.default, (h, w, lab, -100, 3, [True, True]))


def test_bad_labels_raise_in_cpp():
    h, w, lab = make_inputs((4,), 8, 11, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 11\) or ignore_index"):
        linear_cross_entropy(h, w, torch.tensor([0, 11, 1, 1], device="cuda"))
    with pytest.raises(ValueError, match=r"labels must be on cuda:0 like hidden, got cpu"):
        linear_cross_entropy(h, w, lab.cpu())
