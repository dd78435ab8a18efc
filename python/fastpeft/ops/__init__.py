"""fastpeft's functional ops (fused kernels registered as torch.ops.fastpeft.*)."""

from fastpeft.ops import reference
from fastpeft.ops._backend import get_backend, set_backend, use_backend
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.lora_linear_multi import lora_linear_multi

__all__ = [
    "get_backend",
    "lora_linear",
    "lora_linear_multi",
    "reference",
    "set_backend",
    "use_backend",
]
