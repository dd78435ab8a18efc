"""fastpeft: fast parameter-efficient fine-tuning and RLHF with fused kernels."""

from fastpeft._ext import build_info
from fastpeft import ops

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "__version__"]
