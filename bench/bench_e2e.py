"""End-to-end training steps: fastpeft against peft + transformers (SFT), TRL (DPO) and a plain
PyTorch PPO loop (PPO; the installed trl ships no PPO trainer, see below).

All sides start from the same base weights and the same LoRA weights: LoRA on all linear
layers, r=16, lora_alpha=32, dropout 0.05; peft.get_peft_model builds the LoRA, its weights
(B made nonzero) are copied into fastpeft.patch's (bench_patch.make_models). Same batch, same
seed, AdamW (lr 2e-4, betas 0.9/0.999, eps 1e-8, no weight decay) on both sides. fp32 on the
CPU; bf16 weights on CUDA.

SFT (B=4 x T=256 random token ids, labels = input_ids), one optimizer step:
- fastpeft: `model(input_ids, labels=ids).loss` of the fastpeft-patched model, which in
  training goes through the fused linear_cross_entropy (logits=None), `.backward()`, AdamW
  step, zero_grad.
- peft: the same on peft.get_peft_model(model): transformers' own forward (full [B, T, vocab]
  logits) and its ForCausalLMLoss, `.backward()`, AdamW step, zero_grad.
  No gradient clipping on either side. tokens/s = B*T / median step time.

DPO (B=4 pairs of preference rows made of seeded random words, 40-word prompts and 40-word
completions, about 80 tokens a row with the EOS TRL appends; beta 0.1, sigmoid loss), one
optimizer step:
- fastpeft: fastpeft.train.DPOTrainer.train_step(): reference log-probs of the 2B rows under
  fastpeft.disable_adapter (eval mode, no grad), then the policy's (one forward for chosen +
  rejected), both through the fused linear_token_logprobs; dpo_loss; backward; gradient
  clipping to 1.0; AdamW step.
- TRL: trl.DPOTrainer (1.16) on the peft model (no ref_model: TRL's reference is the same
  model with the adapters disabled, `use_adapter(model, None)`), gradient_checkpointing off,
  no precomputed reference log-probs (fastpeft computes them per step too):
  `trainer.training_step(model, batch)` (TRL's compute_loss: the reference forward under
  no_grad, the policy forward, both with TRL's `fused_lm_head=True` log-prob path; backward),
  then clip_grad_norm_(1.0), the trainer's own AdamW (create_optimizer) step, zero_grad.
  The tokens come from TRL's tokenization (prompt, completion + EOS); fastpeft gets the very
  same ids (labels -100 on the prompt). TRL's collator's batch is the same 2B rows.

PPO, one iteration (generate, score, update) on B=4 prompts of 32 tokens, response_length 32,
temperature 0.7, 2 PPO epochs of 1 mini-batch, kl_coef 0.05, vf_coef 0.1, cliprange 0.2,
gamma 1, lam 0.95, clipping to 1.0; reward = the share of vowels in the completion text:
- fastpeft: fastpeft.train.PPOTrainer.train_step() (module docstring of train/ppo.py): KV-cache
  sampling, one forward for the old log-probs and values (fused linear_token_logprobs, no
  logits tensor) and one under disable_adapter for the reference, fastpeft.ops.gae /
  masked_whiten, ppo_policy_loss + ppo_value_loss.
- plain: trl 1.16 ships no PPOTrainer (neither trl.trainer nor trl.experimental has one), so
  the baseline is `PlainPPO` below: the same steps written with plain PyTorch on the peft
  model: model.generate with the same GenerationConfig, full logits -> log_softmax -> gather
  for log-probs, the value head (a copy of fastpeft's initial value head) on
  output_hidden_states[-1], the reference under peft's disable_adapter, a Python loop GAE,
  masked whitening, the clipped policy and value losses, the same AdamW.
  Sampling is seeded identically on both sides each round, but response lengths can differ
  (sampling stops at EOS), so the results record each side's mean response length.

Timing: the sides run in one process, interleaved in shuffled order each round, after one
warm-up step each; medians over the rounds (>= 5 in the full run), ratios from the same run.

Peak memory, measured in a separate process per side and task (this script with --child):
- rss_max_mb: the process's RSS high-water mark (resource.getrusage ru_maxrss) after a
  warm-up step and a measured step: everything the process touched (weights, libraries,
  optimizer state, activations). The same base load on both sides, so it dilutes the ratio.
- rss_step_mb: the RSS high-water mark during the measured step above the RSS before it
  (/proc/self/clear_refs resets the mark; None where that is unavailable).
- torch_peak_mb: bench/_common.peak_mb of the measured step: the most bytes torch's allocator
  held above what it held before (CPU: torch.profiler memory events; CUDA:
  max_memory_allocated).
The SFT step is also profiled (torch.profiler, top ops by self CPU time) on both sides, so a
missed target shows where the time goes.

    python bench/bench_e2e.py [--device cpu|cuda] [--quick] [--rounds N] [--out DIR]
                              [--tasks sft,dpo,ppo] [--model smollm2|1b]

--quick: a tiny random Llama (SmolLM2's tokenizer and vocabulary), shorter batches: a smoke
test. --model 1b (for a GPU run): a Llama-3.2-1B-shaped model with random weights and SmolLM2's
vocabulary (49152), bf16. The CUDA path is written but has not been run on a GPU.
"""

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastpeft
from _common import RESULTS, peak_mb, reset_rss_high_water, write_results

