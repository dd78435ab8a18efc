"""The Hugging Face model families fastpeft patches, and each one's default targets (peft's
tables in peft/utils/constants.py, for the families below)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    name: str
    lora_targets: tuple[str, ...]
    ia3_targets: tuple[str, ...]
    ia3_feedforward: tuple[str, ...]
    adapter_attention_out: str  # regex (re.fullmatch on the module path) of the attention output
    adapter_mlp_out: str  # ... and of the MLP output projection
    causal_lm: bool


_LLAMA = dict(
    lora_targets=("q_proj", "v_proj"),
    adapter_attention_out=r".*\.self_attn\.o_proj",
    adapter_mlp_out=r".*\.mlp\.down_proj",
    causal_lm=True,
)
_BERT = dict(
    lora_targets=("query", "value"),
    ia3_targets=("key", "value", "output.dense"),
    ia3_feedforward=("output.dense",),
    adapter_attention_out=r".*\.attention\.output\.dense",
    adapter_mlp_out=r".*\.layer\.\d+\.output\.dense",
    causal_lm=False,
)

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ia3_targets=("k_proj", "v_proj", "down_proj"),
                    ia3_feedforward=("down_proj",), **_LLAMA),
    "mistral": Family("mistral", ia3_targets=("k_proj", "v_proj", "down_proj"),
                      ia3_feedforward=("down_proj",), **_LLAMA),
    "qwen2": Family("qwen2", ia3_targets=("q_proj", "v_proj", "down_proj"),
                    ia3_feedforward=("down_proj",), **_LLAMA),
    "qwen3": Family("qwen3", ia3_targets=("q_proj", "v_proj", "down_proj"),
                    ia3_feedforward=("down_proj",), **_LLAMA),
    "gpt2": Family(
        "gpt2",
        lora_targets=("c_attn",),
        ia3_targets=("c_attn", "mlp.c_proj"),
        ia3_feedforward=("mlp.c_proj",),
        adapter_attention_out=r".*\.attn\.c_proj",
        adapter_mlp_out=r".*\.mlp\.c_proj",
        causal_lm=True,
    ),
    "gpt_neox": Family(
        "gpt_neox",
        lora_targets=("query_key_value",),
        ia3_targets=("query_key_value", "dense_4h_to_h"),
        ia3_feedforward=("dense_4h_to_h",),
        adapter_attention_out=r".*\.attention\.dense",
        adapter_mlp_out=r".*\.mlp\.dense_4h_to_h",
        causal_lm=True,
    ),
    "bert": Family("bert", **_BERT),
    "roberta": Family("roberta", **_BERT),
}


def family_of(model: torch.nn.Module) -> Family:
    """The model's family, or a ValueError naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"fastpeft.patch supports Hugging Face models of type {sorted(FAMILIES)} "
            f"(SmolLM2 is 'llama'); got {type(model).__name__} with model_type {model_type!r}"
        )
    return FAMILIES[model_type]
