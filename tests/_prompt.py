"""Shared helpers of the prompt-learning tests: a peft model and a fastpeft-patched copy of the
same base model, with the same encoder weights."""

import copy
import warnings

import peft
import torch

import fastpeft
from _models import build


def peft_pair(family: str, peft_config, seed: int = 0):
    """(peft model, fastpeft model): the same tiny base model, the same encoder weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(build(family, seed), copy.deepcopy(peft_config))
    ours = fastpeft.patch(build(family, seed), peft_config)
    ours.prompt_encoder.default.load_state_dict(reference.prompt_encoder.default.state_dict())
    return reference, ours


def greedy_reference(model, ids: torch.Tensor, mask: torch.Tensor, steps: int,
                     positions: bool) -> torch.Tensor:
    """Greedy decoding by full forwards (no KV cache), with the position ids generate() gives
    (from the attention mask) when `positions`."""
    for _ in range(steps):
        kwargs = {}
        if positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids
