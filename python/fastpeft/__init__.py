"""fastpeft: fast parameter-efficient fine-tuning and RLHF with fused kernels."""

from fastpeft import ops
from fastpeft._ext import build_info
from fastpeft.io import load_adapter, save_adapter
from fastpeft.patching import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapter,
    get_nb_trainable_parameters,
    merge,
    patch,
    print_trainable_parameters,
    set_adapter,
    unmerge,
    unpatch,
)
from fastpeft.tuners import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    load_config,
)
from fastpeft.tuners.lora import add_weighted_adapter

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig",
    "IA3Config",
    "LoraConfig",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "__version__",
    "active_adapters",
    "add_adapter",
    "add_weighted_adapter",
    "build_info",
    "delete_adapter",
    "disable_adapter",
    "get_nb_trainable_parameters",
    "load_adapter",
    "load_config",
    "merge",
    "ops",
    "patch",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "unmerge",
    "unpatch",
]
