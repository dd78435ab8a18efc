"""Prompt-learning methods (prompt tuning, P-tuning, prefix tuning / P-tuning v2) on a patched
Hugging Face model, with peft's conventions.

The encoders live in `model.prompt_encoder` (an nn.ModuleDict keyed by adapter name), so their
parameters are peft's live names (`prompt_encoder.default.embedding.weight`) and train with the
model. patching.py calls these functions; the model's forward pre-hook calls prepare_forward.

- Prompt tuning / P-tuning: the virtual-token embeddings are prepended to the input embeddings;
  the attention mask is extended with ones and the labels with -100; position_ids are dropped
  (as peft does), so the logits have num_virtual_tokens + T positions. In decoding (a non-empty
  KV cache) the prompt is already in the cache: only the mask is extended.
- Prefix tuning: every layer attends over its prefix through the "fastpeft_prefix" attention
  function (see prefix_attn.py); the prefix of the forward travels in the forward kwargs; the
  real tokens' positions are offset by num_virtual_tokens (peft keeps the prefix in the KV cache,
  so its positions start there).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from fastpeft.tuners import prefix_attn
from fastpeft.tuners.prompt_encoders import PrefixEncoder, PromptTable, build_encoder, output_shape

ENCODERS_ATTR = "prompt_encoder"


# ----------------------------------------------------------------------------- config


def _model_config_dict(model: nn.Module) -> tuple[Any, dict[str, Any]]:
    config = model.config
    d = config.to_dict()
    if "text_config" in d and isinstance(d["text_config"], dict):
        d = d["text_config"]
    return config, d


def _first(d: dict[str, Any], keys: tuple[str, ...], what: str) -> int:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    raise ValueError(
        f"cannot find {what} in the model config (looked for {list(keys)}); set it in the config"
    )


def fill_config(model: nn.Module, config: Any) -> None:
    """Fill the model-shaped fields as peft's _prepare_prompt_learning_config does (for prefix
    tuning with grouped-query attention: token_dim = head_dim * num_key_value_heads and
    num_attention_heads = num_key_value_heads)."""
    model_config, d = _model_config_dict(model)
    if config.num_layers is None:
        layers = getattr(model_config, "num_hidden_layers", None)
        config.num_layers = layers if layers is not None else _first(
            d, ("num_hidden_layers", "num_layers", "n_layer"), "the number of layers")
    if config.token_dim is None:
        config.token_dim = _first(d, ("hidden_size", "n_embd", "d_model"),
                                  "the hidden size (token_dim)")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(
            d, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "the number of attention heads")
    if config.peft_type == "PREFIX_TUNING" and d.get("num_key_value_heads") is not None:
        head_dim = d.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * d["num_key_value_heads"]
        config.num_attention_heads = d["num_key_value_heads"]
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1


def _check_config(model: nn.Module, config: Any) -> None:
    if config.num_transformer_submodules != 1:
        raise ValueError(
            "num_transformer_submodules must be 1 (fastpeft patches decoder-only and encoder-only "
            f"models), got {config.num_transformer_submodules}"
        )
    if config.peft_type != "PREFIX_TUNING":
        width = model.get_input_embeddings().embedding_dim
        if config.token_dim != width:
            raise ValueError(
                f"token_dim must be the model's embedding width {width}, got {config.token_dim}"
            )
        return
    _, d = _model_config_dict(model)
    layers = _first(d, ("num_hidden_layers", "num_layers", "n_layer"), "the number of layers")
    heads = _first(d, ("num_attention_heads", "n_head", "num_heads"),
                   "the number of attention heads")
    hidden = _first(d, ("hidden_size", "n_embd", "d_model"), "the hidden size")
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    if config.num_layers != layers:
        raise ValueError(f"num_layers must be the model's {layers} layers, got {config.num_layers}")
    if (config.num_attention_heads, config.token_dim) != (kv_heads, kv_heads * head_dim):
        raise ValueError(
            "prefix tuning: (num_attention_heads, token_dim) must be the model's key/value heads "
            f"and their width ({kv_heads}, {kv_heads * head_dim}), got "
            f"({config.num_attention_heads}, {config.token_dim})"
        )


# ----------------------------------------------------------------------------- adapters


def _encoders(model: nn.Module, create: bool = False) -> nn.ModuleDict:
    encoders = model._modules.get(ENCODERS_ATTR)
    if encoders is None:
        if not create:
            raise ValueError(f"{type(model).__name__} carries no prompt-learning adapter")
        if hasattr(model, ENCODERS_ATTR):
            raise ValueError(f"{type(model).__name__} already has an attribute {ENCODERS_ATTR!r}")
        encoders = nn.ModuleDict()
        model.add_module(ENCODERS_ATTR, encoders)
    return encoders


def add_adapter(model: nn.Module, state: Any, name: str, config: Any) -> None:
    """Fill `config`'s model-shaped fields and add the adapter's encoder to the model."""
    fill_config(model, config)
    _check_config(model, config)
    words = model.get_input_embeddings()
    encoder = build_encoder(config, words).to(words.weight.device)
    _encoders(model, create=True)[name] = encoder
    if config.peft_type == "PREFIX_TUNING":
        try:
            prefix_attn.install(model, state)
        except Exception:
            del _encoders(model)[name]
            raise


def delete_adapter(model: nn.Module, state: Any, name: str) -> None:
    encoders = _encoders(model)
    if name in encoders:
        del encoders[name]


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    encoders = model._modules.get(ENCODERS_ATTR)
    return list(encoders[name].parameters()) if encoders is not None and name in encoders else []


def remove(model: nn.Module, state: Any) -> None:
    """Undo everything add_adapter did (on unpatch)."""
    if ENCODERS_ATTR in model._modules:
        delattr(model, ENCODERS_ATTR)
    prefix_attn.uninstall(model)


def _virtual_tokens(config: Any, device: torch.device) -> torch.Tensor:
    return torch.arange(output_shape(config)[0], device=device).unsqueeze(0)  # [1, n]


def encode(model: nn.Module, name: str) -> torch.Tensor:
    """The encoder output for one batch row: [1, n, width]."""
    encoder = _encoders(model)[name]
    config = model._fastpeft.configs[name]
    device = next(encoder.parameters()).device
    return encoder(_virtual_tokens(config, device))


# ----------------------------------------------------------------------------- files


def prompt_embeddings_to_save(model: nn.Module, name: str) -> torch.Tensor:
    """What peft saves as `prompt_embeddings`: the encoder output for one batch row,
    [n, hidden] (prompt tuning, P-tuning) or [n, num_layers * 2 * token_dim] (prefix)."""
    with torch.no_grad():
        return encode(model, name)[0].detach().cpu()


def load_prompt_embeddings(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Load a saved `prompt_embeddings` table into adapter `name`, peft's inference form: the
    table is used directly. Prompt tuning and prefix tuning without projection load it into
    their table; P-tuning and prefix tuning with projection are replaced by the table (their
    config gets inference_mode=True, as peft's loaded adapters have)."""
    state = model._fastpeft
    config = state.configs[name]
    expected = output_shape(config)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"prompt_embeddings has shape {tuple(tensor.shape)}, the {config.peft_type} adapter "
            f"{name!r} of this model needs {expected}"
        )
    encoders = _encoders(model)
    encoder = encoders[name]
    param = next(encoder.parameters())
    if not (isinstance(encoder, PromptTable)
            or (isinstance(encoder, PrefixEncoder) and not encoder.prefix_projection)):
        encoder = PromptTable(*expected).to(device=param.device, dtype=param.dtype)
        encoders[name] = encoder
        config.inference_mode = True
    with torch.no_grad():
        encoder.embedding.weight.copy_(tensor.to(encoder.embedding.weight))
    from fastpeft import patching

    patching._mark_trainable(model, state)


