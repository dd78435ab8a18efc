"""Loading a base model by name: an alias of a model this install ships (smollm2-135m, the
embedded default model), a local Hugging Face directory, or a hub id (where a network
exists). The trainers, the CLI and `fastpeft merge` all load models through `load_model`."""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
ALIASES = ("smollm2-135m", "smollm2-135m-instruct")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def is_default_model(name: str) -> bool:
    """True for the aliases and for the default model's own directory (what a model loaded
    with the alias records as its name_or_path)."""
    if name.lower() in ALIASES:
        return True
    from fastpeft.default_model import default_model_dir

    try:
        directory = default_model_dir()
    except FileNotFoundError:
        return False
    return os.path.exists(name) and os.path.realpath(name) == os.path.realpath(directory)


def load_model(name: str, dtype: str | torch.dtype = "fp32", with_tokenizer: bool = True):
    """(model, tokenizer) of a causal LM: `name` is an alias (ALIASES), a local directory
    (from_pretrained) or a hub id. The tokenizer gets a pad token (its EOS) when it has none.
    The model's name_or_path is `name`, so a saved adapter records how to load its base."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be an alias {ALIASES}, a local directory or a hub id, "
                         f"got {name!r}")
    torch_dtype = resolve_dtype(dtype)
    if is_default_model(name):
        from fastpeft.default_model import load_default_model

        model, tokenizer = load_default_model(torch_dtype, with_tokenizer)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(name) and (os.path.sep in name and os.path.exists(
                os.path.dirname(name)) or name.startswith((".", "/"))):
            raise FileNotFoundError(f"model: {name!r} is not a directory (nor an alias in "
                                    f"{ALIASES}, nor a hub id)")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name) if with_tokenizer else None
    model.config._name_or_path = name
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


__all__ = ["ALIASES", "is_default_model", "load_model", "resolve_dtype"]
