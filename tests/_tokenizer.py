"""The SmolLM2 tokenizer (it has a chat template), loaded once per test session, and a copy of
it without a chat template (as GPT-2's tokenizer), for the data tests."""

import copy
import functools
import os

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data"
)


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


@functools.cache
def smollm2_tokenizer():
    from fastpeft.default_model import GGUF_FILE, default_model_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)


@functools.cache
def plain_tokenizer():
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = None
    return tok


def trained_text(tokenizer, example: dict, prefix: str = "") -> str:
    """The decoded tokens an example trains on (labels != -100)."""
    return tokenizer.decode([t for t in example[prefix + "labels"] if t != -100])


def prompt_text(tokenizer, example: dict, prefix: str = "") -> str:
    """The decoded tokens before the first trained one."""
    labels = example[prefix + "labels"]
    first = next(i for i, t in enumerate(labels) if t != -100)
    return tokenizer.decode(example[prefix + "input_ids"][:first])


def save_tiny_llama(directory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer's vocabulary, saved with the tokenizer
    (save_pretrained) to directory, a model directory the CLI and load_model accept."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
