"""Which implementation the functional ops use: set_backend / get_backend / use_backend."""

import contextlib
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "reference", "triton", "cpp")

# "auto" on CUDA: the implementation to use per op, "cuda" (C++) or "triton", whichever
# bench/bench_<op>.py --device cuda (`make gpu-check`) measures faster. None has been timed on a
# GPU yet. Until then: the cuBLAS-based C++ paths for the GEMM ops, and for prefix_attention
# the Triton flash kernel (its designed CUDA path: it walks prefix and keys from two pointers,
# GQA without expanding heads; the C++ path merges two ATen attention calls by log-sum-exp).
CUDA_AUTO_CHOICE = {"lora_linear": "cuda", "lora_linear_multi": "cuda", "ia3_linear": "cuda",
                    "adapter_bottleneck": "cuda", "prefix_attention": "triton"}

_current = "auto"


def set_backend(name: str) -> None:
    """Select the implementation of every fastpeft op.

    "auto": the C++ kernels on the CPU; on CUDA the faster of CUDA C++ and Triton per op.
    "reference": the pure-PyTorch reference (ops/reference.py), the ground truth.
    "triton": the Triton kernels (on the CPU only under TRITON_INTERPRET=1); ops that have
        no Triton kernel (the losses) run their C++ kernels.
    "cpp": the C++ kernels (CPU, or CUDA C++ on a GPU), whatever "auto" would pick.
    """
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: `with use_backend("reference"): ...` restores the previous backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def implementation(op: str, device: torch.device) -> str:
    """"reference", "cpp" (CPU or CUDA C++ kernels) or "triton" for this op on this device."""
    if _current != "auto":
        return _current
    if device.type == "cuda" and CUDA_AUTO_CHOICE.get(op) == "triton":
        return "triton"
    return "cpp"
