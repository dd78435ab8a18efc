"""The reward-model stage: a scalar head on the causal LM's backbone reads the final hidden state
of the last non-pad token; it is trained with the PEFT parameters (or the full model) on
preference pairs through fastpeft.ops.pairwise_reward_loss. The output reloads with
`load_reward_model(dir)` as a callable (prompts, completions) -> list of floats: PPO's reward.

Output layout (output_dir/):
    adapter/                  the PEFT adapter, peft format (patched model), or
    model/                    the full weights + tokenizer (full fine-tuning)
    tokenizer/                the training tokenizer (patched model with a tokenizer)
    reward_head.safetensors   the head: linear.weight [1, H] (no bias: the loss sees differences)
    reward_model.json         how to rebuild it (see load_reward_model)
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastpeft.train.config import RewardConfig, TrainConfig
from fastpeft.train.modeling import ScalarHead, hidden_size, sequence_scores
from fastpeft.train.pairs import PairTrainer, save_final_model

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_model.json"
FORMAT_VERSION = 1


def _head_init(model: nn.Module, seed: int) -> ScalarHead:
    """The head's initial weights depend on the seed only (and leave the global RNG alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ScalarHead(hidden_size(model), bias=False)
    return head.to(next(model.parameters()).device)


class RewardTrainer(PairTrainer):
    """Args:
        model: a causal LM, patched by fastpeft.patch (or not: every parameter that requires
            grad is trained, and the full model is saved).
        tokenizer: its tokenizer (pad id; data loading when a dataset is a path; saved with
            the output so load_reward_model scores text as training tokenized it).
        config: TrainConfig.
        rm: RewardConfig (margin, center_rewards_coefficient).
        train_dataset / eval_dataset: lists of tokenized pairs (chosen_* / rejected_*
            input_ids, labels, attention_mask; an optional float "margin" per pair), or
            paths / hub ids loaded with fastpeft.data.load_preference_dataset.
        head: a ScalarHead to start from (default: a new one seeded by config.seed).

    Logged: loss, accuracy (fraction of pairs with r_chosen > r_rejected), rewards/chosen,
    rewards/rejected, rewards/margin (mean r_chosen - r_rejected); eval_* of each on eval.
    """

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, rm: RewardConfig,
                 train_dataset, eval_dataset=None, max_length: int | None = None,
                 format: str | None = None, skip_invalid: bool = False,
                 head: ScalarHead | None = None):
        if not isinstance(rm, RewardConfig):
            raise TypeError(f"rm must be a RewardConfig, got {type(rm).__name__}")
        self.rm = rm
        self.head = head if head is not None else _head_init(model, config.seed)
        super().__init__(model, tokenizer, config, train_dataset, eval_dataset,
                         max_length=max_length, format=format, skip_invalid=skip_invalid)

    def heads(self) -> dict[str, nn.Module]:
        """The head trains with the model's parameters ("reward_head.*"): optimised, clipped,
        checkpointed and restored on resume with them."""
        return {"reward_head": self.head}

    def collate(self, rows: list[dict]) -> dict:
        """The Collator's batch plus "margin": a list with None where a pair has none (only
        when some pair of the batch has one)."""
        margins = [r.get("margin") for r in rows]
        batch = super().collate([{k: v for k, v in r.items() if k != "margin"} for r in rows])
        if any(m is not None for m in margins):
            batch["margin"] = margins
        return batch

    def _margin(self, batch: dict, device: torch.device) -> torch.Tensor | float | None:
        default = self.rm.margin
        margins = batch.get("margin")
        if margins is None:
            return default
        fill = 0.0 if default is None else float(default)
        return torch.tensor([fill if m is None else float(m) for m in margins],
                            dtype=torch.float32, device=device)

    def scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen, [B] rejected) rewards from one forward over the 2B rows."""
        ids, mask, _ = self.pairs(batch)
        s = sequence_scores(self.model, self.head, ids, mask)
        b = batch["chosen_input_ids"].shape[0]
        return s[:b], s[b:]

    def pair_outputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from fastpeft.ops import pairwise_reward_loss

        chosen, rejected = self.scores(batch)
        loss = pairwise_reward_loss(chosen, rejected, self._margin(batch, chosen.device),
                                    self.rm.center_rewards_coefficient)
        c, r = chosen.detach(), rejected.detach()
        return loss, {"accuracy": (c > r).float(), "rewards/chosen": c,
                      "rewards/rejected": r, "rewards/margin": c - r}

    # ---- output ---------------------------------------------------------------------------

    def save_reward_model(self, directory: str) -> None:
        """adapter/ or model/, the head and reward_model.json into `directory`."""
        from safetensors.torch import save_file

        from fastpeft.io import model_name_or_path
        from fastpeft.patching import is_patched, state_of

        os.makedirs(directory, exist_ok=True)
        patched = is_patched(self.model)
        written = save_final_model(self.model, self.tokenizer, directory)
        tokenizer_dir = None
        if patched and self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            tokenizer_dir = "tokenizer"
            self.tokenizer.save_pretrained(os.path.join(directory, tokenizer_dir))
        save_file({k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in self.head.state_dict().items()},
                  os.path.join(directory, HEAD_FILE), metadata={"format": "pt"})
        info = {
            "format_version": FORMAT_VERSION,
            "base_model": model_name_or_path(self.model),
            "method": state_of(self.model).peft_type.lower() if patched else "full",
            "adapter": os.path.basename(written) if patched else None,
            "model": None if patched else os.path.basename(written),
            "tokenizer": tokenizer_dir,
            "head": HEAD_FILE,
            "hidden_size": hidden_size(self.model),
            "max_length": self.max_length,
            "rm": self.rm.to_dict(),
        }
        tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, os.path.join(directory, CONFIG_FILE))

    def save_extra(self, directory: str) -> None:
        """A checkpoint of a patched model is itself a reward-model directory (the head is in
        trainer_state.pt either way)."""
        from fastpeft.patching import is_patched

        if is_patched(self.model):
            self.save_reward_model(directory)

    def on_train_end(self) -> None:
        self.save_reward_model(self.config.output_dir)


class RewardModel(nn.Module):
    """A trained reward model: `score(input_ids, attention_mask)` -> [B] fp32 rewards read at the
    last non-pad token; `model(prompts, completions)` -> list of floats, the texts tokenized as
    training tokenized them (fastpeft.data.tokenize_pair's joining of prompt and completion,
    BOS / EOS included, cut to the training max_length)."""

    def __init__(self, model: nn.Module, head: ScalarHead, tokenizer,
                 max_length: int | None = None, batch_size: int = 16):
        super().__init__()
        self.model = model
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] rewards of right- or left-padded rows."""
        return sequence_scores(self.model, self.head, input_ids.to(self.device),
                               attention_mask.to(self.device))

    def tokenize(self, prompt, completion) -> list[int]:
        """The input ids training would give (prompt, completion): the chosen side of
        tokenize_pair."""
        from fastpeft.data.tokenize import pair_to_sft, tokenize_sft

        if type(prompt) is not type(completion) or not isinstance(prompt, (str, list)):
            raise ValueError("prompts and completions must both be strings (or both lists of "
                             f"messages), got {type(prompt).__name__} and "
                             f"{type(completion).__name__}")
        sft, _ = pair_to_sft({"prompt": prompt, "chosen": completion, "rejected": completion})
        return tokenize_sft(self.tokenizer, sft, self.max_length)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list) -> list[float]:
        from fastpeft.data import pad_id_of, pad_lists

        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must have the same length, got "
                             f"{len(prompts)} and {len(completions)}")
        rows = [self.tokenize(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids = pad_lists(chunk, pad_id_of(self.tokenizer))
            mask = pad_lists([[1] * len(r) for r in chunk], 0)
            out += self.score(ids, mask).float().cpu().tolist()
        return out

    def forward(self, prompts: list, completions: list) -> list[float]:
        return self(prompts, completions)


def load_reward_model(directory: str, device: str | torch.device | None = None,
                      dtype: str | torch.dtype = "fp32", base_model: str | nn.Module | None = None,
                      tokenizer=None) -> RewardModel:
    """Rebuild the reward model RewardTrainer wrote to `directory` (its output_dir, or a
    checkpoint of a patched model): load_model(base) + load_adapter(adapter/), or
    load_model(model/) for full fine-tuning; then the head. Every parameter is frozen and the
    model is in eval mode.

    base_model: a name overriding the recorded base (e.g. a moved directory), or an already
        loaded, unpatched model to load the adapter into (it is patched in place; unpatch
        restores it), which saves loading the base again.
    tokenizer: overrides the saved tokenizer (or the base model's)."""
    from safetensors.torch import load_file

    from fastpeft import load_adapter
    from fastpeft.models import load_model
    from fastpeft.patching import is_patched

    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; not a reward-model directory (written by "
                                "RewardTrainer: reward_model.json, reward_head.safetensors, "
                                "adapter/ or model/)")
    with open(path) as f:
        info = json.load(f)
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version is {info.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    loaded_tokenizer = None
    if info.get("model"):
        if base_model is not None:
            raise ValueError(f"base_model: {path} holds a fully fine-tuned model "
                             f"({info['model']}/), which needs no base")
        model, loaded_tokenizer = load_model(os.path.join(directory, info["model"]), dtype)
    else:
        if isinstance(base_model, nn.Module):
            if is_patched(base_model):
                raise ValueError("base_model: expected an unpatched model to load the "
                                 "reward adapter into, got a patched one")
            model = base_model
        else:
            base = base_model or info.get("base_model")
            if not base:
                raise ValueError(f"{path}: base_model is not recorded (the trained model had "
                                 "no name_or_path); pass base_model=")
            model, loaded_tokenizer = load_model(base, dtype)
        load_adapter(model, os.path.join(directory, info["adapter"]),
                     allow_base_mismatch=base_model is not None)
        if info.get("tokenizer") and tokenizer is None:
            from transformers import AutoTokenizer

            loaded_tokenizer = AutoTokenizer.from_pretrained(
                os.path.join(directory, info["tokenizer"]))
    tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if tokenizer is None:
        raise ValueError(f"tokenizer: {directory} has no saved tokenizer and none was given")
    state = load_file(os.path.join(directory, info["head"]))
    head = ScalarHead(int(info["hidden_size"]), bias="linear.bias" in state)
    head.load_state_dict(state)
    if device is not None:
        model.to(device)
    head.to(next(model.parameters()).device)
    for p in list(model.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    model.eval()
    return RewardModel(model, head, tokenizer, max_length=info.get("max_length")).eval()


__all__ = ["RewardModel", "RewardTrainer", "load_reward_model"]
