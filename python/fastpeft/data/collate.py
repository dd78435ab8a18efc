"""Batching: pad lists of token ids into tensors.

Right padding for training (labels padded with -100, attention_mask 0); left padding for
generation prompts, so every row's last token is where generation starts. Packed rows (with
position_ids) get no 2D attention_mask, so transformers isolates their samples (see packing);
`block_mask=True` adds the explicit 4D mask instead."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpeft.data.packing import packed_attention_mask
from fastpeft.data.tokenize import IGNORE_INDEX


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            return value
    return 0


def pad_lists(
    rows: list[list[int]], value: int, side: str = "right", multiple_of: int | None = None
) -> torch.Tensor:
    """[len(rows), T] long tensor, T the longest row (rounded up to multiple_of)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    t = max((len(r) for r in rows), default=0)
    if multiple_of:
        t = -(-t // multiple_of) * multiple_of
    out = torch.full((len(rows), t), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if side == "right":
                out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            else:
                out[i, t - len(r) :] = torch.as_tensor(r, dtype=torch.long)
    return out


def _pad_value(key: str, pad_id: int) -> int:
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("attention_mask"):
        return 0
    return pad_id


@dataclass
class Collator:
    """Pads every *input_ids / *labels / *attention_mask / position_ids field of a list of
    examples (so it serves SFT, packed, preference (chosen_* / rejected_*) and prompt
    batches); other fields are returned as lists.

    Args:
        pad_token_id: id used for padded input_ids (see pad_id_of).
        padding_side: "right" for training, "left" for generation prompts.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        block_mask: for packed rows, also return a 4D attention_mask (packed_attention_mask).
        mask_dtype: dtype of that 4D mask (the model's dtype).
    """

    pad_token_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    block_mask: bool = False
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        batch: dict = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if key == "position_ids":
                batch[key] = self._positions(values)
            elif key.endswith(("input_ids", "labels", "attention_mask")):
                batch[key] = pad_lists(
                    values,
                    _pad_value(key, self.pad_token_id),
                    self.padding_side,
                    self.pad_to_multiple_of,
                )
            else:
                batch[key] = values
        if "position_ids" in batch:
            if self.padding_side != "right":
                raise ValueError("packed rows (with position_ids) must be padded on the right")
            batch.pop("attention_mask", None)
            if self.block_mask:
                batch["attention_mask"] = packed_attention_mask(
                    batch["position_ids"], self.mask_dtype
                )
        return batch

    def _positions(self, rows: list[list[int]]) -> torch.Tensor:
        """Padding positions count from 0 as one more sample, so they attend to nothing real."""
        t = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            t = -(-t // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return torch.tensor([list(r) + list(range(t - len(r))) for r in rows], dtype=torch.long)
