"""Shared helpers of the training tests: a LoRA-patched tiny Llama and synthetic SFT data."""

import random

import torch
from _models import VOCAB, tiny_model

import fastpeft
from fastpeft.train import TrainConfig


def lora_model(init_seed: int = 0, dropout: float = 0.0):
    """The same tiny Llama base every time; the LoRA init depends on init_seed."""
    model = tiny_model("llama", seed=0)
    torch.manual_seed(init_seed)
    return fastpeft.patch(model, fastpeft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
        init_lora_weights="gaussian"))


def random_examples(n: int = 16, seed: int = 0, lo: int = 4, hi: int = 12) -> list[dict]:
    g = random.Random(seed)
    out = []
    for _ in range(n):
        length = g.randint(lo, hi)
        ids = [g.randrange(2, VOCAB) for _ in range(length)]
        prompt = g.randint(0, length - 2)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                    "attention_mask": [1] * length})
    return out


def pattern_examples(n: int = 16, seed: int = 0) -> list[dict]:
    """Counting sequences (t, t+1, t+2, ... mod VOCAB): easy to learn."""
    g = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = g.randrange(2, VOCAB), g.randint(6, 12)
        ids = [2 + (start + i) % (VOCAB - 2) for i in range(length)]
        out.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * length})
    return out


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path), max_steps=6, batch_size=4, lr=1e-2, progress=False,
                tensorboard=False, plots=False)
    base.update(kw)
    return TrainConfig(**base)


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
