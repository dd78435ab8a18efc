"""The YAML config of a `fastpeft sft|rm|ppo|dpo` run, validated key by key.

```yaml
model: smollm2-135m           # an alias, a local Hugging Face directory or a hub id
method: lora                  # lora | ia3 | adapter | prefix | prompt | ptuning | full
peft: {r: 8, lora_alpha: 16}  # fields of the method's config class (LoraConfig, ...)
data: {train: examples/data/alpaca.jsonl, max_length: 256}
train: {output_dir: out/sft, max_steps: 20, lr: 2.0e-4}   # TrainConfig
rm: {...}    # RewardConfig, `fastpeft rm` only
dpo: {...}   # DPOConfig, `fastpeft dpo` only
ppo: {...}   # PPOConfig, `fastpeft ppo` only
```

`load_run_config(path, command, overrides)` reads the file, applies `dotted.key=value`
overrides (values parsed as YAML scalars or lists), and checks every key against the
dataclasses that own it: an unknown key is an error naming the full dotted key and the closest
valid one; a value of the wrong type names the key, the expected type and the value. The
defaults live only in those dataclasses (TrainConfig, the tuner configs, the stage configs).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from fastpeft.train.config import DPOConfig, PPOConfig, RewardConfig, TrainConfig
from fastpeft.tuners.config import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    TunerConfig,
)

METHODS: dict[str, type[TunerConfig] | None] = {
    "lora": LoraConfig, "ia3": IA3Config, "adapter": AdapterConfig,
    "prefix": PrefixTuningConfig, "prompt": PromptTuningConfig, "ptuning": PTuningConfig,
    "full": None,  # full fine-tuning: no adapters, every parameter trains
}
# The stage block each command reads (sft has none).
STAGES: dict[str, tuple[str, type] | None] = {
    "sft": None, "rm": ("rm", RewardConfig), "dpo": ("dpo", DPOConfig),
    "ppo": ("ppo", PPOConfig),
}
STAGE_BLOCKS = ("rm", "dpo", "ppo")
TOP_LEVEL = ("model", "method", "peft", "data", "train", *STAGE_BLOCKS)

# Names other trainers (transformers, TRL, axolotl) use for the same settings: the suggestion
# for an unknown key checks these before spelling similarity.
SYNONYMS = {
    "train": {
        "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
        "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
        "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
        "gradient_accumulation": "grad_accum", "lr_scheduler_type": "scheduler",
        "lr_scheduler": "scheduler", "save_steps": "save_every", "eval_steps": "eval_every",
        "logging_steps": "log_every", "save_total_limit": "keep_last", "warmup": "warmup_steps",
        "resume_from_checkpoint": "resume", "max_grad_norm_clip": "max_grad_norm",
        "steps": "max_steps", "out_dir": "output_dir", "output": "output_dir",
        "precision": "dtype", "torch_dtype": "dtype",
    },
    "data": {
        "max_seq_length": "max_length", "max_seq_len": "max_length", "seq_len": "max_length",
        "sequence_len": "max_length", "train_file": "train", "dataset": "train",
        "eval_file": "eval", "validation": "eval", "val": "eval", "sample_packing": "packing",
    },
    "peft": {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "target": "target_modules"},
    "": {"model_name_or_path": "model", "base_model": "model", "peft_method": "method",
         "dataset": "data", "training": "train", "lora": "peft"},
}


class ConfigError(ValueError):
    """A config that cannot run: the message names the file (or the command-line override),
    the dotted key and what is wrong."""


@dataclass
class DataConfig:
    """The `data:` block. train / eval: a local json / jsonl / parquet / csv file, a dataset
    folder or a hub id (see docs/data.md). format: one of fastpeft.data.FORMATS, or None to
    detect it from the first row. max_length truncates (and bounds packed rows); packing
    (SFT only) packs examples best-fit into rows of max_length tokens. skip_invalid skips
    malformed rows (counted and logged) instead of stopping."""

    train: str | None = None
    eval: str | None = None
    format: str | None = None
    max_length: int | None = None
    packing: bool = False
    skip_invalid: bool = False

    def __post_init__(self):
        from fastpeft.data import FORMATS

        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"data.format: {self.format!r} is not one of {FORMATS} (or null "
                             "to detect it)")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"data.max_length must be >= 1 or null, got {self.max_length!r}")
        if self.packing and self.max_length is None:
            raise ValueError("data.packing needs data.max_length (the length of a packed row)")


@dataclass
class RunConfig:
    """A validated run: what `fastpeft <command>` trains, with every default filled in."""

    command: str
    model: str
    method: str = "lora"
    peft: TunerConfig | None = None  # None for method "full"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: Any = None  # RewardConfig / DPOConfig / PPOConfig, or None for sft
    source: str = "<config>"

    def to_dict(self) -> dict:
        """The resolved config as a YAML-ready dict; load_run_config reads it back to the same
        RunConfig."""
        d: dict[str, Any] = {"model": self.model, "method": self.method}
        if self.peft is not None:
            d["peft"] = {f.name: _plain(getattr(self.peft, f.name))
                         for f in dataclasses.fields(self.peft)}
        d["data"] = _plain(dataclasses.asdict(self.data))
        d["train"] = _plain(self.train.to_dict())
        if self.stage is not None:
            d[STAGES[self.command][0]] = _plain(self.stage.to_dict())
        return d

    def to_yaml(self) -> str:
        return (f"# fastpeft {self.command}: the resolved config of this run (from "
                f"{self.source}, defaults filled in)\n"
                + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))


def _plain(value: Any) -> Any:
    """Tuples -> lists (recursively), tokenizer objects -> their name: what safe_dump writes."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "name_or_path", None) or str(value)


