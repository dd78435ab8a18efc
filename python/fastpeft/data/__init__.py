"""Datasets for SFT, reward models, PPO and DPO: formats, templates, loss masking, packing,
collation. See the module docstrings; `load_sft_dataset`, `load_preference_dataset` and
`load_prompt_dataset` are the entry points the trainers use."""

from fastpeft.data.collate import Collator, pad_id_of, pad_lists
from fastpeft.data.formats import FORMATS, InvalidRowError, detect_format
from fastpeft.data.loading import (
    DataError,
    DataStats,
    load_preference_dataset,
    load_prompt_dataset,
    load_rows,
    load_sft_dataset,
    read_records,
)
from fastpeft.data.packing import best_fit_bins, pack, packed_attention_mask
from fastpeft.data.tokenize import IGNORE_INDEX, tokenize_pair, tokenize_prompt, tokenize_sft

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Collator",
    "DataError",
    "DataStats",
    "InvalidRowError",
    "best_fit_bins",
    "detect_format",
    "load_preference_dataset",
    "load_prompt_dataset",
    "load_rows",
    "load_sft_dataset",
    "pack",
    "packed_attention_mask",
    "pad_id_of",
    "pad_lists",
    "read_records",
    "tokenize_pair",
    "tokenize_prompt",
    "tokenize_sft",
]
