"""fastpeft.patch(model, config): add adapters to a live Hugging Face model in place, and the
functions that manage them afterwards (add / set / delete / disable, merge, unpatch)."""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastpeft.tuners.base import ModulesToSave, TunerLayer
from fastpeft.tuners.config import CONFIG_CLASSES, TunerConfig, load_config
from fastpeft.tuners.families import Family, family_of
from fastpeft.tuners.targets import find_targets, matches

# peft_type -> (module, class) of the layer that carries that method's adapters.
LAYER_CLASSES = {
    "LORA": ("fastpeft.tuners.lora", "LoraLinear"),
    "IA3": ("fastpeft.tuners.ia3", "IA3Linear"),
    "BOTTLENECK_ADAPTER": ("fastpeft.tuners.bottleneck", "BottleneckAdapter"),
}


@dataclass
class ForwardContext:
    """Per-forward settings the adapter layers read: the adapter of each batch row (the mixed
    batch of `model(..., adapter_ids=...)`), as indices into `adapter_order`, or None. It stays
    set until the next forward, so a gradient-checkpointing recompute sees the same rows."""

    adapter_order: list[str] = field(default_factory=list)
    row_adapter_ids: torch.Tensor | None = None
    generate_adapter_ids: Any = None


@dataclass
class PatchState:
    """What patch() did to a model: kept on the model as `model._fastpeft`."""

    family: Family
    peft_type: str
    configs: dict[str, TunerConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: bool = False
    ctx: ForwardContext = field(default_factory=ForwardContext)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    original_generate: Any = None  # an instance-level generate patch() replaced, if any

    @property
    def is_prompt_learning(self) -> bool:
        return CONFIG_CLASSES[self.peft_type].is_prompt_learning


def state_of(model: nn.Module) -> PatchState:
    state = getattr(model, "_fastpeft", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched: call fastpeft.patch(model, config)")
    return state


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_fastpeft", None) is not None


def patch(model: nn.Module, config: Any, adapter_name: str = "default",
          fused_loss: bool = True) -> nn.Module:
    """Add adapter `adapter_name` described by `config` (a fastpeft or peft config, a dict, or
    an adapter_config.json path) to the Hugging Face `model` in place, freeze everything else,
    make it the active adapter, and return the model.

    With fused_loss (default), a causal LM's training loss (`model(..., labels=...)` in train
    mode) comes from the fused linear_cross_entropy op and the output has logits=None; pass
    fused_loss=False to keep the model's own loss and logits."""
    config = load_config(config)
    if is_patched(model):
        add_adapter(model, config, adapter_name)
        set_adapter(model, adapter_name)
        return model
    family = family_of(model)
    state = PatchState(family=family, peft_type=config.peft_type)
    state.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.__dict__["_fastpeft"] = state  # a plain attribute: not a submodule, not in state_dict
    try:
        add_adapter(model, config, adapter_name)
    except Exception:
        _unload(model, keep_modules_to_save=False)
        raise
    # Neither the hook nor the generate wrapper closes over the model, so a deepcopy of the
    # patched model carries working copies of both.
    model.register_forward_pre_hook(_pre_forward, with_kwargs=True, prepend=True)
    if hasattr(model, "generate"):
        state.original_generate = model.__dict__.get("generate")
        model.__dict__["generate"] = types.MethodType(_generate_with_adapter_ids, model)
    set_adapter(model, adapter_name)
    if fused_loss:
        swap_causal_lm_loss(model)
    return model


def swap_causal_lm_loss(model: nn.Module) -> bool:
    """Route the causal-LM loss through the fused linear_cross_entropy op, so that in training
    `model(input_ids, labels=...)` never materializes the full logits (see fused_loss.py).
    Returns False for models that are not causal LMs (classifiers keep their own loss)."""
    from fastpeft import fused_loss

    return fused_loss.install(model)


def add_adapter(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Add another adapter of the model's method (not made active: see set_adapter)."""
    state = state_of(model)
    config = load_config(config)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r}")
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first")
    if config.peft_type != state.peft_type:
        raise ValueError(
            f"the model carries {state.peft_type} adapters; one model takes adapters of one "
            f"method, got a {config.peft_type} config for {adapter_name!r}"
        )
    config = config.replace()  # our own copy: defaults get filled in below
    try:
        for key in config.modules_to_save or []:  # first, so that no adapter layer targets them
            _add_module_to_save(model, key, adapter_name)
        if config.is_prompt_learning:
            from fastpeft.tuners import prompt

            prompt.add_adapter(model, state, adapter_name, config)
        else:
            _add_layer_adapter(model, state, adapter_name, config)
    except Exception:
        for m in _layers(model):  # leave no half-added adapter behind
            m.delete_adapter(adapter_name)
        _drop_empty_wrappers(model)
        raise
    state.configs[adapter_name] = config
    state.ctx.adapter_order = list(state.configs)
    _mark_trainable(model, state)


def _default_targets(config: TunerConfig, family: Family) -> None:
    """Fill target_modules (and IA3's feedforward_modules) from the family, as peft does."""
    if config.peft_type == "LORA" and config.target_modules is None:
        config.target_modules = list(family.lora_targets)
    elif config.peft_type == "IA3":
        if config.target_modules is None:
            config.target_modules = list(family.ia3_targets)
        if config.feedforward_modules is None:
            config.feedforward_modules = list(family.ia3_feedforward)
    elif config.peft_type == "BOTTLENECK_ADAPTER" and config.target_modules is None:
        outs = [family.adapter_mlp_out]
        if config.kind == "houlsby":
            outs.insert(0, family.adapter_attention_out)
        config.target_modules = "|".join(f"(?:{o})" for o in outs)


def _add_layer_adapter(model: nn.Module, state: PatchState, name: str, config: TunerConfig) -> None:
    _default_targets(config, state.family)
    module_name, class_name = LAYER_CLASSES[config.peft_type]
    layer_cls = getattr(importlib.import_module(module_name), class_name)
    keys = find_targets(
        model,
        config.target_modules,
        exclude=getattr(config, "exclude_modules", None),
        layers_to_transform=getattr(config, "layers_to_transform", None),
        layers_pattern=getattr(config, "layers_pattern", None),
        skip=_modules_to_save_paths(model),
    )
    if not keys:
        linear = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules()
                         if isinstance(m, (nn.Linear, TunerLayer)) or type(m).__name__ == "Conv1D"})
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of "
            f"{type(model).__name__}; its linear modules are named {linear}"
        )
    for key in keys:
        module = model.get_submodule(key)
        if isinstance(module, TunerLayer):
            layer = module
        else:
            if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                raise ValueError(
                    f"target module {key!r} is a {type(module).__name__}; fastpeft adapts "
                    "nn.Linear and transformers' Conv1D layers"
                )
            layer = layer_cls(module)
            layer.__dict__["_fastpeft_ctx"] = state.ctx
            model.set_submodule(key, layer)
        layer.update_layer(name, config, key)


