"""`fastpeft demo`: the main job on the embedded default model, SmolLM2-135M-Instruct, in a few
minutes on a CPU.

1. A seeded synthetic task (fastpeft.data.synthetic: reverse the digits of a 5-digit number)
   with disjoint train / held-out splits, written to OUT/data/ as jsonl.
2. Held-out exact-match accuracy zero-shot, then with k solved training examples in the prompt
   (few-shot in-context learning: no weight changes); greedy, batched, with the KV cache.
3. LoRA SFT with fastpeft's SFTTrainer (progress bar, metrics.jsonl, plots/loss.png).
4. The held-out accuracy again; a table of the three, ending with the line
   `accuracy before: X% after: Y%`; the adapter in peft format in OUT/adapter/ and the three
   lines that load it with peft.

--rlhf then goes on to RLHF on the same task (a few more minutes):

5. Synthetic preferences (fastpeft.data.synthetic.preference_rows: chosen = the exact
   reversal, rejected = a near miss: the digits unreversed, one changed, two swapped, one
   dropped or added), OUT/data/prefs_train.jsonl / prefs_heldout.jsonl, prompts rendered with
   the chat template as PPO passes them to the reward model.
6. A reward model: LoRA on a fresh copy of the base model + a scalar head (RewardTrainer),
   saved to OUT/reward_model/; its held-out pairwise accuracy (chosen scored above rejected),
   measured on the reloaded directory (load_reward_model).
7. PPO (PPOTrainer) from the SFT adapter: the SFT LoRA is merged into the base weights and a
   fresh LoRA is patched on top, so PPO's reference (the same model with the adapters
   disabled) is the SFT policy, not the bare base; the KL penalty keeps PPO near what SFT
   learned. Prompts: the training questions (OUT/data/train.jsonl read as prompts).
8. On the held-out prompts, before and after PPO: the mean reward-model score of completions
   sampled at the PPO temperature, their exact-match accuracy and the KL to the reference
   (per sequence, nats: PPO's objective/kl); after PPO also the greedy accuracy. Extra table
   rows and results.json["rlhf"]; the PPO adapter in OUT/ppo/adapter/ (it applies on top of
   the merged SFT weights).

--quick runs the same path on a tiny random Llama with the SmolLM2 tokenizer (seconds; what
the tests run so the demo keeps working). Its accuracies are meaningless.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

QUICK_BASE_DIR = "quick_base"


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="where the data, the adapter, metrics and plots go (default: "
                             "demo_out)")
    parser.add_argument("--steps", type=_at_least(1), default=None,
                        help="LoRA SFT optimizer steps (default: 60; 4 with --quick)")
    parser.add_argument("--batch-size", type=_at_least(1), default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=_at_least(1), default=16,
                        help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--shots", type=_at_least(0), default=4,
                        help="solved examples in the prompt for few-shot ICL")
    parser.add_argument("--n-eval", type=_at_least(1), default=None,
                        help="held-out questions (default: 100; 8 with --quick)")
    parser.add_argument("--digits", type=_at_least(2), default=5, help="digits per question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rlhf", action="store_true",
                        help="after SFT: a reward model on synthetic preferences, then PPO from "
                             "the SFT adapter (mean reward before / after, KL)")
    parser.add_argument("--rm-steps", type=_at_least(1), default=None,
                        help="reward-model steps with --rlhf (default: 60; 3 with --quick)")
    parser.add_argument("--ppo-steps", type=_at_least(1), default=None,
                        help="PPO iterations with --rlhf (default: 12; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random model: checks the pipeline in seconds")


def _tiny_model(out: str):
    """A 2-layer random Llama with the SmolLM2 tokenizer, saved to OUT/quick_base/ so the peft
    loading lines have a base to load."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fastpeft.default_model import GGUF_FILE, default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=GGUF_FILE)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    directory = os.path.join(out, QUICK_BASE_DIR)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    from fastpeft.models import load_model

    return load_model(directory)


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def _virtual_tokens_in_cache(model) -> bool:
    """Whether an active prompt-tuning / P-tuning adapter prepends virtual tokens."""
    from fastpeft.patching import is_patched, state_of

    if not is_patched(model):
        return False
    state = state_of(model)
    return not state.disabled and state.peft_type in ("PROMPT_TUNING", "P_TUNING")


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 32, share_prefix: bool = True) -> list[str]:
    """Greedy completions of prompts, in batches, with the KV cache; the model's train / eval
    mode and the tokenizer's padding side are restored.

    When every prompt has the same number of tokens (the synthetic task's do: one token per
    digit) and share_prefix is set, the tokens they all start with (system turn, few-shot
    examples) are run once and their KV cache is copied into each batch, so few-shot ICL costs
    about as much as zero-shot. Otherwise the prompts are left-padded. Prompt tuning and
    P-tuning put their virtual tokens in that cache, which generate() would take for prompt
    tokens, so they never share it (prefix tuning keeps its prefix out of the cache)."""
    share_prefix = share_prefix and not _virtual_tokens_in_cache(model)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    same_length = len({len(r) for r in rows}) == 1
    prefix = min(_common_prefix(rows), len(rows[0]) - 1) if share_prefix and same_length else 0
    outputs: list[str] = []
    try:
        with torch.no_grad():
            cache = None
            if prefix > 0:
                ids = torch.tensor([rows[0][:prefix]], device=model.device)
                cache = model(input_ids=ids, use_cache=True).cache
            for i in range(0, len(prompts), batch_size):
                if cache is not None:
                    ids = torch.tensor(rows[i:i + batch_size], device=model.device)
                    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                           "cache": copy.deepcopy(cache)}
                    enc["cache"].batch_repeat_interleave(len(ids))
                else:
                    enc = dict(tokenizer(prompts[i:i + batch_size], return_tensors="pt",
                                         padding=True, add_special_tokens=False).to(model.device))
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def prompts_of(tokenizer, examples, shots=()) -> list[str]:
    """Each question as a chat prompt, after the solved `shots` as earlier turns."""
    from fastpeft.data.synthetic import SYSTEM

    context = [{"role": "system", "content": SYSTEM}]
    context += [turn for ex in shots for turn in ex.messages(system=False)]
    return [tokenizer.apply_chat_template(context + ex.messages(False, system=False),
                                          tokenize=False, add_generation_prompt=True)
            for ex in examples]


