"""PPO (RLHF) on the generic loop, as TRL's PPOTrainer, adapted to one PEFT model.

One Trainer step is one PPO iteration:

1. Rollout (eval mode, no grad): the next train.batch_size prompts of the loop's data order
   (so a resumed run continues with the same prompts) are left padded and sampled with the
   KV cache (model.generate: do_sample, temperature, top_p, max_new_tokens=response_length,
   stop at EOS). A response is its tokens up to and including the first EOS (the rest is
   padding and masked out).
2. One forward of prompt + response (final_hidden) gives the old log-probs (of the logits
   divided by the temperature, as TRL) through the fused linear_token_logprobs and the values
   (a ScalarHead on the same hidden states: the value head shares the policy's backbone). The
   reference log-probs come from the same model under fastpeft.disable_adapter: no second
   copy. (An unpatched model, full fine-tuning, gets a frozen deep copy as its reference.)
3. Scores: reward_fn(prompts, completions) -> list of floats (a callable, or
   ppo.reward_fn "file.py:function" / "module:function", or ppo.reward_model, a directory of
   the reward-model stage); minus missing_eos_penalty for a response without EOS. The
   per-token reward is -kl_coef * KL (k1: logp - ref; k3: exp(ref - logp) - 1 - (ref - logp))
   plus the score at the response's last token (its EOS, or its last token without one).
4. gae(gamma, lam) -> advantages (masked_whiten) and returns; optionally whitened rewards.
5. num_ppo_epochs passes over the rollout in a random order, each split into
   num_mini_batches mini-batches, each one optimizer step (gradient clipping as the loop
   does), each of train.grad_accum micro-batches: ppo_policy_loss(cliprange) +
   vf_coef * ppo_value_loss(cliprange_value), token means over the mini-batch.
6. With ppo.adaptive_kl, kl_coef follows Ziegler et al.'s proportional controller towards
   target_kl (its value is saved in checkpoints).

The lr schedule steps once per iteration (as TRL's PPOTrainer): train.max_steps,
warmup_steps and the schedule count PPO iterations; all mini-batch updates of an iteration use
the same lr. Differences from TRL: the EOS token is part of the response (trained, and its
position takes the score) also when pad == eos; log-prob and value masks are the same; a
masked mean over an empty mask is 0.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
import time
from typing import Callable

import torch
from torch import nn

from fastpeft.train import distributed
from fastpeft.train.config import PPOConfig, TrainConfig
from fastpeft.train.loop import NonFiniteLossError, Trainer, _to
from fastpeft.train.modeling import (ScalarHead, final_hidden, hidden_size, lm_parts,
                                     token_logprobs_from_hidden)

VALUE_HEAD_NAME = "value_head.safetensors"
PPO_STATE_NAME = "ppo_state.json"
_ENTROPY_CHUNK = 256  # rows of logits built at a time for the entropy metric


# ---- the reward function --------------------------------------------------------------------

def load_reward_fn(spec: str) -> Callable:
    """The callable named by a ppo.reward_fn spec: "path/to/file.py:function" (the file is
    imported as a module) or "package.module:function" (imported from sys.path)."""
    where = f"ppo.reward_fn {spec!r}"
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"ppo.reward_fn: expected \"path/to/file.py:function\" or "
                         f"\"module:function\", got {spec!r}")
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"{where}: expected \"path/to/file.py:function\" or "
                         f"\"module:function\" (both parts non-empty)")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: no such file {path}")
        module_name = f"_fastpeft_reward_{abs(hash(path))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise ImportError(f"{where}: importing {path} failed: "
                              f"{type(e).__name__}: {e}") from e
        source = path
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ImportError(f"{where}: cannot import module {target!r}: "
                              f"{type(e).__name__}: {e}") from e
        source = f"module {target}"
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v)
                         and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise AttributeError(f"{where}: {source} has no {name!r} (functions defined there: "
                             f"{defined})")
    if not callable(fn):
        raise TypeError(f"{where}: {name!r} in {source} is a {type(fn).__name__}, not a "
                        f"function")
    return fn


def check_scores(out, n: int, name: str) -> torch.Tensor:
    """[n] fp32 tensor of the scores a reward function returned for n completions; a clear
    error naming the function for a wrong count, a non-number or a non-finite value."""
    if torch.is_tensor(out):
        if out.dim() != 1:
            raise ValueError(f"reward function {name} returned a tensor of shape "
                             f"{tuple(out.shape)}; expected a list of {n} floats")
        values = out.detach().float().cpu().tolist()
    elif hasattr(out, "tolist") and hasattr(out, "ndim"):  # numpy arrays
        if out.ndim != 1:
            raise ValueError(f"reward function {name} returned an array of shape "
                             f"{tuple(out.shape)}; expected a list of {n} floats")
        values = out.tolist()
    elif isinstance(out, (list, tuple)):
        values = list(out)
    else:
        raise TypeError(f"reward function {name} must return a list of {n} floats, got "
                        f"{type(out).__name__}: {out!r:.200}")
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} scores for {n} "
                         f"completions")
    scores = []
    for i, v in enumerate(values):
        if torch.is_tensor(v) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"reward function {name}: score {i} is {v!r:.100} "
                            f"({type(v).__name__}), not a float")
        if not math.isfinite(float(v)):
            raise ValueError(f"reward function {name}: score {i} is {float(v)}")
        scores.append(float(v))
    return torch.tensor(scores, dtype=torch.float32)


def _fn_name(fn) -> str:
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{qual}" if module and not module.startswith("_fastpeft_reward") else qual


# ---- the KL coefficient ---------------------------------------------------------------------

def adaptive_kl_update(value: float, current_kl: float, n_steps: int, target: float,
                       horizon: int) -> float:
    """Ziegler et al. (2019)'s proportional controller, as TRL's AdaptiveKLController:
    value * (1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon)."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return value * (1.0 + error * n_steps / horizon)


