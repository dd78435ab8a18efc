"""Packing tokenized examples into rows of at most max_length tokens (best-fit decreasing).

A packed row carries position_ids that restart at 0 for each sample. Samples do not attend to
each other when the model gets those position_ids with no 2D attention_mask and no cache:
transformers (5.x) then builds a block-diagonal causal mask for sdpa and eager, and flash
attention reads the sample boundaries from them. Note that a causal LM in transformers makes
a cache by default (config.use_cache), which turns this detection off: call the model with
``use_cache=False``, or pass the explicit 4D mask of `packed_attention_mask` instead.
"""

from __future__ import annotations

import bisect

import torch

from fastpeft.data.tokenize import IGNORE_INDEX


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= capacity, best-fit decreasing: each
    item, longest first, goes to the fullest bin it still fits in. Stable for equal lengths."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example has {max(lengths)} tokens, more than max_length={capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return bins


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Examples with input_ids / labels packed into rows of at most max_length tokens, each row
    with position_ids restarting per sample and seq_lens. The first label of every sample is
    set to -100: it would otherwise be predicted from the previous sample's last token (the
    unpacked loss never uses it either, the labels being shifted)."""
    bins = best_fit_bins([len(e["input_ids"]) for e in examples], max_length)
    rows = []
    for b in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in b:
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + list(labels[1:]) if labels else []
            row["position_ids"] += list(range(len(ids)))
            row["seq_lens"].append(len(ids))
        rows.append(row)
    return rows


def packed_attention_mask(
    position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[B, 1, T, T] additive mask (0 where attended, dtype's min elsewhere): causal inside each
    sample, nothing across samples. A sample starts wherever position_ids does not go up by 1.
    transformers passes a 4D mask through unchanged to sdpa and eager attention."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seq = start.cumsum(-1)  # [B, T] sample index
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