TASKS = ("sft", "dpo", "ppo")
LR, BETA, SEED = 2e-4, 0.1, 0
SIDES = {"sft": ("fastpeft", "peft"), "dpo": ("fastpeft", "trl"), "ppo": ("fastpeft", "plain")}
TARGET_SPEEDUP, TARGET_MEMORY = 1.3, 0.7


def sizes(quick: bool) -> dict:
    if quick:
        return dict(sft_batch=2, sft_seq=32, dpo_pairs=2, dpo_words=(6, 6), ppo_prompts=2,
                    ppo_prompt_words=6, response_length=8, ppo_epochs=1)
    return dict(sft_batch=4, sft_seq=256, dpo_pairs=4, dpo_words=(40, 40), ppo_prompts=4,
                ppo_prompt_words=20, response_length=32, ppo_epochs=2)


# ---- models -----------------------------------------------------------------------------------

def load_tokenizer():
    from transformers import AutoTokenizer

    from fastpeft.default_model import GGUF_FILE, default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_base(kind: str, vocab: int, device: str = "cpu"):
    """(model, name) of the base: SmolLM2-135M-Instruct (fastpeft.models.load_model), or a
    random-weight Llama from a config ("tiny", "1b"; the 1B one is initialised on `device`,
    which is much faster on a GPU than on the CPU)."""
    if kind == "smollm2":
        from fastpeft.models import load_model

        model = load_model("smollm2-135m", "fp32", with_tokenizer=False)[0]
        # Loaded from a GGUF file, the model carries a GGUF "quantizer" although its weights
        # are dequantized fp32 tensors; transformers' Trainer (under TRL) refuses to train a
        # model with a quantizer that cannot train, so drop it.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
        return model, "SmolLM2-135M-Instruct"
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind == "tiny":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True)
        name = "tiny-llama"
    elif kind == "1b":  # Llama-3.2-1B's shape, SmolLM2's vocabulary
        config = LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        name = "llama-1b-shape (random)"
    else:
        raise ValueError(f"--model: expected smollm2 or 1b, got {kind!r}")
    torch.manual_seed(SEED)
    with torch.device(device if kind == "1b" else "cpu"):
        return LlamaForCausalLM(config), name


def make_pair(base, device, dtype):
    """(peft model, fastpeft model) with the same LoRA weights, in train mode."""
    from bench_patch import make_models

    torch.manual_seed(SEED)
    return make_models(copy.deepcopy(base), device, dtype)


