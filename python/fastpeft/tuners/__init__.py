"""PEFT methods: configs and the adapter-carrying layers."""

from fastpeft.tuners.config import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    TunerConfig,
    load_config,
)

__all__ = [
    "AdapterConfig",
    "IA3Config",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "TunerConfig",
    "load_config",
]
