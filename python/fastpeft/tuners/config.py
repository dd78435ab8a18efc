"""Configs of the PEFT methods, with Hugging Face peft's field names and defaults.

Each config is a dataclass; `to_dict()` is what `adapter_config.json` holds, and `load_config`
builds the right class from a peft config object, a dict, an adapter_config.json file or a
directory holding one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"

# Keys peft writes that carry no meaning for fastpeft (bookkeeping, or off by default).
_IGNORED_PEFT_KEYS = {
    "peft_version", "auto_mapping", "megatron_core", "megatron_config", "qalora_group_size",
    "init_weights", "loftq_config",
    "ensure_weight_tying", "layer_replication", "num_transformer_submodules",
}


@dataclass
class TunerConfig:
    """Fields every method shares (peft's PeftConfig)."""

    peft_type: ClassVar[str] = ""
    is_prompt_learning: ClassVar[bool] = False

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["peft_type"] = self.peft_type
        return dict(sorted(d.items()))

    def save(self, directory: str | os.PathLike) -> str:
        """Write `adapter_config.json` into `directory`; returns the file's path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    def replace(self, **changes: Any) -> TunerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_peft(cls, peft_config: Any) -> TunerConfig:
        """This method's config from a peft config object (or a dict)."""
        return _checked(cls, load_config(peft_config))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TunerConfig:
        """This method's config from an adapter_config.json file or its directory."""
        return _checked(cls, load_config(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


@dataclass
class LoraConfig(TunerConfig):
    """LoRA (and rsLoRA, DoRA): `W x + (lora_alpha / r) * B A dropout(x)`."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        self.target_modules = _as_targets(self.target_modules)
        self.exclude_modules = _as_targets(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """(r, lora_alpha) for the module at `key`, after rank_pattern / alpha_pattern."""
        from fastpeft.tuners.targets import pattern_value

        r = pattern_value(self.rank_pattern, key, self.r)
        alpha = pattern_value(self.alpha_pattern, key, self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (r**0.5 if self.use_rslora else r)


@dataclass
class IA3Config(TunerConfig):
    """IA3: learned scaling of the keys, the values and the feed-forward input."""

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.target_modules = _as_targets(self.target_modules)
        self.feedforward_modules = _as_targets(self.feedforward_modules)
        self.exclude_modules = _as_targets(self.exclude_modules)


ADAPTER_KINDS = ("houlsby", "pfeiffer")


@dataclass
class AdapterConfig(TunerConfig):
    """Bottleneck adapters (AdapterHub's Houlsby and Pfeiffer). peft has none: fastpeft writes
    them with peft_type "BOTTLENECK_ADAPTER" in the same two files.

    kind "houlsby" puts one adapter after the attention output projection and one after the
    MLP's; "pfeiffer" only after the MLP's. Each acts on the projection's output h (width out):
    `h + scaling * up(act(down(h)))` with `down` [max(1, int(out / reduction_factor)), out].
    activation defaults as AdapterHub's: "swish" for Houlsby, "relu" for Pfeiffer. The up
    projection starts near zero (std init_std normal, as AdapterHub's "bert" init draws both,
    with zero biases) so a new adapter is almost identity.
    `target_modules` overrides where the adapters go (the output projections they follow).
    """

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    kind: str = "houlsby"
    reduction_factor: int | float = 16
    activation: str | None = None
    scaling: float = 1.0
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_std: float = 1e-2

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        _check_positive_number("reduction_factor", self.reduction_factor)
        _check_number("scaling", self.scaling)
        _check_number("init_std", self.init_std)
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")
        if self.activation is None:
            self.activation = "swish" if self.kind == "houlsby" else "relu"
        from fastpeft.ops.reference import canonical_activation

        canonical_activation(self.activation)  # raises ValueError naming the choices
        self.target_modules = _as_targets(self.target_modules)


@dataclass
class PromptLearningConfig(TunerConfig):
    """Fields of the virtual-token methods; the model-shaped ones are filled in by patch()."""

    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (and P-tuning v2 with prefix_projection=False): trained keys and values
    prepended in every attention layer."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None  # "zero": the prefix starts at zero (peft's option)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f'init_weights must be None or "zero", got {self.init_weights!r}')


PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: trained virtual-token embeddings prepended to the input.

    prompt_tuning_init "TEXT" starts the virtual tokens at the embeddings of
    prompt_tuning_init_text, tokenized by tokenizer_name_or_path: a name or directory for
    transformers' AutoTokenizer (with tokenizer_kwargs), or a tokenizer object (saved as its
    name_or_path)."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(
                f"prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, "
                f"got {self.prompt_tuning_init!r}"
            )
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError('prompt_tuning_init="TEXT" needs prompt_tuning_init_text')
        if self.prompt_tuning_init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError(
                'prompt_tuning_init="TEXT" needs tokenizer_name_or_path (a tokenizer name, '
                f"directory or object), got {self.tokenizer_name_or_path!r}"
            )
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError(
                'tokenizer_kwargs is only used with prompt_tuning_init="TEXT", '
                f"got prompt_tuning_init={self.prompt_tuning_init!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            d["tokenizer_name_or_path"] = getattr(tokenizer, "name_or_path", None) or None
        elif tokenizer is not None:
            d["tokenizer_name_or_path"] = os.fspath(tokenizer)
        return d


@dataclass
class PTuningConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings produced by an MLP or LSTM encoder (peft's
    PromptEncoderConfig, peft_type "P_TUNING")."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                "encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                f"got {self.encoder_reparameterization_type!r}"
            )


CONFIG_CLASSES: dict[str, type[TunerConfig]] = {
    cls.peft_type: cls
    for cls in (LoraConfig, IA3Config, AdapterConfig, PrefixTuningConfig, PromptTuningConfig,
                PTuningConfig)
}


def config_from_dict(d: dict[str, Any], source: str = "config") -> TunerConfig:
    """Build the config named by d["peft_type"]; a key fastpeft does not know is an error when
    it is set to anything but its off value, so an adapter is never loaded half-understood."""
    peft_type = d.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(
            f"{source}: peft_type must be one of {sorted(CONFIG_CLASSES)}, got {peft_type!r}"
        )
    cls = CONFIG_CLASSES[peft_type]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unsupported = {}, []
    for key, value in d.items():
        if key == "peft_type":
            continue
        value = getattr(value, "value", value)  # peft enums (task_type)
        if key in names:
            kwargs[key] = list(value) if isinstance(value, (set, tuple)) else value
        elif key not in _IGNORED_PEFT_KEYS and value not in (None, False, {}, [], ""):
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(
            f"{source}: {cls.__name__} in fastpeft does not support {', '.join(unsupported)}"
        )
    return cls(**kwargs)


def load_config(source: Any) -> TunerConfig:
    """A config from a fastpeft config (returned as is), a peft config object, a dict, an
    adapter_config.json path or a directory holding one."""
    if isinstance(source, TunerConfig):
        return source
    if isinstance(source, dict):
        return config_from_dict(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such adapter config file")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return config_from_dict(d, source=path)
    if hasattr(source, "to_dict") and hasattr(source, "peft_type"):  # a peft config object
        return config_from_dict(source.to_dict(), source=type(source).__name__)
    raise ValueError(
        "config must be a fastpeft config, a peft config, a dict or a path to "
        f"adapter_config.json, got {type(source).__name__}"
    )


def _as_targets(value: Any) -> list[str] | str | None:
    """peft's rule: a str is a regex (or "all-linear"); any other iterable is a list of names."""
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")


def _check_positive_number(name: str, value: Any) -> None:
    _check_number(name, value)
    if value <= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _checked(cls: type[TunerConfig], config: TunerConfig) -> TunerConfig:
    if not isinstance(config, cls):
        raise ValueError(f"expected a {cls.peft_type} config, got peft_type {config.peft_type}")
    return config
