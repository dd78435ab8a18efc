"""Tiny random Hugging Face models built from configs, one per supported family."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
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
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 64
# No bos / eos / pad ids: a random model would stop generating at a random eos.
_NO_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, **_NO_TOKENS)
_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, num_labels=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(sliding_window=4096, **_LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLAMA_LIKE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=8, **_LLAMA_LIKE)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0, **_NO_TOKENS)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, **_NO_TOKENS)),
    "bert": lambda: BertForSequenceClassification(BertConfig(**_BERT_LIKE)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(
        pad_token_id=1, **{**_BERT_LIKE, "max_position_embeddings": 70})),
}

FAMILIES = list(BUILDERS)


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `family` in eval mode, the same for the same seed. Its biases
    (zero after Hugging Face's init) are made random so that tests see what a method does to
    them."""
    torch.manual_seed(seed)
    model = BUILDERS[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.02)
    return model


def tiny_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    """Token ids in [2, VOCAB) (0 and 1 are left out: RoBERTa's pad id is 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def left_padded_mask(batch: int = 2, seq: int = 7) -> torch.Tensor:
    """Row r has r * 2 padding positions on the left (row 0 none)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for r in range(batch):
        mask[r, : min(2 * r, seq - 1)] = 0
    return mask


def outputs(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """A causal LM's logits; a classifier's logits and last hidden state, flattened together
    (its few logits barely move)."""
    out = model(input_ids=ids, output_hidden_states=True, **kwargs)
    if out.logits.dim() == 3:
        return out.logits
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def params_changed_by_one_step(model: torch.nn.Module, lr: float = 0.1) -> set[str]:
    """Names of the parameters one SGD step on the causal-LM loss changes (train mode)."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = tiny_inputs()
    model(ids, labels=ids).loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


# Shorter names some test files use.
build = tiny_model
input_ids = tiny_inputs
