"""Which modules of a model a config targets: peft's matching rules."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

# peft's default layers_pattern candidates: the name of the ModuleList holding the blocks.
LAYER_PATTERNS = ("layers", "h", "layer", "block", "blocks")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (GPT-2's linear with a transposed [in, out] weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(key: str, targets: str | Iterable[str]) -> bool:
    """A str is a regex matched against the whole module path; a list matches a name exactly or
    a path ending in "." + name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def layer_index(key: str, layers_pattern: str | Iterable[str] | None = None) -> int | None:
    """The block index in a path like "model.layers.3.self_attn.q_proj", or None."""
    if layers_pattern is None:
        patterns = LAYER_PATTERNS
    elif isinstance(layers_pattern, str):
        patterns = (layers_pattern,)
    else:
        patterns = tuple(layers_pattern)
    for pattern in patterns:
        m = re.match(rf"(?:.*\.)?{pattern}\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    return None


def pattern_value(patterns: dict, key: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first pattern matching the end of key."""
    for pattern, value in patterns.items():
        if re.match(rf"(?:.*\.)?(?:{pattern})$", key):
            return value
    return default


def output_layer_names(model: nn.Module) -> set[str]:
    """Paths of the output embedding (lm_head), which "all-linear" leaves out like peft."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    if out is None:
        return set()
    return {name for name, m in model.named_modules() if m is out}


def find_targets(
    model: nn.Module,
    targets: str | list[str],
    exclude: str | list[str] | None = None,
    layers_to_transform: list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Paths of the linear modules the config targets, in model order. "all-linear" is every
    nn.Linear / Conv1D (or adapter layer already wrapping one) but the output layer. Modules
    inside an adapter layer (its base layer, lora_A, ...) are never targets, as in peft."""
    from fastpeft.tuners.base import TunerLayer

    skip = set(skip)
    adapter_layers = [k for k, m in model.named_modules() if isinstance(m, TunerLayer)]
    all_linear = targets == "all-linear"
    if all_linear:
        skip |= output_layer_names(model)
    found = []
    for key, module in model.named_modules():
        if not key or key in skip or any(key.startswith(s + ".") for s in skip):
            continue
        if any(key.startswith(a + ".") for a in adapter_layers):
            continue
        if all_linear:
            if not (is_linear(module) or isinstance(module, TunerLayer)):
                continue
        elif not matches(key, targets):
            continue
        if exclude is not None and matches(key, exclude):
            continue
        if layers_to_transform is not None:
            idx = layer_index(key, layers_pattern)
            if idx is None or idx not in layers_to_transform:
                continue
        found.append(key)
    return found