def evaluate(model, tokenizer, examples, shots=()) -> tuple[float, float, list[str]]:
    """(held-out exact-match accuracy in [0, 1], seconds, the completions)."""
    from fastpeft.data.synthetic import accuracy

    start = time.perf_counter()
    max_new = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
                  for ex in examples) + 2
    outputs = generate_answers(model, tokenizer, prompts_of(tokenizer, examples, shots), max_new)
    return accuracy(outputs, [ex.answer for ex in examples]), time.perf_counter() - start, outputs


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def lora_config(rank: int):
    """The demo's adapter: LoRA on every linear layer but the head, alpha = 2 x rank, no
    dropout (a few hundred examples seen once: nothing to regularise)."""
    import fastpeft

    return fastpeft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                               target_modules="all-linear")


def load_lines(base: str, adapter_dir: str) -> list[str]:
    """The three lines that load the saved adapter with peft (on transformers' model)."""
    return ["from fastpeft.models import load_model; from peft import PeftModel",
            f"base, tokenizer = load_model({base!r})",
            f"model = PeftModel.from_pretrained(base, {adapter_dir!r})"]


def format_table(rows: list[dict]) -> str:
    header = ("method", "held-out accuracy", "trainable params", "train time", "eval time")
    body = [(r["method"], f"{100 * r['accuracy']:.1f}%", f"{r['trainable']:,}",
             f"{r['train_s']:.0f} s" if r["train_s"] else "-", f"{r['eval_s']:.0f} s")
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (header, *body)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# --rlhf settings, measured on SmolLM2 after the default SFT: its samples of the 100 held-out
# prompts are all exact at temperature 1 and 1.5 (nothing for PPO to improve), 53% exact at
# 2.0 (mean reward 6.0 against 8.4 at T=1), gibberish at 3.0. PPO samples (and computes its
# log-probs) at 2.0, so the reward model sees errors to penalise. Measured with these settings
# (the default SFT adapter and reward model, seed 0): held-out mean reward 5.60 -> 7.80,
# sampled exact match 42% -> 66%, KL 0.97 nats / sequence, greedy accuracy still 100%; 12
# iterations took 380 s on the loaded shared CPU (1 thread).
RM_LR = 1e-3
PPO_LR = 5e-4
PPO_BATCH = 16
PPO_TEMPERATURE = 2.0
PPO_KL_COEF = 0.05
PPO_EPOCHS = 2


def rollout_stats(trainer, prompts: list[dict], answers: list[str], seed: int) -> dict:
    """Mean reward-model score, exact-match accuracy and KL to the reference (per sequence,
    nats: PPO's objective/kl, k1 at the PPO temperature) of completions sampled from the
    policy for `prompts` (load_prompt_dataset examples), as a PPO rollout samples them; the
    global RNG is seeded so the measurements before and after PPO sample alike."""
    from fastpeft.data.synthetic import accuracy
    from fastpeft.train.loop import _to

    torch.manual_seed(seed)
    bs = trainer.config.batch_size
    total = {"score": 0.0, "kl": 0.0}
    completions: list[str] = []
    for s in range(0, len(prompts), bs):
        rows = prompts[s:s + bs]
        rollout, stats = trainer.make_experience(_to(trainer.collate(rows), trainer.device))
        total["score"] += stats["objective/raw_scores"] * len(rows)
        total["kl"] += stats["objective/kl"] * len(rows)
        completions += rollout["completions"]
    n = len(prompts)
    return {"reward": total["score"] / n, "kl": total["kl"] / n,
            "sampled_accuracy": accuracy(completions, answers), "example": completions[0]}


def run_rlhf(args: argparse.Namespace, model, tokenizer, base: str, train, held_out) -> tuple[
        dict, list[dict]]:
    """Steps 5-8 of the module docstring on the SFT-patched `model`; (results, table rows)."""
    import fastpeft
    from fastpeft.data import load_prompt_dataset
    from fastpeft.data.synthetic import preference_rows
    from fastpeft.models import load_model
    from fastpeft.train.config import PPOConfig, RewardConfig, TrainConfig
    from fastpeft.train.loop import seed_everything
    from fastpeft.train.ppo import PPOTrainer
    from fastpeft.train.reward import RewardTrainer, load_reward_model

    out = args.out
    rm_steps = args.rm_steps if args.rm_steps is not None else (3 if args.quick else 60)
    ppo_steps = args.ppo_steps if args.ppo_steps is not None else (2 if args.quick else 12)
    batch = 4 if args.quick else PPO_BATCH
    data = os.path.join(out, "data")
    prefs = {}
    for name, examples, seed in (("prefs_train", train, args.seed),
                                 ("prefs_heldout", held_out, args.seed + 1)):
        prefs[name] = preference_rows(examples, seed, prompts_of(tokenizer, examples))
        _write_jsonl(os.path.join(data, f"{name}.jsonl"), prefs[name])
    held = prefs["prefs_heldout"]
    print(f"preferences: {len(prefs['prefs_train'])} training and {len(held)} held-out pairs, "
          f"e.g. chosen {held[0]['chosen']!r} rejected {held[0]['rejected']!r} "
          f"({held[0]['kind']})", flush=True)

    # 6. The reward model: its own copy of the base model.
    rm_dir = os.path.join(out, "reward_model")
    rm_base, _ = load_model(base)
    seed_everything(args.seed)
    rm_base = fastpeft.patch(rm_base, lora_config(args.rank))
    rm_trainable, _ = fastpeft.get_nb_trainable_parameters(rm_base)
    config = TrainConfig(output_dir=rm_dir, max_steps=rm_steps, batch_size=args.batch_size,
                         lr=RM_LR, warmup_steps=min(10, rm_steps // 10), seed=args.seed,
                         log_every=1, tensorboard=False, plots=True, progress=True)
    print(f"reward model: LoRA r={args.rank} on a fresh {base} + a scalar head, {rm_steps} steps "
          f"of {args.batch_size} pairs, lr {RM_LR}", flush=True)
    t0 = time.perf_counter()
    RewardTrainer(rm_base, tokenizer, config, RewardConfig(),
                  os.path.join(data, "prefs_train.jsonl")).train()
    rm_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fastpeft.unpatch(rm_base)  # the saved directory is what PPO uses: reload it onto the base
    reward_model = load_reward_model(rm_dir, base_model=rm_base, tokenizer=tokenizer)
    prompts = [r["prompt"] for r in held]
    chosen = reward_model(prompts, [r["chosen"] for r in held])
    rejected = reward_model(prompts, [r["rejected"] for r in held])
    rm_acc = sum(c > r for c, r in zip(chosen, rejected)) / len(held)
    rm_eval_s = time.perf_counter() - t0
    print(f"reward model held-out pairwise accuracy: {100 * rm_acc:.1f}% "
          f"(chosen scored above rejected, {len(held)} pairs)", flush=True)

    # 7. PPO from the SFT policy: merged SFT weights + a fresh LoRA; reference = SFT.
    policy = fastpeft.merge(model)
    seed_everything(args.seed)
    policy = fastpeft.patch(policy, lora_config(args.rank))
    ppo_trainable, _ = fastpeft.get_nb_trainable_parameters(policy)
    answer_tokens = max(len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
                        for ex in held_out)
    ppo = PPOConfig(kl_coef=PPO_KL_COEF, temperature=PPO_TEMPERATURE,
                    response_length=answer_tokens + 3, num_ppo_epochs=PPO_EPOCHS)
    config = TrainConfig(output_dir=os.path.join(out, "ppo"), max_steps=ppo_steps,
                         batch_size=batch, lr=PPO_LR, scheduler="constant", seed=args.seed,
                         log_every=1, tensorboard=False, plots=True, progress=True)
    trainer = PPOTrainer(policy, tokenizer, config, ppo, os.path.join(data, "train.jsonl"),
                         reward_fn=reward_model)
    held_prompts, _ = load_prompt_dataset(os.path.join(data, "heldout.jsonl"), tokenizer)
    answers = [ex.answer for ex in held_out]
    t0 = time.perf_counter()
    before = rollout_stats(trainer, held_prompts, answers, args.seed + 2)
    measure_s = time.perf_counter() - t0
    print(f"before PPO (sampled at T={PPO_TEMPERATURE}): mean reward {before['reward']:.3f}, "
          f"accuracy {100 * before['sampled_accuracy']:.1f}%, KL {before['kl']:.3f}", flush=True)
    print(f"PPO: from the SFT policy (merged) + a fresh LoRA r={args.rank}, {ppo_steps} "
          f"iterations of {batch} prompts, lr {PPO_LR}, kl_coef {PPO_KL_COEF}, "
          f"{PPO_EPOCHS} epochs", flush=True)
    t0 = time.perf_counter()
    trainer.train()
    ppo_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = rollout_stats(trainer, held_prompts, answers, args.seed + 2)
    measure_s += time.perf_counter() - t0
    print(f"after PPO (sampled at T={PPO_TEMPERATURE}): mean reward {after['reward']:.3f}, "
          f"accuracy {100 * after['sampled_accuracy']:.1f}%, KL {after['kl']:.3f}", flush=True)
    acc, secs, outputs = evaluate(policy, tokenizer, held_out)
    print(f"after PPO (greedy): {100 * acc:.1f}% (e.g. {outputs[0]!r})", flush=True)
    rows = [dict(method="reward model (pairwise)", accuracy=rm_acc, trainable=rm_trainable,
                 train_s=rm_train_s, eval_s=rm_eval_s),
            dict(method="SFT + PPO", accuracy=acc, trainable=ppo_trainable, train_s=ppo_train_s,
                 eval_s=secs)]
    results = dict(
        reward_model=rm_dir, rm_steps=rm_steps, rm_lr=RM_LR, rm_heldout_accuracy=rm_acc,
        n_pref_train=len(prefs["prefs_train"]), n_pref_heldout=len(held),
        ppo_adapter=os.path.join(out, "ppo", "adapter"), ppo_steps=ppo_steps,
        ppo_batch_size=batch, ppo_lr=PPO_LR, kl_coef=PPO_KL_COEF, temperature=PPO_TEMPERATURE,
        ppo_epochs=PPO_EPOCHS, reward_before=before["reward"], reward_after=after["reward"],
        kl_before=before["kl"], kl_after=after["kl"],
        sampled_accuracy_before=before["sampled_accuracy"],
        sampled_accuracy_after=after["sampled_accuracy"], accuracy_after_ppo=acc,
        rm_train_s=rm_train_s, ppo_train_s=ppo_train_s, measure_s=measure_s)
    return results, rows


def run(args: argparse.Namespace) -> dict:
    """The demo; returns the results it also writes to OUT/results.json."""
    import fastpeft
    from fastpeft.data.synthetic import make_splits, to_rows
    from fastpeft.models import load_model
    from fastpeft.train.config import TrainConfig
    from fastpeft.train.loop import seed_everything
    from fastpeft.train.sft import SFTTrainer

    start = time.perf_counter()
    steps = args.steps if args.steps is not None else (4 if args.quick else 60)
    n_eval = args.n_eval if args.n_eval is not None else (8 if args.quick else 100)
    n_train = max(steps * args.batch_size, 64)  # every training question seen once
    out = args.out
    os.makedirs(os.path.join(out, "data"), exist_ok=True)

    if args.quick:
        model, tokenizer = _tiny_model(out)
        base = os.path.join(out, QUICK_BASE_DIR)
    else:
        print("loading SmolLM2-135M-Instruct (the embedded default model) ...", flush=True)
        base = "smollm2-135m"
        model, tokenizer = load_model(base)
    model.eval()

    train, held_out = make_splits(n_train, n_eval, seed=args.seed, length=args.digits)
    train_path = os.path.join(out, "data", "train.jsonl")
    _write_jsonl(train_path, to_rows(train))
    _write_jsonl(os.path.join(out, "data", "heldout.jsonl"), to_rows(held_out))
    shots = train[:args.shots]
    ex = held_out[0]
    print(f"task: {ex.question!r} -> {ex.answer!r}; {len(train)} training and "
          f"{len(held_out)} held-out questions (seed {args.seed}, disjoint)", flush=True)

    rows = []
    acc, secs, outputs = evaluate(model, tokenizer, held_out)
    rows.append(dict(method="zero-shot", accuracy=acc, trainable=0, train_s=0.0, eval_s=secs))
    print(f"zero-shot: {100 * acc:.1f}% (e.g. {outputs[0]!r})", flush=True)
    acc, secs, outputs = evaluate(model, tokenizer, held_out, shots)
    rows.append(dict(method=f"few-shot ICL (k={len(shots)})", accuracy=acc, trainable=0,
                     train_s=0.0, eval_s=secs))
    print(f"{len(shots)}-shot in-context: {100 * acc:.1f}% (e.g. {outputs[0]!r})", flush=True)

    seed_everything(args.seed)
    model = fastpeft.patch(model, lora_config(args.rank))
    trainable, _ = fastpeft.get_nb_trainable_parameters(model)
    config = TrainConfig(output_dir=out, max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=min(10, steps // 10), scheduler="linear", seed=args.seed,
                         log_every=1, tensorboard=False, plots=True, progress=True)
    trainer = SFTTrainer(model, tokenizer, config, train_path)
    print(f"LoRA SFT: r={args.rank}, all linear layers, {trainable:,} trainable parameters, "
          f"{steps} steps of {args.batch_size}, lr {args.lr}", flush=True)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    acc, secs, outputs = evaluate(model, tokenizer, held_out)
    rows.append(dict(method="LoRA SFT", accuracy=acc, trainable=trainable, train_s=train_s,
                     eval_s=secs))
    print(f"after LoRA SFT: {100 * acc:.1f}% (e.g. {outputs[0]!r})", flush=True)

    adapter = os.path.join(out, "adapter")
    plot = os.path.join(out, "plots", "loss.png")
    before, after = rows[0]["accuracy"], rows[-1]["accuracy"]
    rlhf = None
    if args.rlhf:
        rlhf, extra = run_rlhf(args, model, tokenizer, base, train, held_out)
        rows += extra
    lines = load_lines(base, adapter)
    results = dict(model=base, task=ex.question, rows=rows, steps=steps,
                   batch_size=args.batch_size, lr=args.lr, rank=args.rank, n_train=len(train),
                   n_eval=len(held_out), digits=args.digits, seed=args.seed, adapter=adapter,
                   loss_plot=plot, peft_lines=lines, rlhf=rlhf,
                   wall_s=time.perf_counter() - start)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    print()
    print(format_table(rows))
    if rlhf is not None:
        print(f"PPO, held-out prompts sampled at T={rlhf['temperature']}: mean reward before: "
              f"{rlhf['reward_before']:.3f} after: {rlhf['reward_after']:.3f}   "
              f"KL to the SFT reference: {rlhf['kl_after']:.3f} nats/sequence")
    print(f"\nadapter (peft format): {adapter}/   loss curve: {plot}   "
          f"demo time: {results['wall_s']:.0f} s")
    print("load it with peft:")
    for line in lines:
        print("    " + line)
    print(f"accuracy before: {100 * before:.0f}% after: {100 * after:.0f}%")
    return results


__all__ = ["add_arguments", "evaluate", "format_table", "generate_answers", "load_lines",
           "lora_config", "prompts_of", "run"]