def _modules_to_save_paths(model: nn.Module) -> list[str]:
    return [k for k, m in model.named_modules() if isinstance(m, ModulesToSave)]


def _add_module_to_save(model: nn.Module, target: str, adapter_name: str) -> None:
    keys = [k for k, m in model.named_modules()
            if k and matches(k, [target]) and not isinstance(m, (TunerLayer, ModulesToSave))
            and ".original_module" not in k and ".modules_to_save." not in k]
    if not keys:
        raise ValueError(f"modules_to_save entry {target!r} matched no module of {type(model).__name__}")
    for key in keys:
        module = model.get_submodule(key)
        parent_key = key.rsplit(".", 1)[0] if "." in key else ""
        parent = model.get_submodule(parent_key) if parent_key else model
        if isinstance(parent, ModulesToSave):
            parent.add(adapter_name)
            continue
        wrapper = ModulesToSave(module)
        wrapper.add(adapter_name)
        model.set_submodule(key, wrapper)


def _drop_empty_wrappers(model: nn.Module) -> None:
    """Put back the plain module where a wrapper holds no adapter any more."""
    for key, m in list(model.named_modules()):
        if isinstance(m, TunerLayer) and not m.adapters:
            model.set_submodule(key, m.base_layer)
        elif isinstance(m, ModulesToSave) and not len(m.modules_to_save):
            model.set_submodule(key, m.original_module)