def adamw(params):
    return torch.optim.AdamW(list(params), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.0)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def fast_train_config(out: str, batch: int):
    from fastpeft.train.config import TrainConfig

    return TrainConfig(output_dir=out, max_steps=10**6, batch_size=batch, lr=LR, seed=SEED,
                       max_grad_norm=1.0, log_every=10**6, tensorboard=False, plots=False,
                       progress=False, dtype="fp32")


def words(rng: random.Random, n: int) -> str:
    vocab = ["the", "model", "learns", "a", "small", "task", "with", "data", "from", "many",
             "kinds", "of", "text", "and", "numbers", "over", "time", "while", "it", "trains"]
    return " ".join(rng.choice(vocab) for _ in range(n))


# ---- SFT --------------------------------------------------------------------------------------

class SFTSide:
    """One optimizer step of LoRA SFT: loss, backward, AdamW step (see the module docstring)."""

    def __init__(self, model, ids):
        self.model, self.ids = model, ids
        self.optimizer = adamw(trainable(model))
        self.tokens = ids.numel()

    def step(self):
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def sft_sides(base, tok, args, S, which=("fastpeft", "peft")):
    peft_model, fast_model = make_pair(base, args.device, args.dtype)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, fast_model.config.vocab_size, (S["sft_batch"], S["sft_seq"]),
                        generator=g).to(args.device)
    sides = {"fastpeft": lambda: SFTSide(fast_model, ids), "peft": lambda: SFTSide(peft_model, ids)}
    return {name: sides[name]() for name in which}


# ---- DPO --------------------------------------------------------------------------------------

def dpo_texts(S) -> list[dict]:
    rng = random.Random(SEED)
    p, c = S["dpo_words"]
    return [{"prompt": words(rng, p) + "\n", "chosen": words(rng, c), "rejected": words(rng, c)}
            for _ in range(S["dpo_pairs"])]


class TRLDPOSide:
    def __init__(self, peft_model, tok, args, S, out):
        import datasets
        import trl

        n = S["dpo_pairs"]
        config = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=n, learning_rate=LR, beta=BETA,
            max_length=1024, gradient_checkpointing=False, precompute_ref_log_probs=False,
            report_to=[], logging_steps=10**6, save_strategy="no", seed=SEED,
            use_cpu=args.device == "cpu", bf16=False, dataloader_num_workers=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=1.0, lr_scheduler_type="constant")
        self.trainer = trl.DPOTrainer(model=peft_model, args=config, processing_class=tok,
                                      train_dataset=datasets.Dataset.from_list(dpo_texts(S)))
        self.model = self.trainer.model
        # what Trainer.train() sets before its first training_step
        self.trainer.current_gradient_accumulation_steps = 1
        self.trainer.create_optimizer()
        self.optimizer = self.trainer.optimizer
        rows = [self.trainer.train_dataset[i] for i in range(n)]
        self.rows = rows
        batch = self.trainer.data_collator(rows)
        self.batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.tokens = int(self.batch["attention_mask"].sum())

    def step(self):
        loss = self.trainer.training_step(self.model, self.batch)
        torch.nn.utils.clip_grad_norm_(trainable(self.model), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class FastDPOSide:
    def __init__(self, fast_model, tok, rows, args, S, out):
        from fastpeft.train.config import DPOConfig
        from fastpeft.train.dpo import DPOTrainer

        examples = []
        for r in rows:  # TRL's token ids: prompt_ids + chosen_ids / rejected_ids
            ex = {}
            for side in ("chosen", "rejected"):
                ids = list(r["prompt_ids"]) + list(r[f"{side}_ids"])
                ex[f"{side}_input_ids"] = ids
                ex[f"{side}_labels"] = [-100] * len(r["prompt_ids"]) + list(r[f"{side}_ids"])
                ex[f"{side}_attention_mask"] = [1] * len(ids)
            examples.append(ex)
        self.trainer = DPOTrainer(fast_model, tok, fast_train_config(out, len(rows)),
                                  DPOConfig(beta=BETA), examples)
        self.trainer.setup()
        self.tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
                          for e in examples)

    def step(self):
        return self.trainer.train_step()["loss"]


