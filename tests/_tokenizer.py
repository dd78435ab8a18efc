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