def _layers(model: nn.Module) -> Iterator[TunerLayer | ModulesToSave]:
    for m in model.modules():
        if isinstance(m, (TunerLayer, ModulesToSave)):
            yield m


def _mark_trainable(model: nn.Module, state: PatchState) -> None:
    """Only the active adapters train (and their modules_to_save copies, and biases as LoRA's
    `bias` says); everything else is frozen, as in peft."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in state.active:
        config = state.configs[name]
        if config.inference_mode:
            continue
        for m in _layers(model):
            if isinstance(m, ModulesToSave):
                if name in m.modules_to_save:
                    m.modules_to_save[name].requires_grad_(True)
            else:
                for p in m.adapter_parameters(name):
                    p.requires_grad_(True)
        bias = getattr(config, "bias", "none")
        for m in model.modules():
            if bias == "all" and getattr(m, "bias", None) is not None and isinstance(m.bias, nn.Parameter):
                m.bias.requires_grad_(True)
            elif bias == "lora_only" and isinstance(m, TunerLayer) and m.base_layer.bias is not None:
                m.base_layer.bias.requires_grad_(True)
        if config.is_prompt_learning:
            from fastpeft.tuners import prompt

            for p in prompt.adapter_parameters(model, name):
                p.requires_grad_(True)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make `adapter_name` (or, for LoRA, IA3 and bottleneck adapters, a list of names applied
    together: LoRA deltas add up, IA3 vectors multiply, bottleneck adapters run in sequence)
    the active adapter(s); only those train."""
    state = state_of(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    missing = [n for n in names if n not in state.configs]
    if missing or not names:
        raise ValueError(f"unknown adapter(s) {missing or names}; the model has {list(state.configs)}")
    if len(names) > 1 and state.is_prompt_learning:
        raise ValueError(
            f"only one {state.peft_type} adapter can be active at a time, got {names}"
        )
    state.active = names
    for m in _layers(model):
        m.set_adapter(names)
    _mark_trainable(model, state)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter's parameters everywhere; deleting the active one leaves the next."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(state.configs)}")
    if len(state.configs) == 1:
        raise ValueError(f"{adapter_name!r} is the only adapter; use fastpeft.unpatch(model)")
    for m in _layers(model):
        m.delete_adapter(adapter_name)
    _drop_empty_wrappers(model)
    if state.is_prompt_learning:
        from fastpeft.tuners import prompt

        prompt.delete_adapter(model, state, adapter_name)
    del state.configs[adapter_name]
    state.ctx.adapter_order = list(state.configs)
    active = [n for n in state.active if n != adapter_name] or [next(iter(state.configs))]
    set_adapter(model, active)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """`with fastpeft.disable_adapter(model):` runs the base model (adapters off)."""
    state = state_of(model)
    previous = state.disabled
    flags = [(m, m.disabled) for m in _layers(model)]
    state.disabled = True
    for m, _ in flags:
        m.disabled = True
    try:
        yield model
    finally:
        state.disabled = previous
        for m, was in flags:
            m.disabled = was


def merge(model: nn.Module, adapter_names: list[str] | None = None, unload: bool = True) -> nn.Module:
    """Fold LoRA / DoRA / IA3 adapters (default: the active ones) into the base weights.
    With unload=True (default) the adapter modules are then removed and a plain model is
    returned (peft's merge_and_unload); with unload=False they stay, merged, until unmerge()."""
    state = state_of(model)
    if state.is_prompt_learning or not all(
        m.mergeable for m in _layers(model) if isinstance(m, TunerLayer)
    ):
        raise ValueError(f"{state.peft_type} adapters cannot be merged into the base weights")
    names = adapter_names if adapter_names is not None else state.active
    for m in _layers(model):
        if isinstance(m, TunerLayer):
            m.merge(names)
    if unload:
        return _unload(model, keep_modules_to_save=True)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge(..., unload=False): subtract the merged adapters from the base weights."""
    state_of(model)
    for m in _layers(model):
        if isinstance(m, TunerLayer):
            m.unmerge()
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the original modules (and requires_grad flags)."""
    return _unload(unmerge(model), keep_modules_to_save=False)


def _unload(model: nn.Module, keep_modules_to_save: bool) -> nn.Module:
    """Replace adapter layers by their base layers, and modules_to_save wrappers by the
    active trained copy (keep_modules_to_save) or the original; undo hooks and flags."""
    state = state_of(model)
    for key, m in list(model.named_modules()):
        if isinstance(m, TunerLayer):
            model.set_submodule(key, m.base_layer)
        elif isinstance(m, ModulesToSave):
            keep = m.current() if keep_modules_to_save and not state.disabled else m.original_module
            model.set_submodule(key, keep)
    if state.is_prompt_learning:
        from fastpeft.tuners import prompt

        prompt.remove(model, state)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _pre_forward:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    from fastpeft import fused_loss

    fused_loss.uninstall(model)
    if state.original_generate is None:
        model.__dict__.pop("generate", None)
    else:
        model.__dict__["generate"] = state.original_generate
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, True))
    del model.__dict__["_fastpeft"]
    return model