def dpo_sides(base, tok, args, S, which=("fastpeft", "trl")):
    """The DPO sides. TRL tokenizes the rows; fastpeft gets TRL's token ids (in a --child
    process for fastpeft alone, from the file --dpo-rows that the parent wrote)."""
    peft_model, fast_model = make_pair(base, args.device, args.dtype)
    out = tempfile.mkdtemp(prefix="bench_e2e_dpo_")
    sides = {}
    if "trl" in which:
        sides["trl"] = TRLDPOSide(peft_model, tok, args, S, out + "/trl")
        rows = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for r in sides["trl"].rows]
        args.dpo_rows_data = rows
    else:
        del peft_model
        rows = json.loads(Path(args.dpo_rows).read_text())
    if "fastpeft" in which:
        sides["fastpeft"] = FastDPOSide(fast_model, tok, rows, args, S, out + "/fast")
    return sides


# ---- PPO --------------------------------------------------------------------------------------

def vowel_reward(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def ppo_config(S):
    from fastpeft.train.config import PPOConfig

    return PPOConfig(kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
                     lam=0.95, num_ppo_epochs=S["ppo_epochs"], num_mini_batches=1,
                     response_length=S["response_length"], temperature=0.7)


class FastPPOSide:
    def __init__(self, fast_model, tok, prompts, args, S, out):
        from fastpeft.train.ppo import PPOTrainer

        self.trainer = PPOTrainer(fast_model, tok, fast_train_config(out, len(prompts)),
                                  ppo_config(S), prompts, reward_fn=vowel_reward)
        self.trainer.setup()
        self.value_head = self.trainer.value_head
        self.lengths = []
        self.tokens = 0

    def step(self):
        m = self.trainer.train_step()
        self.lengths.append(m["val/response_length"])
        self.tokens = m["tokens"]
        return m["loss"]


class PlainPPO:
    """One PPO iteration written with plain PyTorch on a peft model (the baseline; see the
    module docstring): full logits, log_softmax, a Python GAE loop, TRL's formulas."""

    def __init__(self, peft_model, tok, prompts, value_head, args, S):
        from fastpeft.data import Collator

        self.model, self.tok, self.cfg = peft_model, tok, ppo_config(S)
        self.value_head = copy.deepcopy(value_head).to(args.device)
        self.batch = Collator(pad_token_id=tok.pad_token_id, padding_side="left")(prompts)
        self.batch = {k: v.to(args.device) for k, v in self.batch.items() if torch.is_tensor(v)}
        self.optimizer = adamw(trainable(self.model) + list(self.value_head.parameters()))
        self.lengths = []
        self.tokens = 0

    def gen_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=True, temperature=self.cfg.temperature, top_k=0,
                                top_p=self.cfg.top_p, max_new_tokens=self.cfg.response_length,
                                min_new_tokens=None, eos_token_id=self.tok.eos_token_id,
                                pad_token_id=self.tok.pad_token_id, bos_token_id=None,
                                use_cache=True, num_beams=1, repetition_penalty=1.0)

    def forward(self, qr, attn, pos, P):
        out = self.model(input_ids=qr, attention_mask=attn, position_ids=pos,
                         output_hidden_states=True, use_cache=False)
        logits = out.logits[:, P - 1:-1].float() / self.cfg.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, qr[:, P:, None]).squeeze(-1)
        values = self.value_head(out.hidden_states[-1][:, P - 1:-1])
        return logp, values

    @staticmethod
    def whiten(x, mask, shift_mean=True):
        n = mask.sum()
        mean = (x * mask).sum() / n
        var = ((x - mean) ** 2 * mask).sum() / (n - 1)
        w = (x - mean) * torch.rsqrt(var + 1e-8)
        return w if shift_mean else w + mean

    def step(self):
        cfg, model = self.cfg, self.model
        query, qmask = self.batch["input_ids"], self.batch["attention_mask"]
        P = query.shape[1]
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=query, attention_mask=qmask,
                                 generation_config=self.gen_config())
            resp = out[:, P:]
            B, R = resp.shape
            is_eos = resp == self.tok.eos_token_id
            has_eos = is_eos.any(1)
            last = torch.where(has_eos, is_eos.long().argmax(1), torch.full_like(has_eos, R - 1,
                                                                                  dtype=torch.long))
            mask = torch.arange(R, device=resp.device)[None] <= last[:, None]
            resp = resp.masked_fill(~mask, self.tok.pad_token_id)
            qr = torch.cat([query, resp], 1)
            attn = torch.cat([qmask.long(), mask.long()], 1)
            pos = (attn.cumsum(1) - 1).clamp(min=0)
            old_logp, old_values = self.forward(qr, attn, pos, P)
            with model.disable_adapter():
                ref_logp, _ = self.forward(qr, attn, pos, P)
            texts = [self.tok.decode(r[: int(n) + (0 if e else 1)].tolist(),
                                     skip_special_tokens=True)
                     for r, n, e in zip(resp, last, has_eos)]
            scores = torch.tensor(vowel_reward(None, texts), device=resp.device)
            fmask = mask.float()
            old_values = old_values * fmask
            rewards = -cfg.kl_coef * (old_logp - ref_logp) * fmask
            rewards[torch.arange(B), last] += scores
            adv = torch.zeros_like(rewards)
            lastgae = torch.zeros(B, device=rewards.device)
            for t in reversed(range(R)):
                next_v = old_values[:, t + 1] if t + 1 < R else torch.zeros(B, device=resp.device)
                delta = rewards[:, t] + cfg.gamma * next_v - old_values[:, t]
                lastgae = delta + cfg.gamma * cfg.lam * lastgae
                adv[:, t] = lastgae
            returns = adv + old_values
            adv = self.whiten(adv, fmask) * fmask
        self.lengths.append(float(mask.sum(1).float().mean()))
        self.tokens = int(attn.sum())
        model.train()
        n = fmask.sum().clamp(min=1)
        for _ in range(cfg.num_ppo_epochs):
            logp, values = self.forward(qr, attn, pos, P)
            ratio = torch.exp(logp - old_logp)
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
            pg_loss = (pg * fmask).sum() / n
            v_clip = old_values + (values - old_values).clamp(-cfg.cliprange_value,
                                                              cfg.cliprange_value)
            vf = 0.5 * torch.max((values - returns) ** 2, (v_clip - returns) ** 2)
            loss = pg_loss + cfg.vf_coef * (vf * fmask).sum() / n
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable(model) + list(self.value_head.parameters()),
                                           1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def ppo_prompts(tok, S) -> list[dict]:
    rng = random.Random(SEED + 1)
    out = []
    for _ in range(S["ppo_prompts"]):
        text = words(rng, S["ppo_prompt_words"])
        ids = tok(text)["input_ids"]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "prompt": text})
    return out