# ---- reading --------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`dotted.key=value` -> (key, value); the value is read as YAML (1e-4, true, null,
    [a, b] ...), a string when it is not valid YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys (model:, method:, train: ...), "
                          f"got {type(data).__name__}")
    return data


def load_run_config(path: str | None, command: str, overrides: list[str] = (),
                    data: dict | None = None) -> RunConfig:
    """The RunConfig of `fastpeft <command>` from a YAML file (or the dict `data`), after
    `dotted.key=value` overrides. Raises ConfigError naming the file and the key."""
    if command not in STAGES:
        raise ConfigError(f"command must be one of {list(STAGES)}, got {command!r}")
    source = path or "<config>"
    raw = read_yaml(path) if data is None else _copy(data)
    sources: dict[str, str] = {}  # dotted key -> where its value came from, for messages
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value, text)
        sources[key] = f"override {text!r}"
    return _build(raw, command, _Where(source, sources))


class _Where:
    """Names where a key's value came from: the file, or the override that set it."""

    def __init__(self, path: str, overrides: dict[str, str]):
        self.path, self.overrides = path, overrides

    def __call__(self, key: str) -> str:
        for k, src in self.overrides.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return src
        return self.path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self(key)}: {message}")


def _copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy(v) for v in d]
    return d


def _set_dotted(raw: dict, key: str, value: Any, text: str) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {text!r}: '{where}' is not a block (its value is "
                              f"{nxt!r})")
        node = nxt
    node[parts[-1]] = value


def _suggest(key: str, valid: list[str], block: str) -> str:
    name = key.rsplit(".", 1)[-1]
    prefix = key[: -len(name)]
    synonym = SYNONYMS.get(block, {}).get(name.lower())
    if synonym in valid:
        return f"; did you mean '{prefix}{synonym}'?"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if not close:  # a shortened or lengthened name: "warmup" for "warmup_steps"
        close = [v for v in valid if len(min(v, name, key=len)) >= 3
                 and (v.startswith(name) or name.startswith(v))][:1]
    if not close:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.4)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + v for v in valid)}"


def _check_keys(block: dict, valid: list[str], prefix: str, where: _Where,
                synonyms: str) -> None:
    for key in block:
        if key not in valid:
            dotted = f"{prefix}{key}"
            raise where.error(dotted, f"unknown key '{dotted}'"
                              + _suggest(dotted, valid, synonyms))


def _block(raw: dict, name: str, where: _Where) -> dict:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error(name, f"'{name}' must be a block of keys (a mapping), got {value!r}")
    return value


