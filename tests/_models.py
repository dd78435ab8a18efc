"""Tiny random Hugging Face models built from configs (fp32, eval mode, no dropout), one per
family, and the inputs the tests feed them."""

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
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64
_NO_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_llama() -> LlamaForCausalLM:
    """Grouped-query attention: 4 query heads, 2 key/value heads."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         **_NO_TOKENS)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **_NO_TOKENS)
    return GPT2LMHeadModel(config).eval()


def tiny_gpt_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                           **_NO_TOKENS)
    return GPTNeoXForCausalLM(config).eval()


def tiny_mistral() -> MistralForCausalLM:
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=4096, **_NO_TOKENS)
    return MistralForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         **_NO_TOKENS)
    return Qwen2ForCausalLM(config).eval()


def tiny_bert() -> BertModel:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gpt_neox": tiny_gpt_neox,
            "mistral": tiny_mistral, "qwen2": tiny_qwen2, "bert": tiny_bert}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[family]()


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def left_padded_mask(batch: int = 2, seq: int = 7) -> torch.Tensor:
    """Row r has r * 2 padding positions on the left (row 0 none)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for r in range(batch):
        mask[r, : min(2 * r, seq - 1)] = 0
    return mask


def outputs(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The logits of a causal LM, or the last hidden state of an encoder."""
    out = model(input_ids=ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
