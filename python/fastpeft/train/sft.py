"""SFT / instruction tuning on the generic loop: the loss of a patched causal LM goes through
fastpeft's fused linear_cross_entropy (in train mode the model returns the loss with
logits=None); the final adapter goes to output_dir/adapter/ in peft format, or, for a model
that is not patched (full fine-tuning), the full weights to output_dir/model/."""

from __future__ import annotations

import os

import torch
from torch import nn

from fastpeft.train.config import TrainConfig
from fastpeft.train.loop import IGNORE_INDEX, Trainer

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class SFTTrainer(Trainer):
    """Args:
        model: a causal LM, patched by fastpeft.patch (or not: every parameter that requires
            grad is trained and the full model is saved at the end).
        tokenizer: its tokenizer (pad id; data loading when a dataset is a path).
        config: TrainConfig.
        train_dataset / eval_dataset: lists of examples from fastpeft.data.load_sft_dataset,
            or paths / hub ids loaded with it (max_length, packing, format, skip_invalid).
        collator: default Collator(pad_token_id=pad_id_of(tokenizer)).
    """

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, train_dataset,
                 eval_dataset=None, collator=None, max_length: int | None = None,
                 packing: bool = False, format: str | None = None, skip_invalid: bool = False):
        from fastpeft.data import Collator, load_sft_dataset, pad_id_of

        self.tokenizer = tokenizer
        self.data_stats = {}

        def load(source, split):
            if source is None or not isinstance(source, (str, os.PathLike)):
                return source
            examples, stats = load_sft_dataset(os.fspath(source), tokenizer,
                                               max_length=max_length, format=format,
                                               packing=packing, skip_invalid=skip_invalid)
            self.data_stats[split] = stats
            return examples

        if collator is None:
            collator = Collator(pad_token_id=pad_id_of(tokenizer))
        super().__init__(model, config, load(train_dataset, "train"),
                         load(eval_dataset, "eval"), collator)

    def _inputs(self, batch: dict) -> dict:
        return {k: batch[k] for k in _MODEL_INPUTS if k in batch}

    def compute_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, dict]:
        out = self.model(**self._inputs(batch), num_items_in_batch=num_items, use_cache=False)
        return out.loss, {}

    def eval_loss(self, batch: dict) -> tuple[float, int]:
        n = self.num_items(batch)
        if n == 0:
            return 0.0, 0
        out = self.model(**self._inputs(batch), use_cache=False)
        return float(out.loss.float()) * n, n

    def _patched(self) -> bool:
        from fastpeft.patching import is_patched

        return is_patched(self.model)

    def save_extra(self, directory: str) -> None:
        if self._patched():
            from fastpeft import save_adapter

            save_adapter(self.model, os.path.join(directory, "adapter"))

    def on_train_end(self) -> None:
        out = self.config.output_dir
        if self._patched():
            from fastpeft import save_adapter

            save_adapter(self.model, os.path.join(out, "adapter"))
        else:
            self.model.save_pretrained(os.path.join(out, "model"))
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(os.path.join(out, "model"))


__all__ = ["IGNORE_INDEX", "SFTTrainer"]
