"""Save and load adapters in Hugging Face peft's on-disk format: a directory holding
`adapter_config.json` and `adapter_model.safetensors` (see docs/adapter_format.md).

Tensor keys are peft's: `base_model.model.<module path>.<param>` with the adapter name removed
(`...q_proj.lora_A.weight`, DoRA's `...lora_magnitude_vector`, IA3's `...k_proj.ia3_l`, a
modules_to_save copy as the module's own key `base_model.model.lm_head.weight`), and
`prompt_embeddings` for the prompt-learning methods.
"""

from __future__ import annotations

import json
import os
import uuid
import torch
from safetensors.torch import load_file, save
from torch import nn

from fastpeft.patching import add_adapter, delete_adapter, is_patched, patch, state_of, unpatch
from fastpeft.tuners.base import ModulesToSave, TunerLayer
from fastpeft.tuners.config import CONFIG_NAME, TunerConfig, load_config

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN_NAME = "adapter_model.bin"  # what peft writes with safe_serialization=False
PROMPT_KEY = "prompt_embeddings"

# A model class name suffix -> the peft task_type written when the config has none, so that
# peft.PeftModel.from_pretrained builds the matching PeftModelFor<Task>.
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str | list[str] | None = None
) -> list[str]:
    """Write adapters of a patched model in peft's format.

    As peft's `save_pretrained`: the adapter named "default" goes into `directory` itself, any
    other adapter `name` into `directory/name/`. Each directory gets `adapter_model.safetensors`
    and then `adapter_config.json`, each written to a temporary file and renamed over the old
    one, so a crash never leaves a half-written file.

    Args:
        model: A model patched by `fastpeft.patch` (or `load_adapter`).
        directory: Where to write; created if missing.
        adapter_name: One adapter name or a list of them; default every adapter of the model.

    Returns:
        The directories written, one per adapter.
    """
    state = state_of(model)
    if adapter_name is None:
        names = list(state.configs)
    else:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    unknown = [n for n in names if n not in state.configs]
    if unknown or not names:
        raise ValueError(f"adapter_name: unknown adapter(s) {unknown or names}; the model has "
                         f"{list(state.configs)}")
    written = []
    for name in names:
        if name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"adapter_name: {name!r} cannot name a sub-directory")
        out = os.fspath(directory) if name == "default" else os.path.join(directory, name)
        os.makedirs(out, exist_ok=True)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous()
                   for k, v in adapter_state_dict(model, name).items()}
        config = json.dumps(_config_to_save(model, name), indent=2, sort_keys=True) + "\n"
        _write_atomic(os.path.join(out, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
        _write_atomic(os.path.join(out, CONFIG_NAME), config.encode())
        written.append(out)
    return written


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_base_mismatch: bool = False,
) -> nn.Module:
    """Load an adapter written by peft or by `save_adapter` into `model`.

    A bare model is patched from the directory's `adapter_config.json` (the adapter becomes
    active); on an already patched model the adapter is added next to the others and, as in
    peft's `load_adapter`, not activated (`fastpeft.set_adapter(model, adapter_name)`). Then the
    weights are loaded from `adapter_model.safetensors` (or peft's `adapter_model.bin`). Every
    key must name a parameter of the new adapter and every such parameter must be in the file,
    with the model's shape; on any error the model is left as it was.

    The config's `base_model_name_or_path` is checked against the model's `name_or_path` when
    both are set: they match when equal, when they are the same file-system path, or when
    their last path components are equal (a hub id `org/name` and a local `.../name`). A
    mismatch is an error unless `allow_base_mismatch=True`.

    Args:
        model: A Hugging Face model, bare or patched.
        directory: The adapter directory (a local path).
        adapter_name: The name the adapter gets in the model.
        is_trainable: Whether the adapter trains (else it is loaded for inference, as peft's
            `is_trainable=False`, and its parameters stay frozen).
        allow_base_mismatch: Load even if the adapter was saved from another base model.

    Returns:
        The model (patched in place).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: missing (an adapter directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config = load_config(config_path)
    weights_path, tensors = _read_weights(directory)
    was_patched = is_patched(model)
    if was_patched and adapter_name in state_of(model).configs:
        raise ValueError(f"adapter_name: the model already has an adapter {adapter_name!r}; "
                         "pass another adapter_name (or delete_adapter it first)")
    if was_patched and config.peft_type != state_of(model).peft_type:
        raise ValueError(f"{config_path}: peft_type is {config.peft_type}, but the model carries "
                         f"{state_of(model).peft_type} adapters (one method per model)")
    _check_base_model(config, model, config_path, allow_base_mismatch)
    config = config.replace(inference_mode=not is_trainable)
    try:
        if was_patched:
            add_adapter(model, config, adapter_name)
        else:
            patch(model, config, adapter_name)
    except ValueError as e:
        raise ValueError(f"{config_path}: does not fit {type(model).__name__}: {e}") from e
    try:
        _load_tensors(model, adapter_name, tensors, weights_path)
    except BaseException:
        if was_patched:
            delete_adapter(model, adapter_name)
        else:
            unpatch(model)
        raise
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys peft saves them with (live tensors, not copies)."""
    tensors = _checkpoint_tensors(model, adapter_name)
    if PROMPT_KEY in tensors:
        from fastpeft.tuners import prompt

        tensors[PROMPT_KEY] = prompt.prompt_embeddings_to_save(model, adapter_name)
    return tensors


def _checkpoint_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """checkpoint key -> the live parameter or buffer it is saved from and loaded into (for
    prompt learning, `prompt_embeddings` -> None: the prompt module computes and takes it)."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; the model has "
                         f"{list(state.configs)}")
    config = state.configs[adapter_name]
    # peft's keys: PeftModel.base_model is a tuner wrapping the HF model (".model."), except for
    # prompt learning, whose base_model is the HF model itself.
    prefix = "base_model." if config.is_prompt_learning else "base_model.model."
    out: dict[str, torch.Tensor | None] = {}
    owned: set[int] = set()  # every adapter's tensors (of any adapter), for bias="all"
    for path, m in model.named_modules():
        if isinstance(m, TunerLayer):
            for attr in m.adapter_attrs:
                for name, item in getattr(m, attr).items():
                    for sub, t in _entries(item):
                        owned.add(id(t))
                        if name == adapter_name:
                            out[prefix + _saved_key(path, attr, sub)] = t
            if getattr(config, "bias", "none") == "lora_only" and adapter_name in m.adapters:
                if m.base_layer.bias is not None:
                    out[prefix + _join(path, "base_layer.bias")] = m.base_layer.bias
        elif isinstance(m, ModulesToSave):
            for name, copy in m.modules_to_save.items():
                for key, t in copy.state_dict(keep_vars=True).items():
                    owned.add(id(t))
                    if name == adapter_name:
                        out[prefix + _join(path, key)] = t
    if getattr(config, "bias", "none") == "all":
        for key, t in model.state_dict(keep_vars=True).items():
            if key.endswith(".bias") and id(t) not in owned:
                out[prefix + key] = t
    if config.is_prompt_learning:
        out[PROMPT_KEY] = None
    return out


def _entries(item: nn.Module | torch.Tensor):
    """(name inside the adapter's entry, tensor): "" for a ParameterDict entry."""
    if isinstance(item, torch.Tensor):
        yield "", item
    else:
        yield from item.state_dict(keep_vars=True).items()


def _saved_key(path: str, attr: str, sub: str) -> str:
    """The live `<path>.<attr>.<adapter>.<sub>` without the adapter name; DoRA's magnitude
    (live `lora_magnitude_vector.<adapter>.weight`) is saved without `.weight`, as peft does."""
    if attr == "lora_magnitude_vector" and sub == "weight":
        sub = ""
    return _join(path, attr, sub)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _load_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor],
                  weights_path: str) -> None:
    expected = _checkpoint_tensors(model, adapter_name)
    shapes = {k: tuple(t.shape) for k, t in expected.items() if t is not None}
    if PROMPT_KEY in expected:
        from fastpeft.tuners import prompt

        shapes[PROMPT_KEY] = tuple(prompt.prompt_embeddings_to_save(model, adapter_name).shape)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{weights_path}: {len(unknown)} key(s) match no parameter of the "
                         f"adapter the config describes: {_few(unknown)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{weights_path}: {len(missing)} key(s) the model's adapter needs are "
                         f"missing: {_few(missing)}")
    for key, t in sorted(tensors.items()):
        if tuple(t.shape) != shapes[key]:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(t.shape)}, the model "
                             f"expects {shapes[key]}")
    with torch.no_grad():
        for key, live in expected.items():
            if live is None:
                prompt.load_prompt_embeddings(model, adapter_name, tensors[key])
            else:
                live.copy_(tensors[key].to(device=live.device, dtype=live.dtype))


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _read_weights(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return path, load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    bin_path = os.path.join(directory, WEIGHTS_BIN_NAME)
    if os.path.isfile(bin_path):
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{bin_path}: not a readable torch state dict ({e})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor)
                                                    for t in tensors.values()):
            raise ValueError(f"{bin_path}: expected a dict of tensors, "
                             f"got {type(tensors).__name__}")
        return bin_path, tensors
    raise FileNotFoundError(f"{path}: missing (nor is there a {WEIGHTS_BIN_NAME})")