class PPOTrainer(Trainer):
    """Args:
        model: a causal LM patched by fastpeft.patch (the policy; its reference is the same
            model with the adapters disabled). An unpatched model (full fine-tuning) trains
            every parameter that requires grad and gets a frozen deep copy as reference.
        tokenizer: its tokenizer: eos_token_id (generation stops there), the pad id
            (fastpeft.data.pad_id_of), decode / batch_decode for the reward function, and
            data loading when a dataset is a path.
        config: TrainConfig. One step = one PPO iteration on batch_size prompts; batch_size
            must be a multiple of ppo.num_mini_batches * grad_accum.
        ppo: PPOConfig.
        train_dataset / eval_dataset: prompts: lists of examples with input_ids (and
            optionally attention_mask and the prompt text "prompt") as
            fastpeft.data.load_prompt_dataset returns, or paths / hub ids loaded with it
            (max_length, format, skip_invalid). The eval set is scored with greedy
            completions (eval/scores).
        max_length: prompts loaded from a path are cut from the left to it; a prompt given
            in a list that is longer is an error.
        reward_fn: a callable (prompts: list[str], completions: list[str]) -> list[float];
            else ppo.reward_fn / ppo.reward_model says where the scores come from.
    """

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, ppo: PPOConfig,
                 train_dataset, eval_dataset=None, max_length: int | None = None,
                 format: str | None = None, skip_invalid: bool = False,
                 reward_fn: Callable | None = None):
        from fastpeft.data import Collator, load_prompt_dataset, pad_id_of
        from fastpeft.patching import is_patched, state_of

        if not isinstance(ppo, PPOConfig):
            raise TypeError(f"ppo must be a PPOConfig, got {type(ppo).__name__}")
        self.tokenizer = tokenizer
        self.ppo = ppo
        self.max_length = max_length
        self.data_stats = {}

        def load(source, split):
            if source is None:
                return None
            if isinstance(source, (str, os.PathLike)):
                if tokenizer is None:
                    raise ValueError(f"{split}_dataset is a path ({os.fspath(source)!r}); "
                                     "loading it needs a tokenizer")
                examples, stats = load_prompt_dataset(os.fspath(source), tokenizer,
                                                      max_length=max_length, format=format,
                                                      skip_invalid=skip_invalid)
                self.data_stats[split] = stats
                return examples
            return list(source)

        train = load(train_dataset, "train")
        evals = load(eval_dataset, "eval")
        lm_parts(model)  # a clear error for anything but a causal LM
        train = self._check_prompts(model, train, "train")
        if evals is not None:
            evals = self._check_prompts(model, evals, "eval")
        if getattr(config, "fsdp", False):
            raise ValueError("train.fsdp is not supported by PPO: generation runs a different "
                             "number of forwards on each rank, which FSDP's collectives cannot "
                             "follow; use data parallel (torchrun without train.fsdp)")
        split = ppo.num_mini_batches * config.grad_accum
        if config.batch_size % split:
            raise ValueError(f"train.batch_size ({config.batch_size}) must be a multiple of "
                             f"ppo.num_mini_batches x train.grad_accum ({ppo.num_mini_batches}"
                             f" x {config.grad_accum} = {split}): each PPO iteration splits "
                             f"its batch_size prompts into mini-batches of micro-batches")
        self.pad_token_id = pad_id_of(tokenizer)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
            eos = model.config.eos_token_id
            self.eos_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        super().__init__(model, config, train, evals,
                         Collator(pad_token_id=self.pad_token_id, padding_side="left"))
        self.reward_fn, self.reward_name = self._resolve_reward(reward_fn)
        # The value head, initialised from train.seed (not from whatever the global RNG holds).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.value_head = ScalarHead(hidden_size(model))
        self.value_head.to(self.device)
        self.kl_coef = float(ppo.kl_coef)
        self._patched = is_patched(model)
        self._prompt_learning = self._patched and state_of(model).peft_type in (
            "PROMPT_TUNING", "P_TUNING")
        self.ref_model = None
        if not self._patched:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

    # ---- set-up ---------------------------------------------------------------------------

    def _check_prompts(self, model: nn.Module, examples: list, split: str) -> list[dict]:
        """The prompts, checked, each with an attention_mask (all ones when missing: left
        padding must be masked)."""
        limit = getattr(model.config, "max_position_embeddings", None)
        out = []
        for i, ex in enumerate(examples):
            ids = ex.get("input_ids") if isinstance(ex, dict) else None
            if ids is None or len(ids) == 0:
                raise ValueError(f"{split} prompt {i}: no input_ids (got {ex!r:.200}); "
                                 "generation needs at least one prompt token")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(f"{split} prompt {i} has {len(ids)} tokens, more than "
                                 f"max_length={self.max_length}")
            if limit is not None and len(ids) + self.ppo.response_length > limit:
                raise ValueError(f"{split} prompt {i}: {len(ids)} tokens + "
                                 f"ppo.response_length {self.ppo.response_length} exceed the "
                                 f"model's max_position_embeddings ({limit})")
            if ex.get("attention_mask") is None:
                ex = dict(ex, attention_mask=[1] * len(ids))
            out.append(ex)
        return out

    def _resolve_reward(self, reward_fn) -> tuple[Callable, str]:
        spec, directory = self.ppo.reward_fn, self.ppo.reward_model
        if reward_fn is not None:
            if spec is not None or directory is not None:
                raise ValueError("reward_fn was passed as a callable and ppo.reward_fn / "
                                 f"ppo.reward_model is set too ({spec or directory!r}); give "
                                 "one source of scores")
            if not callable(reward_fn):
                raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
            return reward_fn, _fn_name(reward_fn)
        if callable(spec):
            return spec, _fn_name(spec)
        if spec is not None:
            return load_reward_fn(spec), repr(spec)
        if directory is not None:
            from fastpeft.train.reward import load_reward_model

            return (load_reward_model(directory, device=self.device),
                    f"reward model {directory!r}")
        raise ValueError("PPO needs scores: pass reward_fn=callable, or set ppo.reward_fn "
                         "(\"file.py:function\" or \"module:function\") or ppo.reward_model "
                         "(a reward-model directory)")

    def setup(self) -> None:
        self.value_head.to(self.device)
        super().setup()

    def heads(self) -> dict[str, nn.Module]:
        """The value head joins the trainable parameters (as value_head.linear.*: optimised,
        clipped, synced over ranks, checkpointed and restored on resume)."""
        head = getattr(self, "value_head", None)
        return {} if head is None else {"value_head": head}

    @property
    def total_steps(self) -> int:
        """PPO iterations: train.max_steps, else epochs x the batches of batch_size prompts
        per pass over the dataset."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        return max(1, round(self.config.epochs * self.batches_per_epoch))

    # ---- rollout --------------------------------------------------------------------------

    def _generation_config(self, greedy: bool):
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=self.ppo.response_length, min_new_tokens=None,
                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                  bos_token_id=None, use_cache=True, num_beams=1, repetition_penalty=1.0)
        if greedy:
            return GenerationConfig(do_sample=False, **kw)
        return GenerationConfig(do_sample=True, temperature=self.ppo.temperature, top_k=0,
                                top_p=self.ppo.top_p, **kw)

    @torch.no_grad()
    def generate(self, batch: dict, greedy: bool = False) -> dict:
        """Sample responses to a left-padded prompt batch (eval mode, KV cache). Returns
        query_responses [B, P+R], attention_mask and position_ids for them (padding and
        tokens after the first EOS masked out), responses [B, R] (pad after EOS), mask [B, R]
        (the response tokens, EOS included), has_eos [B] and last [B] (index of each
        response's last token)."""
        query, qmask = batch["input_ids"], batch["attention_mask"]
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                out = self.model.generate(input_ids=query, attention_mask=qmask,
                                          generation_config=self._generation_config(greedy))
        finally:
            self.model.train(was_training)
        P = query.shape[1]
        if out.shape[1] <= P or not torch.equal(out[:, :P], query):
            raise RuntimeError(f"{type(self.model).__name__}.generate returned {tuple(out.shape)}"
                               f" for prompts {tuple(query.shape)}; expected the prompts "
                               "followed by new tokens")
        responses = out[:, P:]
        B, R = responses.shape
        positions = torch.arange(R, device=responses.device)
        if self.eos_token_id is not None:
            is_eos = responses == self.eos_token_id
            has_eos = is_eos.any(dim=1)
            last = torch.where(has_eos, is_eos.to(torch.long).argmax(dim=1),
                               torch.full_like(has_eos, R - 1, dtype=torch.long))
        else:
            has_eos = torch.zeros(B, dtype=torch.bool, device=responses.device)
            last = torch.full((B,), R - 1, dtype=torch.long, device=responses.device)
        mask = positions.unsqueeze(0) <= last.unsqueeze(1)
        responses = responses.masked_fill(~mask, self.pad_token_id)
        attn = torch.cat([qmask.to(torch.long), mask.to(torch.long)], dim=1)
        return {"query_responses": torch.cat([query, responses], dim=1),
                "attention_mask": attn, "position_ids": self._positions(attn),
                "responses": responses, "mask": mask, "has_eos": has_eos, "last": last,
                "context_length": P}

    @staticmethod
    def _positions(attn: torch.Tensor) -> torch.Tensor:
        """Position ids as generate() counts them for left-padded prompts."""
        return (attn.cumsum(dim=1) - 1).clamp(min=0)

    def _texts(self, batch: dict, rollout: dict) -> tuple[list[str], list[str]]:
        """(prompt texts, completion texts without EOS and padding) for the reward function."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("PPO needs a tokenizer to decode completions for the reward "
                             "function")
        prompts = batch.get("prompt")
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            prompts = [tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                       for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        completions = []
        for ids, last, eos in zip(rollout["responses"].tolist(), rollout["last"].tolist(),
                                  rollout["has_eos"].tolist()):
            completions.append(tok.decode(ids[:last + (0 if eos else 1)],
                                          skip_special_tokens=True))
        return prompts, completions

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """[n] fp32 scores from the reward function, checked."""
        out = self.reward_fn(list(prompts), list(completions))
        return check_scores(out, len(completions), self.reward_name)

    def _forward(self, model: nn.Module, rollout: dict, rows, temperature: float):
        """(hidden states at the positions that predict the response tokens [b, R, H],
        log-probs of the response tokens [b, R] in fp32) of rollout rows `rows`."""
        P = rollout["context_length"]
        # prompt tuning / P-tuning place their own positions (they ignore position_ids)
        positions = None if self._prompt_learning else rollout["position_ids"][rows]
        hidden = final_hidden(model, rollout["query_responses"][rows],
                              rollout["attention_mask"][rows], positions)
        h = hidden[:, P - 1:-1]
        logp = token_logprobs_from_hidden(model, h, rollout["responses"][rows], temperature)
        return h, logp.float()

    @torch.no_grad()
    def _reference_logprobs(self, rollout: dict, rows) -> torch.Tensor:
        T = self.ppo.temperature
        if self.ref_model is not None:
            return self._forward(self.ref_model, rollout, rows, T)[1]
        from fastpeft.patching import disable_adapter

        with disable_adapter(self.model):
            return self._forward(self.model, rollout, rows, T)[1]

    @torch.no_grad()
    def _entropy(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum and count of the per-token entropy of softmax(logits / temperature) over the
        masked positions; the logits are built _ENTROPY_CHUNK rows at a time."""
        from fastpeft.ops import token_logprobs

        _, head = lm_parts(self.model)
        flat_h, flat_t = h.detach()[mask], tokens[mask]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, flat_h.shape[0], _ENTROPY_CHUNK):
            with self.autocast():
                logits = head(flat_h[s:s + _ENTROPY_CHUNK])
            if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                logits = logits.float()
            _, ent = token_logprobs(logits, flat_t[s:s + _ENTROPY_CHUNK],
                                    temperature=self.ppo.temperature, return_entropy=True)
            total += ent.float().sum()
        return total

    def _micro_size(self, n: int) -> int:
        return max(1, n // (self.ppo.num_mini_batches * self.config.grad_accum))

    @torch.no_grad()
    def make_experience(self, batch: dict) -> tuple[dict, dict]:
        """Rollout, old log-probs, values, reference log-probs, scores, rewards, advantages
        and returns of one prompt batch (on the device); and the objective/* metrics."""
        from fastpeft.ops import gae, masked_whiten

        ppo = self.ppo
        rollout = self.generate(batch)
        B = rollout["responses"].shape[0]
        mask = rollout["mask"]
        was_training = self.model.training
        self.model.eval()
        logps, refs, values = [], [], []
        try:
            with self.autocast():
                for s in range(0, B, self._micro_size(B)):
                    rows = slice(s, min(s + self._micro_size(B), B))
                    h, logp = self._forward(self.model, rollout, rows, ppo.temperature)
                    logps.append(logp)
                    values.append(self.value_head(h).float())
                    refs.append(self._reference_logprobs(rollout, rows))
        finally:
            self.model.train(was_training)
        logp, ref, values = torch.cat(logps), torch.cat(refs), torch.cat(values)
        prompts, completions = self._texts(batch, rollout)
        scores = self.score(prompts, completions).to(logp.device)
        raw_scores = scores.clone()
        if ppo.missing_eos_penalty is not None:
            scores = scores - ppo.missing_eos_penalty * (~rollout["has_eos"]).float()
        fmask = mask.float()
        d = logp - ref
        kl = (d if ppo.kl_estimator == "k1" else torch.expm1(-d) + d) * fmask
        non_score = -self.kl_coef * kl
        rewards = non_score.clone()
        rows = torch.arange(B, device=rewards.device)
        rewards[rows, rollout["last"]] += scores
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * fmask
        advantages, returns = gae(rewards, values * fmask, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask) * fmask
        rollout.update(logprobs=logp, ref_logprobs=ref, values=values * fmask,
                       advantages=advantages, returns=returns, scores=scores)
        rollout["prompts"], rollout["completions"] = prompts, completions
        seq_kl = kl.sum(1)
        stats = {
            "objective/kl": seq_kl.mean().item(),
            "objective/entropy": (-logp * fmask).sum(1).mean().item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/raw_scores": raw_scores.mean().item(),
            "objective/kl_coef": self.kl_coef,
            "val/num_eos_tokens": int(rollout["has_eos"].sum()),
            "val/response_length": float(mask.sum(1).float().mean()),
        }
        return rollout, stats

    # ---- the PPO iteration ----------------------------------------------------------------

    def _optimizer_step(self, step: int, where: str) -> float | None:
        """One optimizer step on the accumulated gradients: sum them over ranks (the loop's
        sync_gradients; a no-op in one process), clip to train.max_grad_norm (the norm is
        returned either way), step, zero. None when the gradient norm is not finite and
        train.on_nan is skip (the update is dropped and counted in skipped_steps)."""
        self.sync_gradients()
        norm = self.clip_and_norm_gradients()
        if not torch.isfinite(norm):
            if self.config.on_nan == "stop":
                raise NonFiniteLossError(f"step {step} ({where}): the gradient norm is "
                                         f"{norm.item()} (train.on_nan=stop)")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _minibatch(self, rollout: dict, idx: torch.Tensor, step: int, where: str) -> dict | None:
        """Forward + backward of one mini-batch (grad_accum micro-batches; the losses are token
        means over the whole mini-batch, of every rank: the gradients summed over ranks are
        those of one process with the global batch); its stats (this rank's, weighted by its
        share of the tokens), or None when a loss of any rank was not finite and train.on_nan
        is skip (every rank takes the same decision)."""
        ppo = self.ppo
        mask = rollout["mask"]
        n_tok = torch.as_tensor(distributed.all_reduce_sum(float(mask[idx].sum())),
                                dtype=torch.float32, device=mask.device).clamp(min=1)
        bad = None
        acc = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
               "ratio": 0.0, "vf_clipfrac": 0.0, "entropy": 0.0, "loss": 0.0}
        for micro in torch.tensor_split(idx, self.config.grad_accum):
            if micro.numel() == 0:
                continue
            m = mask[micro]
            weight = m.sum().float() / n_tok
            with self.autocast():
                h, logp = self._forward(self.model, rollout, micro, ppo.temperature)
                new_values = self.value_head(h).float()
            from fastpeft.ops import ppo_policy_loss, ppo_value_loss

            pg_loss, pg_stats = ppo_policy_loss(
                logp, rollout["logprobs"][micro], rollout["advantages"][micro], m,
                clip_low=ppo.cliprange, clip_high=ppo.cliprange)
            vf_loss, vf_stats = ppo_value_loss(new_values, rollout["values"][micro],
                                               rollout["returns"][micro], m,
                                               clip=ppo.cliprange_value)
            loss = (pg_loss + ppo.vf_coef * vf_loss) * weight
            if not torch.isfinite(loss.detach()):
                if bad is None:
                    bad = float(loss.detach())
                continue
            loss.backward()
            w = float(weight)
            acc["loss"] += float(loss.detach())
            acc["pg_loss"] += float(pg_loss.detach()) * w
            acc["vf_loss"] += float(vf_loss.detach()) * w
            acc["clipfrac"] += float(pg_stats["clipfrac"]) * w
            acc["approx_kl"] += float(pg_stats["approx_kl"]) * w
            acc["ratio"] += float(pg_stats["ratio_mean"]) * w
            acc["vf_clipfrac"] += float(vf_stats["vf_clipfrac"]) * w
            acc["entropy"] += float(self._entropy(h, rollout["responses"][micro], m)) / float(n_tok)
        if distributed.is_distributed():
            found = [b for b in distributed.all_gather_object(bad) if b is not None]
            bad = found[0] if found else None
        if bad is not None:
            if self.config.on_nan == "stop":
                raise NonFiniteLossError(
                    f"step {step} ({where}): the loss is {bad} (train.on_nan=stop; set "
                    "train.on_nan=skip to skip such updates)")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return None
        return acc

    def train_step(self) -> dict:
        """One PPO iteration (see the module docstring)."""
        ppo = self.ppo
        step = self.step + 1
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        batch = _to(self.next_batch(), self.device)
        filler = self.batch_is_filler
        rollout, stats = self.make_experience(batch)
        if filler:  # no prompts for this rank in the epoch's last, short batch: no loss
            rollout["mask"] = torch.zeros_like(rollout["mask"])
        B = rollout["responses"].shape[0]
        self.model.train()
        sums: dict[str, float] = {}
        norms: list[float] = []
        updates = 0
        for epoch in range(ppo.num_ppo_epochs):
            order = torch.randperm(B).to(self.device)
            for m, idx in enumerate(torch.tensor_split(order, ppo.num_mini_batches)):
                if idx.numel() == 0 and not distributed.is_distributed():
                    continue  # (under torchrun every rank takes part in every update)
                where = f"PPO epoch {epoch}, mini-batch {m}"
                acc = self._minibatch(rollout, idx, step, where)
                if acc is None:
                    continue
                norm = self._optimizer_step(step, where)
                if norm is None:
                    continue
                norms.append(norm)
                updates += 1
                for k, v in acc.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.scheduler.step()
        n_prompts = 0 if filler else B
        stats = self._mean_over_ranks(stats, n_prompts)
        # each rank's sums are its share of the global token means: they add up over ranks
        sums = {k: distributed.all_reduce_sum(v) for k, v in sorted(sums.items())}
        n_prompts = int(distributed.all_reduce_sum(n_prompts))
        if ppo.adaptive_kl:
            self.kl_coef = adaptive_kl_update(self.kl_coef, stats["objective/kl"], n_prompts,
                                              ppo.target_kl, ppo.kl_horizon)
        self.step = step
        tokens = int(distributed.all_reduce_sum(
            0 if filler else int(rollout["attention_mask"].sum())))
        self.tokens_seen += tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        avg = {k: v / max(updates, 1) for k, v in sums.items()}
        nan = float("nan")
        metrics = {
            "loss": avg.get("loss", nan), "lr": lr,
            "epoch": self.epoch + self.batch_index / self.batches_per_epoch,
            "tokens": tokens, "tokens_per_s": tokens / elapsed, **stats,
            "policy/approxkl_avg": avg.get("approx_kl", nan),
            "policy/clipfrac_avg": avg.get("clipfrac", nan),
            "policy/entropy_avg": avg.get("entropy", nan),
            "loss/policy_avg": avg.get("pg_loss", nan),
            "loss/value_avg": avg.get("vf_loss", nan),
            "val/clipfrac_avg": avg.get("vf_clipfrac", nan),
            "val/ratio": avg.get("ratio", nan),
        }
        if norms:
            metrics["grad_norm"] = sum(norms) / len(norms)
        return self.finish_step(step, metrics)

    @staticmethod
    def _mean_over_ranks(values: dict, weight: float) -> dict:
        """Weighted means over ranks of per-rank metrics (val/num_eos_tokens is summed); the
        values themselves in one process."""
        if not distributed.is_distributed():
            return values
        gathered = distributed.all_gather_object((values, weight))
        total = sum(w for _, w in gathered) or 1.0
        out = {}
        for k, v in values.items():
            if k == "val/num_eos_tokens":
                out[k] = int(sum(g[k] for g, w in gathered if w))
            elif k == "objective/kl_coef":
                out[k] = v
            else:
                out[k] = sum(g[k] * w for g, w in gathered if k in g) / total
        return out

    def evaluate(self) -> dict:
        """Scores of greedy completions of the eval prompts (no sampling, so the global RNG
        and with it the training run are untouched): eval/scores (the reward function's raw
        scores), eval/num_eos_tokens, eval/response_length."""
        if self.eval_dataset is None:
            return {}
        total, eos, length, n = 0.0, 0, 0.0, 0
        bs = self.config.batch_size
        for s in range(0, len(self.eval_dataset), bs):
            rows = self.eval_dataset[s:s + bs]
            batch = _to(self.collate(rows), self.device)
            rollout = self.generate(batch, greedy=True)
            prompts, completions = self._texts(batch, rollout)
            total += float(self.score(prompts, completions).sum())
            eos += int(rollout["has_eos"].sum())
            length += float(rollout["mask"].sum())
            n += len(rows)
        return {"eval/scores": total / n, "eval/num_eos_tokens": eos,
                "eval/response_length": length / n}

    # ---- checkpoints and output -----------------------------------------------------------

    def _save_model_files(self, directory: str) -> None:
        from safetensors.torch import save_file

        if self._patched:
            from fastpeft import save_adapter

            save_adapter(self.model, os.path.join(directory, "adapter"))
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous()
                   for k, v in self.value_head.state_dict().items()},
                  os.path.join(directory, VALUE_HEAD_NAME))

    def save_extra(self, directory: str) -> None:
        self._save_model_files(directory)
        with open(os.path.join(directory, PPO_STATE_NAME), "w") as f:
            json.dump({"kl_coef": self.kl_coef}, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path: str) -> None:
        """The loop's state (the value head is among the trainable parameters) and the KL
        coefficient."""
        super().load_checkpoint(path)
        state_file = os.path.join(path, PPO_STATE_NAME)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{path}: no {PPO_STATE_NAME}; not a PPO checkpoint")
        with open(state_file) as f:
            self.kl_coef = float(json.load(f)["kl_coef"])

    def on_train_end(self) -> None:
        """output_dir/adapter/ (peft format; for an unpatched model the full model in
        output_dir/model/) and output_dir/value_head.safetensors (linear.weight [1, H],
        linear.bias [1] of a ScalarHead)."""
        out = self.config.output_dir
        self._save_model_files(out)
        if not self._patched:
            self.model.save_pretrained(os.path.join(out, "model"))
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(os.path.join(out, "model"))


__all__ = ["PPOTrainer", "adaptive_kl_update", "check_scores", "load_reward_fn"]
