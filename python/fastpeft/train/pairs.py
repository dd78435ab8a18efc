"""What the reward-model and DPO stages share: preference data (chosen_* / rejected_* examples
from fastpeft.data.load_preference_dataset, or the paths they come from), one batch of 2B rows
(the B chosen completions, then the B rejected ones, padded to one length) so a single forward
serves both sides, pair-level loss normalisation, an eval pass that averages pair metrics over
the whole eval set, and writing the final model (adapter/ or model/)."""

from __future__ import annotations

import os

import torch
from torch import nn

from fastpeft.train.config import TrainConfig
from fastpeft.train import distributed
from fastpeft.train.loop import IGNORE_INDEX, Trainer

PAIR_KEYS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
             "rejected_input_ids", "rejected_attention_mask", "rejected_labels")


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = torch.full((t.shape[0], length - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def concat_pairs(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of [2B, T]: rows 0..B-1 the chosen sides, rows
    B..2B-1 the rejected ones, right padded to the longer of the two (pad_id, mask 0, -100)."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = []
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        out.append(torch.cat([_pad_to(batch[f"chosen_{key}"], length, value),
                              _pad_to(batch[f"rejected_{key}"], length, value)]))
    return out[0], out[1], out[2]


def save_final_model(model: nn.Module, tokenizer, directory: str) -> str:
    """The trained model as SFT writes it: a patched model's adapter to directory/adapter/ (peft
    format), an unpatched one (full fine-tuning) with save_pretrained (and the tokenizer) to
    directory/model/. Returns the path written."""
    from fastpeft.patching import is_patched

    if is_patched(model):
        from fastpeft import save_adapter

        path = os.path.join(directory, "adapter")
        save_adapter(model, path)
        return path
    path = os.path.join(directory, "model")
    model.save_pretrained(path)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    return path


class PairTrainer(Trainer):
    """Base of RewardTrainer and DPOTrainer. Subclasses implement `pair_outputs(batch) ->
    (mean loss over the batch's pairs, {metric: [B] per-pair values})`; the loop's loss is that
    mean times B / (pairs of the step), so batch_size 1 x grad_accum 2 equals 2 x 1, and the
    logged metrics are means over pairs."""

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, train_dataset,
                 eval_dataset=None, max_length: int | None = None, format: str | None = None,
                 skip_invalid: bool = False):
        from fastpeft.data import Collator, load_preference_dataset, pad_id_of

        self.tokenizer = tokenizer
        self.data_stats = {}
        self.max_length = max_length
        self.format = format

        def load(source, split):
            if source is None:
                return None
            if isinstance(source, (str, os.PathLike)):
                if tokenizer is None:
                    raise ValueError(f"{split}_dataset: {os.fspath(source)!r} is a path, which "
                                     "needs a tokenizer (got tokenizer=None)")
                examples, stats = load_preference_dataset(
                    os.fspath(source), tokenizer, max_length=max_length, format=format,
                    skip_invalid=skip_invalid, split="train")
                self.data_stats[split] = stats
                return examples
            _check_examples(source, split)
            return source

        self.pad_id = pad_id_of(tokenizer)
        super().__init__(model, config, load(train_dataset, "train"),
                         load(eval_dataset, "eval"), Collator(pad_token_id=self.pad_id))

    # ---- hooks for RewardTrainer / DPOTrainer ---------------------------------------------

    def pair_outputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ---- the loop's hooks -----------------------------------------------------------------

    def num_items(self, batch: dict) -> int:
        """Pairs: the step's loss is the mean over its pairs."""
        return int(batch["chosen_input_ids"].shape[0])

    def num_tokens(self, batch: dict) -> int:
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())

    def pairs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return concat_pairs(batch, self.pad_id)

    def compute_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, dict]:
        loss, per_pair = self.pair_outputs(batch)
        n = self.num_items(batch)
        metrics = {k: float(v.float().mean()) for k, v in per_pair.items()}
        return loss * (n / num_items), metrics

    def evaluate(self) -> dict:
        """eval_loss (the mean over the eval pairs) and eval_<metric> for every pair metric."""
        if self.eval_dataset is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            with torch.no_grad(), self.autocast():
                for batch, filler in self.eval_batches():
                    loss, per_pair = self.pair_outputs(batch)
                    # a filler batch (FSDP keeps ranks in step) adds zeros, but its keys, so
                    # every rank reduces the same keys
                    n = 0 if filler else self.num_items(batch)
                    sums["loss"] = sums.get("loss", 0.0) + float(loss) * n
                    for k, v in per_pair.items():
                        sums[k] = sums.get(k, 0.0) + (0.0 if filler else float(v.float().sum()))
                    count += n
        finally:
            self.model.train(was_training)
        count = distributed.all_reduce_sum(count)
        sums = {k: distributed.all_reduce_sum(v) for k, v in sorted(sums.items())}
        return {f"eval_{k}": v / max(count, 1) for k, v in sums.items()}


def _check_examples(examples, split: str) -> None:
    """A list of tokenized pairs: a clear error for SFT examples or raw text rows."""
    try:
        first = examples[0]
    except (TypeError, IndexError, KeyError):
        return  # empty: the loop reports an empty training set
    if not isinstance(first, dict):
        raise ValueError(f"{split}_dataset: expected tokenized preference examples (dicts with "
                         f"{', '.join(PAIR_KEYS)}) or a path, got a {type(first).__name__}")
    missing = [k for k in PAIR_KEYS if k not in first]
    if missing:
        hint = (" (raw {prompt, chosen, rejected} rows: tokenize them with "
                "fastpeft.data.tokenize_pair, or pass a file path)") if "chosen" in first else ""
        raise ValueError(f"{split}_dataset: example 0 lacks {missing}; preference examples need "
                         f"{list(PAIR_KEYS)}, got keys {sorted(first)}{hint}")


__all__ = ["PAIR_KEYS", "PairTrainer", "concat_pairs", "save_final_model"]
