"""Prefix tuning without KV-cache injection: an attention function registered with transformers
(`AttentionInterface` and `AttentionMaskInterface`, name "fastpeft_prefix") that reads the
prefix of the current forward from the forward kwargs and attends over [prefix ; keys].

Conventions are peft's (which puts the prefix in the KV cache): the prefix is always visible, its
keys get no rotary embedding, and the real tokens' positions start at num_virtual_tokens (the
position offset is applied by prompt.prepare_forward).

- Training / prefill (q and k of one length): fastpeft.ops.prefix_attention with a [B, T] key
  padding mask; the mask function hands the 2-D padding mask through instead of building a
  [B, 1, T, T] mask.
- Decoding with a KV cache (or attention dropout, or a custom 4-D mask): SDPA over
  cat(prefix, keys) with the model's mask extended so the prefix is always visible.
- Adapters disabled: the model's original attention and mask functions, unchanged.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

NAME = "fastpeft_prefix"
PREFIX_KWARG = "fastpeft_prefix"


@dataclass
class _Installed:
    config: weakref.ref  # the model config (ids of dead configs get reused)
    state: weakref.ref  # the model's PatchState (its `disabled` flag)
    original: str  # the attention implementation the model had


# id(model.config) -> what install() replaced. The attention and mask functions see the config.
_INSTALLED: dict[int, _Installed] = {}
_registered = False


def _entry(config: Any) -> _Installed | None:
    entry = _INSTALLED.get(id(config))
    if entry is not None and (entry.config() is not config or entry.state() is None):
        del _INSTALLED[id(config)]
        return None
    return entry


class PrefixKV:
    """The prefix keys and values of one forward, for every layer: [2 * L, 1, H, n, D] from the
    encoder output [1, n, L * 2 * H * D] (peft's layout: layer i's keys at 2i, values at 2i+1).

    Under reentrant gradient checkpointing the first pass runs each layer without grad and the
    backward re-runs it and backpropagates at once; a shared encoder graph would then be walked
    once per layer. Such layers get a freshly encoded prefix in the re-run instead."""

    def __init__(self, encode: Callable[[], torch.Tensor], heads: int, head_dim: int):
        self._encode, self._heads, self._head_dim = encode, heads, head_dim
        self.kv = self._split(encode())
        self._reentrant_layers: set[int] = set()

    def _split(self, out: torch.Tensor) -> torch.Tensor:
        n = out.shape[1]
        return out.view(1, n, -1, self._heads, self._head_dim).permute(2, 0, 3, 1, 4)

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0] // 2

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_layers:
            raise ValueError(
                f"layer_idx must be in [0, {self.num_layers}) (the prefix's num_layers), got {i}"
            )
        kv = self.kv
        if not torch.is_grad_enabled():
            if kv.requires_grad:
                self._reentrant_layers.add(i)
        elif i in self._reentrant_layers:
            kv = self._split(self._encode())
        return kv[2 * i], kv[2 * i + 1]


def install(model: nn.Module, state: Any) -> None:
    """Route the model's attention through the prefix attention function."""
    _register()
    config = model.config
    if _entry(config) is not None:
        return
    original = config._attn_implementation or "eager"
    _INSTALLED[id(config)] = _Installed(weakref.ref(config), weakref.ref(state), original)
    model.set_attn_implementation(NAME)
    if config._attn_implementation != NAME:
        del _INSTALLED[id(config)]
        raise ValueError(
            f"prefix tuning needs a model whose attention goes through transformers' "
            f"AttentionInterface; {type(model).__name__} kept attn_implementation {original!r}"
        )


def uninstall(model: nn.Module) -> None:
    """Give the model back its original attention implementation."""
    entry = _entry(model.config)
    if entry is not None:
        del _INSTALLED[id(model.config)]
        model.set_attn_implementation(entry.original)


def is_installed(model: nn.Module) -> bool:
    return _entry(model.config) is not None and model.config._attn_implementation == NAME


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, prefix_attention_forward)
    AttentionMaskInterface.register(NAME, prefix_mask)
    _registered = True


def _original(config: Any) -> str:
    entry = _entry(config)
    return entry.original if entry is not None else "sdpa"


def prefix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    config: Any = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function registered for NAME. With the prefix active and a plain causal (or
    bidirectional) mask over keys as long as the queries, it returns the [B, T] key padding mask
    (or None) for prefix_attention; otherwise a [B, 1, q, kv] bool mask of the sequence keys.
    With adapters disabled, the original implementation's own mask."""
    from transformers import masking_utils as mu

    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, attention_mask=attention_mask, config=config, **kwargs)
    if mask_function is not None:
        args["mask_function"] = mask_function
    entry = _entry(config)
    if entry is None or entry.state().disabled:
        return mu.ALL_MASK_ATTENTION_FUNCTIONS[_original(config)](**args)
    plain = mask_function in (None, mu.causal_mask_function, mu.bidirectional_mask_function)
    local = kwargs.get("local_size")
    if local is not None:  # a sliding window: plain causal while it hides no key, and no overlay
        plain = (kv_length <= local and kwargs.get("allow_is_causal_skip", True)
                 and not kwargs.get("use_vmap", False))
    same = q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset)
    if plain and same:
        if attention_mask is None:
            return None
        return mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    args.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return mu.sdpa_mask(**args)


def _is_zero(x: Any) -> bool:
    return bool(x == 0) if not isinstance(x, torch.Tensor) or x.numel() == 1 else False


def prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered for NAME: attention over [prefix ; keys]."""
    prefix = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None:
        return _original_attention(module, query, key, value, attention_mask, scaling, dropout,
                                   **kwargs)
    from fastpeft.ops import prefix_attention
    from fastpeft.tuners.base import autocast_like

    pk, pv = prefix.layer(module.layer_idx)
    # Under autocast, what SDPA would get: q, k, v in the autocast dtype (RoPE leaves q, k fp32).
    query, key, value = autocast_like(query, key, value)
    pk, pv = pk.to(query), pv.to(query)  # the model's dtype and this layer's device
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    if isinstance(scaling, torch.Tensor):
        scaling = float(scaling)
    T, S = query.shape[2], key.shape[2]
    if S == T and not dropout and (attention_mask is None or attention_mask.dim() == 2):
        out = prefix_attention(query, key, value, pk, pv, attn_mask=attention_mask, causal=causal,
                               scale=scaling)
    else:
        out = sdpa_over_prefix(query, key, value, pk, pv, attention_mask, causal, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def sdpa_over_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA of q [B, Hq, T, D] over cat(prefix, keys), the prefix always visible. mask: None,
    a [B, S] key padding mask, or a 4-D mask of the sequence keys (bool, or additive float)."""
    B, Hq, T, _ = q.shape
    S, n = k.shape[2], pk.shape[2]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    if mask is None or mask.dim() == 2:  # key padding (or nothing): add causality here
        mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        if causal:  # bottom-right: the last query sees the last key
            tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            mask = tri if mask is None else mask & tri
    if mask is not None:
        fill = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
            *mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([fill, mask], dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale,
        enable_gqa=Hq != k.shape[1],
    )


def _original_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    config = module.config
    entry = _entry(config)
    if entry is not None and not entry.state().disabled:
        raise ValueError(
            f"prefix tuning: {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) "
            "ran without the prefix; call the patched model itself, not one of its submodules"
        )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _original(config)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
