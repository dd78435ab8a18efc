"""The DPO stage: fastpeft.ops.dpo_loss on summed completion log-probs, which come from the
final hidden states through the fused linear_token_logprobs (no [batch, seq, vocab] logits).
The chosen and rejected sides go through one forward (2B rows).

The reference: for a patched model, the same model under fastpeft.disable_adapter (no second
copy of the base); for an unpatched model (full fine-tuning), a frozen copy (ref_model, or a
deepcopy made once at construction).

Reference log-probs are computed per batch, under no_grad and in eval mode (no dropout), not
precomputed over the dataset. Precomputing would save one no-grad forward per step (about a
third of a step's compute) but costs a pass over the whole dataset before the first step, a
cache the size of the dataset, and care to keep it consistent with resume, bf16 autocast and
the eval set; computing on the fly is always exact and needs none of that. The values are the
same either way: the reference's weights never change and eval mode is deterministic.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastpeft.train.config import DPOConfig, TrainConfig
from fastpeft.train.modeling import completion_logprobs
from fastpeft.train.pairs import PairTrainer, save_final_model


class DPOTrainer(PairTrainer):
    """Args:
        model: the policy, a causal LM patched by fastpeft.patch (reference = adapters off),
            or unpatched (full fine-tuning; reference = ref_model or a frozen deepcopy).
        tokenizer: its tokenizer (pad id; data loading when a dataset is a path).
        config: TrainConfig.
        dpo: DPOConfig (beta).
        train_dataset / eval_dataset: lists of tokenized pairs (chosen_* / rejected_*
            input_ids, labels with the prompt -100, attention_mask), or paths / hub ids loaded
            with fastpeft.data.load_preference_dataset.
        ref_model: the reference for an unpatched model; not allowed with a patched one.

    Logged (TRL's names): loss, rewards/chosen (beta * (log pi - log ref) of the chosen side),
    rewards/rejected, rewards/margins, rewards/accuracies (fraction with chosen > rejected),
    logps/chosen, logps/rejected (summed policy log-probs); eval_* of each on eval.
    """

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, dpo: DPOConfig,
                 train_dataset, eval_dataset=None, max_length: int | None = None,
                 format: str | None = None, skip_invalid: bool = False,
                 ref_model: nn.Module | None = None):
        from fastpeft.patching import is_patched

        if not isinstance(dpo, DPOConfig):
            raise TypeError(f"dpo must be a DPOConfig, got {type(dpo).__name__}")
        self.dpo = dpo
        if is_patched(model):
            if ref_model is not None:
                raise ValueError("ref_model: a patched model's reference is the model itself "
                                 "with its adapters disabled; pass ref_model only for full "
                                 "fine-tuning (an unpatched model)")
            self.ref_model = None
        else:
            if ref_model is None:
                ref_model = copy.deepcopy(model)
            ref_model.eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
            self.ref_model = ref_model
        super().__init__(model, tokenizer, config, train_dataset, eval_dataset,
                         max_length=max_length, format=format, skip_invalid=skip_invalid)

    def _sequence_logps(self, model: nn.Module, ids, mask, labels) -> torch.Tensor:
        logp, _ = completion_logprobs(model, ids, mask, labels)
        return logp.float().sum(-1)

    def policy_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen, [B] rejected) summed completion log-probs of the policy (with grad)."""
        ids, mask, labels = self.pairs(batch)
        s = self._sequence_logps(self.model, ids, mask, labels)
        b = batch["chosen_input_ids"].shape[0]
        return s[:b], s[b:]

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The same under the reference, in eval mode and without grad."""
        from fastpeft import disable_adapter

        ids, mask, labels = self.pairs(batch)
        b = batch["chosen_input_ids"].shape[0]
        if self.ref_model is not None:
            s = self._sequence_logps(self.ref_model, ids, mask, labels)
            return s[:b], s[b:]
        was_training = self.model.training
        self.model.eval()
        try:
            with disable_adapter(self.model):
                s = self._sequence_logps(self.model, ids, mask, labels)
        finally:
            self.model.train(was_training)
        return s[:b], s[b:]

    def pair_outputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from fastpeft.ops import dpo_loss

        ref_c, ref_r = self.reference_logps(batch)
        pol_c, pol_r = self.policy_logps(batch)
        loss, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=self.dpo.beta)
        with torch.no_grad():
            chosen = self.dpo.beta * (pol_c - ref_c)
            rejected = self.dpo.beta * (pol_r - ref_r)
        return loss, {"rewards/chosen": chosen, "rewards/rejected": rejected,
                      "rewards/margins": chosen - rejected,
                      "rewards/accuracies": (chosen > rejected).float(),
                      "logps/chosen": pol_c.detach(), "logps/rejected": pol_r.detach()}

    def save_extra(self, directory: str) -> None:
        from fastpeft.patching import is_patched

        if is_patched(self.model):
            save_final_model(self.model, self.tokenizer, directory)

    def on_train_end(self) -> None:
        save_final_model(self.model, self.tokenizer, self.config.output_dir)


__all__ = ["DPOTrainer"]