def ppo_sides(base, tok, args, S, which=("fastpeft", "plain")):
    from fastpeft.train.modeling import ScalarHead, hidden_size

    peft_model, fast_model = make_pair(base, args.device, args.dtype)
    out = tempfile.mkdtemp(prefix="bench_e2e_ppo_")
    prompts = ppo_prompts(tok, S)
    with torch.random.fork_rng(devices=[]):  # as PPOTrainer initialises its value head
        torch.manual_seed(SEED)
        head = ScalarHead(hidden_size(fast_model))
    sides = {}
    if "fastpeft" in which:
        sides["fastpeft"] = FastPPOSide(fast_model, tok, prompts, args, S, out)
        if not torch.equal(sides["fastpeft"].value_head.linear.weight.cpu(), head.linear.weight):
            raise RuntimeError("the plain PPO value head differs from PPOTrainer's initial one")
    if "plain" in which:
        sides["plain"] = PlainPPO(peft_model, tok, prompts, head, args, S)
    return sides


BUILDERS = {"sft": sft_sides, "dpo": dpo_sides, "ppo": ppo_sides}


# ---- measuring --------------------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(sides: dict, rounds: int, device: str, seeded: bool) -> dict:
    """{side: [seconds per step]}: one warm-up step each, then `rounds` rounds, the sides in a
    shuffled order each round (seeded: the global RNG reset to the same seed before each
    side's step of a round, so both sample alike)."""
    order = list(sides)
    for name in order:
        torch.manual_seed(SEED)
        sides[name].step()
    times = {name: [] for name in sides}
    shuffle = random.Random(SEED)
    for r in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            if seeded:
                torch.manual_seed(SEED + 1 + r)
            sync(device)
            start = time.perf_counter()
            sides[name].step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def top_ops(side, n: int = 12) -> list[dict]:
    """The `n` ops with the most self CPU time in one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
             "share": e.self_cpu_time_total / total} for e in rows[:n]]


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _hwm_mb() -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def child_main(args) -> int:
    """--child TASK:SIDE: build one side, one warm-up step, one measured step; print the
    memory figures as one JSON line."""
    task, side = args.child.split(":")
    tok, base, _ = setup_models(args)
    S = sizes(args.quick)
    sides = BUILDERS[task](base, tok, args, S, which=(side,))
    del base
    s = sides[side]
    torch.manual_seed(SEED)
    s.step()
    before = _rss_mb()
    # ru_maxrss follows the mark that clear_refs resets: read the high-water mark so far first
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    step_rss = None
    reset = reset_rss_high_water()
    torch.manual_seed(SEED + 1)
    torch_peak = peak_mb(s.step, args.device)
    if reset and before is not None:
        step_rss = _hwm_mb() - before
    maxrss = max(maxrss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 _hwm_mb() or 0.0)
    print("E2E_MEMORY " + json.dumps({"rss_max_mb": maxrss, "rss_step_mb": step_rss,
                                      "torch_peak_mb": torch_peak}), flush=True)
    return 0


def measure_memory(task: str, side: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{task}:{side}",
           "--device", args.device, "--model", args.model] + (["--quick"] if args.quick else [])
    if task == "dpo":
        rows = Path(tempfile.mkdtemp(prefix="bench_e2e_rows_")) / "dpo_rows.json"
        rows.write_text(json.dumps(args.dpo_rows_data))
        cmd += ["--dpo-rows", str(rows)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               FASTPEFT_BENCH_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_MEMORY "):
            return json.loads(line[len("E2E_MEMORY "):])
    raise RuntimeError(f"memory child {task}:{side} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def setup_models(args):
    tok = load_tokenizer()
    kind = "tiny" if args.quick else args.model
    base, name = build_base(kind, len(tok), args.device)
    return tok, base, name


# ---- report -----------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [r["task"].upper() for r in rows]
    x = range(len(rows))
    for ax, key, title in ((axes[0], "median_s", "step time (s, lower is better)"),
                           (axes[1], "torch_peak_mb", "peak MB of a step (torch allocator)")):
        for k, which in enumerate(("fastpeft", "baseline")):
            vals = [r["results"][r["sides"][0] if which == "fastpeft" else r["sides"][1]].get(key)
                    or 0.0 for r in rows]  # 0: not measured (--no-memory)
            ax.bar([i + (k - 0.5) * 0.38 for i in x], vals, width=0.38,
                   label="fastpeft" if which == "fastpeft" else "baseline")
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{lab}\nvs {r['sides'][1]}" for lab, r in zip(labels, rows)])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama and short batches (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results dir (default bench/results)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: sft,dpo,ppo")
    parser.add_argument("--model", choices=["smollm2", "1b"], default="smollm2")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-side memory processes")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of tasks not run now from the existing results file")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md and .png from the existing results .json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dpo-rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure on cuda", file=sys.stderr)
        return 2
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.set_num_threads(int(os.environ.get("FASTPEFT_BENCH_THREADS", torch.get_num_threads())))
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            parser.error(f"--tasks: {t!r} is not one of {TASKS}")
    if args.child:
        return child_main(args)
    rounds = args.rounds or (2 if args.quick else 5)
    if args.report_only:
        path = (Path(args.out) if args.out else RESULTS) / (
            f"e2e_{args.device}" + ("_quick" if args.quick else "") + ".json")
        rows = json.loads(path.read_text())["rows"]
        rounds = args.rounds or min(len(s["runs_s"]) for r in rows for s in r["results"].values())
        return report(rows, args, rounds, rows[0]["model"])
    S = sizes(args.quick)
    tok, base, model_name = setup_models(args)
    rows = []
    for task in tasks:
        sides = BUILDERS[task](base, tok, args, S)
        names = SIDES[task]
        times = interleaved(sides, rounds, args.device, seeded=task == "ppo")
        res = {}
        for name in names:
            med = statistics.median(times[name])
            res[name] = {"median_s": med, "runs_s": times[name],
                         "tokens_per_step": sides[name].tokens,
                         "tokens_per_s": sides[name].tokens / med}
            if task == "ppo":
                res[name]["mean_response_length"] = statistics.mean(sides[name].lengths)
        row = {"task": task, "model": model_name, "sides": list(names), "dtype": str(args.dtype),
               "sizes": {k: v for k, v in S.items() if k.startswith(task) or
                         (task == "ppo" and k == "response_length")},
               "results": res}
        if task == "sft":
            row["profile_top_ops"] = {name: top_ops(sides[name]) for name in names}
        del sides
        if not args.no_memory:
            for name in names:
                print(f"{task}: measuring {name}'s memory in a separate process", flush=True)
                res[name].update(measure_memory(task, name, args))
        fast, other = res[names[0]], res[names[1]]
        row["speedup_fastpeft_over_" + names[1]] = other["median_s"] / fast["median_s"]
        if task == "sft":
            row["tokens_per_s_ratio"] = fast["tokens_per_s"] / other["tokens_per_s"]
        for key in ("rss_max_mb", "rss_step_mb", "torch_peak_mb"):
            if fast.get(key) and other.get(key):
                row[f"{key}_fastpeft_over_{names[1]}"] = fast[key] / other[key]
        print(json.dumps({k: v for k, v in row.items() if k != "profile_top_ops"}, indent=1),
              flush=True)
        rows.append(row)
    if args.merge:
        path = (Path(args.out) if args.out else RESULTS) / (
            f"e2e_{args.device}" + ("_quick" if args.quick else "") + ".json")
        if path.is_file():
            done = {r["task"] for r in rows}
            kept = [r for r in json.loads(path.read_text())["rows"] if r["task"] not in done]
            rows = sorted(kept + rows, key=lambda r: TASKS.index(r["task"]))
    return report(rows, args, rounds, model_name)


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def report(rows, args, rounds, model_name) -> int:
    header = ["task", "fastpeft vs", "step s fastpeft / other", "speedup", "tokens/s fastpeft / other",
              "torch peak MB fastpeft / other", "ratio", "RSS step MB fastpeft / other", "ratio",
              "RSS max MB fastpeft / other", "ratio"]
    table = []
    for r in rows:
        a, b = r["sides"]
        fa, fb = r["results"][a], r["results"][b]
        cells = [r["task"].upper(), b, f"{fa['median_s']:.2f} / {fb['median_s']:.2f}",
                 f"{r['speedup_fastpeft_over_' + b]:.2f}x",
                 f"{fa['tokens_per_s']:.0f} / {fb['tokens_per_s']:.0f}"]
        for key in ("torch_peak_mb", "rss_step_mb", "rss_max_mb"):
            cells.append(f"{_fmt(fa.get(key))} / {_fmt(fb.get(key))}")
            ratio = r.get(f"{key}_fastpeft_over_{b}")
            cells.append(_fmt(ratio, ".2f"))
        table.append(cells)
    sft = next((r for r in rows if r["task"] == "sft"), None)
    verdict = ""
    if sft is not None:
        sp = sft["tokens_per_s_ratio"]
        mem = sft.get("torch_peak_mb_fastpeft_over_peft")
        rss = sft.get("rss_step_mb_fastpeft_over_peft")
        verdict = (f"SFT targets: tokens/s >= {TARGET_SPEEDUP}x peft: {sp:.2f}x "
                   f"({'met' if sp >= TARGET_SPEEDUP else 'missed'}); peak memory <= "
                   f"{TARGET_MEMORY}x peft: torch allocator {_fmt(mem, '.2f')}x"
                   + ("" if mem is None else f" ({'met' if mem <= TARGET_MEMORY else 'missed'})")
                   + f"; RSS high-water of the step {_fmt(rss, '.2f')}x"
                   + ("" if rss is None else f" ({'met' if rss <= TARGET_MEMORY else 'missed'})")
                   + ". Absolute times depend on the load of this shared machine; the ratios "
                     "are measured side by side in one run.")
    note = (f"{model_name}, LoRA all-linear r=16 alpha=32 dropout 0.05, {args.dtype}, AdamW "
            f"lr {LR}. One optimizer step per task (PPO: one iteration: generate, score, "
            f"update); medians of {rounds} interleaved rounds after a warm-up step. Baselines: "
            "SFT peft + transformers, DPO trl.DPOTrainer 1.16, PPO a plain PyTorch loop (trl "
            "1.16 ships no PPO trainer). Memory: one process per side; torch peak = the most "
            "bytes torch's allocator held during one step above before it; RSS step = the RSS "
            "high-water mark during one step above the RSS before it; RSS max = the process's "
            "ru_maxrss. What each side runs: bench/bench_e2e.py's docstring. " + verdict)
    text = write_results("e2e", args.device, args.quick, rounds, rows, header, table, args.out,
                         note=note)
    out_dir = Path(args.out) if args.out else RESULTS
    stem = f"e2e_{args.device}" + ("_quick" if args.quick else "")
    extra = []
    for r in rows:
        if r["task"] == "ppo":
            extra.append("PPO mean response length (tokens): " + ", ".join(
                f"{n} {r['results'][n]['mean_response_length']:.1f}" for n in r["sides"]))
        if r.get("profile_note"):
            extra += ["", f"{r['task'].upper()} profile: {r['profile_note']}."]
        for name, ops in r.get("profile_top_ops", {}).items():
            extra += ["", f"## {r['task'].upper()} step, {name}: top ops by self CPU time "
                          "(torch.profiler, one step)", "",
                      "| op | self ms | calls | share |", "|---|---|---|---|"]
            extra += [f"| {o['op']} | {o['self_ms']:.1f} | {o['calls']} | {o['share']:.1%} |"
                      for o in ops]
    same_rss = [r["task"].upper() for r in rows
                if all(r["results"][n].get("rss_max_mb") for n in r["sides"])
                and abs(r["results"][r["sides"][0]]["rss_max_mb"]
                        - r["results"][r["sides"][1]]["rss_max_mb"]) < 1.0]
    if same_rss:
        extra.insert(0, f"RSS max is the same on both sides for {', '.join(same_rss)}: the "
                        "process's high-water mark is reached while loading the model, before "
                        "any step (the GGUF weights are dequantized in memory); RSS step and "
                        "torch peak are the step's own figures.")
    if extra:
        text += "\n" + "\n".join(extra) + "\n"
        (out_dir / f"{stem}.md").write_text(text)
    plot(rows, out_dir / f"{stem}.png")
    # the md title from write_results says "forward+backward": fix it for whole steps
    md = out_dir / f"{stem}.md"
    md.write_text(md.read_text().replace("# e2e forward+backward,", "# e2e training steps,", 1))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