def model_name_or_path(model: nn.Module) -> str | None:
    """The model's `name_or_path` (where from_pretrained loaded it), or None when unknown."""
    for value in (model.__dict__.get("name_or_path"),
                  getattr(getattr(model, "config", None), "_name_or_path", None)):
        if value:
            return str(value)
    return None


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    from fastpeft.models import is_default_model

    if is_default_model(a) and is_default_model(b):  # an alias and the directory it loads
        return True
    if os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b):
        return True
    last = [os.path.basename(os.path.normpath(x.replace("\\", "/"))) for x in (a, b)]
    return bool(last[0]) and last[0] == last[1]


def _check_base_model(config: TunerConfig, model: nn.Module, config_path: str,
                      allow_mismatch: bool) -> None:
    saved, current = config.base_model_name_or_path, model_name_or_path(model)
    if saved and current and not allow_mismatch and not _same_base(saved, current):
        raise ValueError(
            f"{config_path}: base_model_name_or_path is {saved!r}, but the model is "
            f"{current!r}; pass allow_base_mismatch=True to load it anyway"
        )


def _config_to_save(model: nn.Module, adapter_name: str) -> dict:
    """The adapter's config as peft writes it: inference_mode True, the base model's name, a
    task_type from the model class when unset, fan_in_fan_out for Conv1D (GPT-2) layers, and
    module-name lists sorted (peft keeps them as sets)."""
    state = state_of(model)
    config = state.configs[adapter_name]
    d = config.to_dict()
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):
        if isinstance(d.get(key), list):
            d[key] = sorted(d[key])
    d["inference_mode"] = True
    d["base_model_name_or_path"] = config.base_model_name_or_path or model_name_or_path(model)
    if d.get("task_type") is None:
        cls = type(model).__name__
        d["task_type"] = next((t for suffix, t in _TASK_TYPES if cls.endswith(suffix)), None)
    if "fan_in_fan_out" in d and any(
        isinstance(m, TunerLayer) and m.fan_in_fan_out and adapter_name in m.adapters
        for m in model.modules()
    ):
        d["fan_in_fan_out"] = True
    return d


def _write_atomic(path: str, data: bytes) -> None:
    """Write `data` to a new temporary file next to `path`, then rename it over `path`."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
