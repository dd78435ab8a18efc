"""Tiny random Hugging Face models built from configs (fp32, eval mode), one per family."""

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_gpt_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


def tiny_bert() -> BertModel:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gpt_neox": tiny_gpt_neox, "bert": tiny_bert}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of `family`; its biases (zero after Hugging Face's init) are made random so
    that tests see what a method does to them."""
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a causal LM, or the last hidden state of an encoder."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
