"""The causal-LM loss of a patched model through fastpeft.ops.linear_cross_entropy: in training,
`model(input_ids, labels=...)` computes the loss from the last hidden states and the LM head
chunk by chunk and never materializes the [batch, seq, vocab] logits (it returns logits=None).

Same loss as transformers' ForCausalLMLoss: labels shifted left by one, ignore_index -100, the
mean over the labelled tokens, or their sum over `num_items_in_batch` when the Trainer passes it
(gradient accumulation). Out of training, without labels, with an LM head that carries an
adapter or a bias, or with `shift_labels` / `logits_to_keep`, the model's own forward runs.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100
_OWN_KWARGS = ("shift_labels", "logits_to_keep")  # what only the model's own forward handles


def install(model: nn.Module) -> bool:
    """Route the model's training loss through linear_cross_entropy; False when the model is
    not a causal LM with a separate base model and LM head."""
    if not _lm_parts(model):
        return False

    # The model's own signature: generate() reads it to decide which inputs (position_ids,
    # ...) to build and pass.
    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return fused_loss_forward(self, *args, **kwargs)

    forward._fastpeft_fused_loss = True
    model.__dict__["forward"] = types.MethodType(forward, model)
    return True


def uninstall(model: nn.Module) -> None:
    forward = model.__dict__.get("forward")
    if getattr(getattr(forward, "__func__", None), "_fastpeft_fused_loss", False):
        del model.__dict__["forward"]


def _lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(base model, LM head) of a causal LM, or None."""
    name = type(model).__name__
    if not (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        return None
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        return None
    return base, head


def _head_weight(head: nn.Module) -> torch.Tensor | None:
    """The LM head's [vocab, hidden] weight, when the head is a plain bias-free linear map
    (also a modules_to_save copy of one); None when it carries an adapter or a bias."""
    from fastpeft.tuners.base import ModulesToSave

    if isinstance(head, ModulesToSave):
        head = head.current()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return head.weight


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return kwargs
    names = [p for p in inspect.signature(type(model).forward).parameters][1:]
    return {**dict(zip(names, args)), **kwargs}


def fused_loss_forward(self: nn.Module, *args: Any, **kwargs: Any):
    """The patched model's forward (see the module docstring)."""
    own = type(self).forward
    kwargs = _bind(self, args, kwargs)
    labels = kwargs.get("labels")
    base, head = _lm_parts(self)
    weight = _head_weight(head)
    if (labels is None or not self.training or not torch.is_grad_enabled() or weight is None
            or any(kwargs.get(k) is not None for k in _OWN_KWARGS)
            or kwargs.get("return_dict") is False):
        return own(self, **kwargs)
    from fastpeft.ops import linear_cross_entropy
    from fastpeft.tuners.base import autocast_like

    kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("shift_labels", None)
    num_items = kwargs.get("num_items_in_batch")
    outputs = base(**kwargs)
    hidden = outputs[0]
    shift_labels = labels[..., 1:].to(hidden.device)
    hidden, weight = autocast_like(hidden[..., :-1, :], weight)  # the head's dtype under autocast
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)
    if num_items is not None:
        count = (shift_labels != IGNORE_INDEX).sum()
        loss = loss * count / torch.as_tensor(num_items, device=loss.device)
    extra = {k: outputs.get(k) for k in ("cache", "hidden_states", "attentions")}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)