# ----------------------------------------------------------------------------- forward

_POSITIONAL: dict[type, list[str]] = {}


def _positional_names(model: nn.Module) -> list[str]:
    cls = type(model)
    if cls not in _POSITIONAL:
        params = inspect.signature(cls.forward).parameters.values()
        _POSITIONAL[cls] = [p.name for p in params if p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # without self
    return _POSITIONAL[cls]


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    names = _positional_names(model)
    if len(args) > len(names):
        raise ValueError(f"{type(model).__name__}.forward takes {len(names)} positional "
                         f"arguments, got {len(args)}")
    for key, value in zip(names, args):
        if key in kwargs:
            raise ValueError(f"{type(model).__name__}.forward got {key!r} twice")
        kwargs[key] = value
    return kwargs


def _past_length(kwargs: dict) -> int:
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (k, v)


def _checkpointing_reentrant(model: nn.Module) -> bool:
    """Gradient checkpointing with use_reentrant (its output needs an input that requires grad)."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and m.training:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            keywords = getattr(fn, "keywords", None) or {}
            if keywords.get("use_reentrant", True):
                return True
    return False


def prepare_forward(model: nn.Module, state: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Rewrite the model's forward arguments for the active prompt-learning adapter."""
    name = state.active[0]
    config = state.configs[name]
    kwargs = _as_kwargs(model, args, kwargs)
    input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    source = input_ids if input_ids is not None else embeds
    if source is None:
        raise ValueError("a prompt-learning adapter needs input_ids or inputs_embeds, got neither")
    batch, seq = source.shape[0], source.shape[1]
    n = config.num_virtual_tokens
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("token_type_ids are not supported with prompt learning (as in peft); ignored",
                      stacklevel=3)
        kwargs["token_type_ids"] = None
    past = _past_length(kwargs)
    if config.peft_type == "PREFIX_TUNING":
        return (), _prefix_forward(model, name, config, kwargs, seq, past)

    if kwargs.get("position_ids") is not None:
        warnings.warn("position_ids are not supported with prompt tuning / P-tuning (as in peft); "
                      "ignored", stacklevel=3)
        kwargs["position_ids"] = None
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, seq] with {config.peft_type}, "
                             f"got shape {tuple(mask.shape)}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if past:  # decoding: the virtual tokens are in the KV cache already
        return (), kwargs
    if embeds is None:
        embeds = model.get_input_embeddings()(input_ids)
    prompts = encode(model, name).to(embeds).expand(batch, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    kwargs["input_ids"] = None
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return (), kwargs


def _prefix_forward(model: nn.Module, name: str, config: Any, kwargs: dict, seq: int,
                    past: int) -> dict:
    if not prefix_attn.is_installed(model):
        raise ValueError(
            f"prefix tuning needs attn_implementation {prefix_attn.NAME!r}, the model has "
            f"{model.config._attn_implementation!r} (was set_attn_implementation called after "
            "patching?)"
        )
    n = config.num_virtual_tokens
    positions = kwargs.get("position_ids")
    source = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    if positions is None:
        positions = torch.arange(past, past + seq, device=source.device).unsqueeze(0)
    kwargs["position_ids"] = positions + n

    dtype = model.get_input_embeddings().weight.dtype
    heads = config.num_attention_heads
    head_dim = config.token_dim // heads
    kwargs[prefix_attn.PREFIX_KWARG] = prefix_attn.PrefixKV(
        lambda: encode(model, name).to(dtype), heads, head_dim)

    if torch.is_grad_enabled() and model.training and _checkpointing_reentrant(model):
        # Reentrant checkpointing keeps a layer's graph only when one of its inputs requires
        # grad; the prefix reaches the layers through kwargs, so make the embeddings require it
        # (peft's enable_input_require_grads).
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
            kwargs["input_ids"] = None
        if not embeds.requires_grad:
            embeds = embeds.detach().requires_grad_(True)
        kwargs["inputs_embeds"] = embeds
    return kwargs
