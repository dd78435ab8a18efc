"""The encoders of the prompt-learning methods, built as peft builds them (same submodule
names, same order of random draws), so peft's weights copy across and a seeded init matches.

Each takes the virtual-token indices [batch, n] and returns [batch, n, width]:
prompt tuning and P-tuning give virtual-token embeddings (width = hidden size); prefix tuning
gives every layer's prefix keys and values (width = num_layers * 2 * token_dim).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn


class PromptTable(nn.Module):
    """A plain table of outputs: prompt tuning's encoder, and the inference form of the others
    (what peft saves as `prompt_embeddings` and loads with inference_mode=True)."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, width)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PromptEmbedding(PromptTable):
    """Prompt tuning (peft's PromptEmbedding): init RANDOM (normal), SAMPLE_VOCAB (embeddings of
    random vocabulary ids) or TEXT (embeddings of the tokenized init text, repeated or cut)."""

    def __init__(self, config: Any, word_embeddings: nn.Embedding):
        total = config.num_virtual_tokens * config.num_transformer_submodules
        super().__init__(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            ids = _text_token_ids(config, total)
        ids = ids.to(word_embeddings.weight.device)
        with torch.no_grad():
            init = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(init)


def _text_token_ids(config: Any, total: int) -> torch.Tensor:
    tokenizer = config.tokenizer_name_or_path
    if tokenizer is None or isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as peft: loading an adapter must not run code
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens"
        )
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptEncoder(nn.Module):
    """P-tuning (peft's PromptEncoder): an embedding table through an MLP (3 linear layers with
    ReLU) or a bidirectional LSTM and a 2-layer MLP head."""

    def __init__(self, config: Any):
        super().__init__()
        self.token_dim = config.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, self.token_dim)
        d, h = self.token_dim, self.hidden_size
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    f"for MLP, encoder_num_layers ({config.encoder_num_layers}) is ignored: "
                    "exactly 2 hidden MLP layers are used (as in peft)", stacklevel=2,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning (peft's PrefixEncoder): a table [n, num_layers * 2 * token_dim], or with
    prefix_projection an embedding [n, token_dim] through Linear-Tanh-Linear."""

    def __init__(self, config: Any):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        n, d, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(
                nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, layers * 2 * d),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, layers * 2 * d)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        return self.transform(x) if self.prefix_projection else x


def build_encoder(config: Any, word_embeddings: nn.Embedding) -> nn.Module:
    """The encoder of `config`'s method; with inference_mode the inference form (a table)."""
    if config.peft_type == "PROMPT_TUNING":
        return PromptEmbedding(config, word_embeddings)
    total = config.num_virtual_tokens * config.num_transformer_submodules
    if config.peft_type == "P_TUNING":
        if config.inference_mode:
            return PromptTable(total, config.token_dim)
        return PromptEncoder(config)
    if config.peft_type == "PREFIX_TUNING":
        if config.inference_mode:
            return PromptTable(config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
        return PrefixEncoder(config)
    raise ValueError(f"{config.peft_type} is not a prompt-learning method")


def output_shape(config: Any) -> tuple[int, int]:
    """The shape of one batch row of the encoder's output (peft's `prompt_embeddings`)."""
    if config.peft_type == "PREFIX_TUNING":
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
    return config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim
