"""Triton kernels of fastpeft (lora_linear). Nothing here imports triton at package import
time; call register() (after fastpeft._C is loaded) to install the Triton implementations
of fastpeft::lora_linear_triton / lora_linear_triton_backward for CPU (interpreter) and CUDA.
"""


def available() -> bool:
    """Whether triton imports (the kernels need it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def register() -> None:
    """Register the Triton host functions as the kernels of the fastpeft::*_triton ops."""
    from fastpeft.ops.triton.lora_linear import register as _register

    _register()


__all__ = ["available", "register"]
