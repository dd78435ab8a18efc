"""Synthetic preference pairs for the reward-model and DPO tests, token level (no tokenizer),
for the tiny random models of _models (VOCAB tokens): a random prompt, then a completion of
"good" tokens (chosen) or of "bad" tokens (rejected), both ending with the same END token, so
the preference is only visible by attending back over the completion."""

import random

import torch
from _models import VOCAB, tiny_model
from _tokenizer import smollm2_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft

GOOD, BAD, END = range(2, 22), range(22, 42), 1


def side(prompt: list[int], completion: list[int], name: str) -> dict:
    n = len(prompt) + len(completion)
    return {f"{name}_input_ids": prompt + completion,
            f"{name}_labels": [-100] * len(prompt) + completion,
            f"{name}_attention_mask": [1] * n}


def preference_pairs(n: int = 32, seed: int = 0) -> list[dict]:
    g = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [g.randrange(2, VOCAB) for _ in range(g.randint(2, 5))]
        chosen = [g.choice(GOOD) for _ in range(g.randint(2, 5))] + [END]
        rejected = [g.choice(BAD) for _ in range(g.randint(2, 5))] + [END]
        out.append({**side(prompt, chosen, "chosen"), **side(prompt, rejected, "rejected")})
    return out


def lora(init: bool | str = True, init_seed: int = 0, dropout: float = 0.0):
    """The same tiny Llama base every time, LoRA on every linear layer (zero-init B by
    default, so the policy starts as the base)."""
    model = tiny_model("llama", seed=0)
    torch.manual_seed(init_seed)
    return fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                     target_modules="all-linear",
                                                     init_lora_weights=init))


def smollm2_sized_llama(seed: int = 0):
    """A tiny random Llama with the SmolLM2 tokenizer's vocabulary, and that tokenizer."""
    torch.manual_seed(seed)
    tok = smollm2_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None))
    return model, tok
