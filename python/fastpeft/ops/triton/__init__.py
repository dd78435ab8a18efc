"""Triton kernels of fastpeft, one module per op (lora_linear, ia3_linear, adapter_bottleneck,
prefix_attention; gemm.py holds the fused GEMM kernels the linear ops share). Nothing here
imports triton at package import time; each module's register() (called by the "triton"
backend, after fastpeft._C is loaded) installs the Triton implementations of
fastpeft::<op>_triton / <op>_triton_backward for CPU (interpreter) and CUDA.
"""


def available() -> bool:
    """Whether triton imports (the kernels need it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


OPS = ("lora_linear", "ia3_linear", "adapter_bottleneck", "prefix_attention")


def register() -> None:
    """Register the Triton host functions as the kernels of every fastpeft::*_triton op."""
    import importlib

    for op in OPS:
        importlib.import_module(f"fastpeft.ops.triton.{op}").register()


__all__ = ["available", "register"]