def _build(raw: dict, command: str, where: _Where) -> RunConfig:
    _check_keys(raw, list(TOP_LEVEL), "", where, "")
    stage = STAGES[command]
    for name in STAGE_BLOCKS:
        if raw.get(name) is not None and (stage is None or stage[0] != name):
            other = {"rm": "fastpeft rm", "dpo": "fastpeft dpo", "ppo": "fastpeft ppo"}[name]
            raise where.error(name, f"the '{name}:' block belongs to `{other}`, not to "
                              f"`fastpeft {command}`; remove it (or run {other})")

    model = raw.get("model")
    if model is None:
        raise where.error("model", "missing key 'model' (an alias such as smollm2-135m, a "
                          "local Hugging Face directory or a hub id)")
    if not isinstance(model, str) or not model:
        raise where.error("model", f"model: expected a string (an alias, a directory or a hub "
                          f"id), got {model!r}")

    method = raw.get("method", "lora")
    if method not in METHODS:
        close = difflib.get_close_matches(str(method).lower(), list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise where.error("method", f"method: {method!r} is not one of {list(METHODS)}{hint}")

    peft_cls = METHODS[method]
    peft_raw = _block(raw, "peft", where)
    if peft_cls is None:
        if peft_raw:
            raise where.error("peft", "method 'full' trains every parameter and takes no "
                              f"'peft:' block, got keys {sorted(peft_raw)}")
        peft = None
    else:
        peft = _dataclass(peft_cls, peft_raw, "peft", where, "peft")

    data_raw = _block(raw, "data", where)
    data = _dataclass(DataConfig, data_raw, "data", where, "data")
    if data.train is None:
        raise where.error("data.train", "missing key 'data.train' (a jsonl / json / parquet / "
                          "csv file, a dataset folder or a hub id)")
    if data.packing and command != "sft":
        raise where.error("data.packing", f"data.packing is for `fastpeft sft` only, not "
                          f"`fastpeft {command}`")

    train = _dataclass(TrainConfig, _block(raw, "train", where), "train", where, "train")
    stage_config = None
    if stage is not None:
        name, cls = stage
        stage_config = _dataclass(cls, _block(raw, name, where), name, where, name)
        if name == "ppo" and stage_config.reward_fn is None and stage_config.reward_model is None:
            # The library also takes a Python callable; from a config file there is none.
            raise where.error("ppo", "ppo: set ppo.reward_fn (\"file.py:function\") or "
                              "ppo.reward_model (a directory written by `fastpeft rm`)")
    return RunConfig(command=command, model=model, method=method, peft=peft, data=data,
                     train=train, stage=stage_config, source=where.path)


def _dataclass(cls: type, block: dict, prefix: str, where: _Where, synonyms: str):
    """cls(**block) after checking every key and value type; the class's own validation
    (__post_init__) errors come back as ConfigErrors naming the file."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    _check_keys(block, list(fields), prefix + ".", where, synonyms)
    kwargs = {}
    for key, value in block.items():
        dotted = f"{prefix}.{key}"
        ok, converted = _coerce(value, hints[key])
        if not ok:
            raise where.error(dotted, f"{dotted}: expected {_type_name(hints[key])}, got "
                              f"{value!r} ({type(value).__name__})")
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        # The tuner configs name the field without its block ("r must be ..."): add it.
        key = next((k for k in fields if re.match(rf"({re.escape(prefix)}\.)?{k}\b", msg)),
                   None)
        if key is not None and not msg.startswith(prefix + "."):
            msg = f"{prefix}.{msg}"
        elif key is None and not msg.startswith(prefix):
            msg = f"{prefix}: {msg}"
        raise where.error(f"{prefix}.{key}" if key else prefix, msg) from None


# ---- types ----------------------------------------------------------------------------------

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, strict: bool = False) -> tuple[bool, Any]:
    """(fits, value converted) for a YAML value against a type hint. ints fit floats; a
    string such as "1e-4" (what YAML 1.1 makes of it) fits a float unless strict; bool is not
    a number."""
    if tp is Any:
        return True, value
    if tp is type(None) or tp is None:
        return value is None, value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for strict_pass in (True, False):
            for arg in args:
                ok, converted = _coerce(value, arg, strict_pass)
                if ok:
                    return True, converted
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(v, args[0] if args else Any, strict)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            return False, value
        if args and args[-1] is not Ellipsis:
            items = args
        else:
            items = [args[0] if args else Any] * len(value)
        out = []
        for v, a in zip(value, items):
            ok, c = _coerce(v, a, strict)
            if not ok:
                return False, value
            out.append(c)
        return True, tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            ok_k, ck = _coerce(k, kt, strict)
            ok_v, cv = _coerce(v, vt, strict)
            if not (ok_k and ok_v):
                return False, value
            out[ck] = cv
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            if strict and not isinstance(value, float):
                return False, value  # an int fits an `int | float` hint as an int
            return True, float(value)
        if not strict and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if tp is type(None) or tp is None:
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else (
            f"a list ({', '.join(_type_name(a) for a in args)})")
    if origin is dict:
        if not args:
            return "a mapping"
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return {bool: "a bool (true / false)", int: "an int", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {str: "strings", int: "ints", float: "numbers", bool: "bools"}.get(
        tp, f"({_type_name(tp)})")


def key_reference() -> dict[str, list[tuple[str, str, Any]]]:
    """(key, type, default) of every block's keys, for docs/cli.md and `--help`."""
    def rows(cls, skip=()):
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name in skip:
                continue
            default = (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else None)
            out.append((f.name, _type_name(hints[f.name]), default))
        return out

    ref = {"data": rows(DataConfig), "train": rows(TrainConfig), "rm": rows(RewardConfig),
           "dpo": rows(DPOConfig), "ppo": rows(PPOConfig)}
    for method, cls in METHODS.items():
        if cls is not None:
            ref[f"peft ({method}: {cls.__name__})"] = rows(cls)
    return ref


__all__ = ["METHODS", "ConfigError", "DataConfig", "RunConfig", "key_reference",
           "load_run_config", "parse_override", "read_yaml"]