def _row_adapter_ids(state: PatchState, adapter_ids: Any, batch: int | None) -> torch.Tensor | None:
    """adapter_ids as a LongTensor of indices into the model's adapters (-1 = base model): given
    as adapter names per row ("__base__" for none) or as such indices."""
    if adapter_ids is None:
        return None
    order = state.ctx.adapter_order
    if isinstance(adapter_ids, torch.Tensor):
        ids = adapter_ids.to(torch.long).flatten()
    else:
        ids = []
        for a in adapter_ids:
            if a == "__base__" or a is None:
                ids.append(-1)
            elif a in order:
                ids.append(order.index(a))
            else:
                raise ValueError(f"adapter_ids names unknown adapter {a!r}; the model has {order}")
        ids = torch.tensor(ids, dtype=torch.long)
    if batch is not None and ids.numel() != batch:
        raise ValueError(f"adapter_ids must give one adapter per row ({batch}), got {ids.numel()}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= len(order)):
        raise ValueError(f"adapter_ids must be in [-1, {len(order) - 1}], got {ids.tolist()}")
    return ids


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    return None


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict):
    state = model._fastpeft
    ids = kwargs.pop("adapter_ids", None)
    if ids is None:
        ids = state.ctx.generate_adapter_ids
    if ids is not None and state.peft_type != "LORA":
        raise ValueError(f"adapter_ids (a mixed batch) needs LoRA adapters, the model has {state.peft_type}")
    state.ctx.row_adapter_ids = _row_adapter_ids(state, ids, _batch_size(args, kwargs))
    if state.is_prompt_learning and not state.disabled:
        from fastpeft.tuners import prompt

        args, kwargs = prompt.prepare_forward(model, state, args, kwargs)
    return args, kwargs


def _generate_with_adapter_ids(model: nn.Module, *args, adapter_ids=None, **kwargs):
    """model.generate of a patched model: takes adapter_ids (one adapter per row) like forward."""
    state = model._fastpeft
    generate = state.original_generate or type(model).generate.__get__(model)
    state.ctx.generate_adapter_ids = adapter_ids
    try:
        return generate(*args, **kwargs)
    finally:
        state.ctx.generate_adapter_ids = None


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
