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
    lines = load_lines(base, adapter)
    before, after = rows[0]["accuracy"], rows[-1]["accuracy"]
    results = dict(model=base, task=ex.question, rows=rows, steps=steps,
                   batch_size=args.batch_size, lr=args.lr, rank=args.rank, n_train=len(train),
                   n_eval=len(held_out), digits=args.digits, seed=args.seed, adapter=adapter,
                   loss_plot=plot, peft_lines=lines, wall_s=time.perf_counter() - start)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    print()
    print(format_table(rows))
    print(f"\nadapter (peft format): {adapter}/   loss curve: {plot}   "
          f"demo time: {results['wall_s']:.0f} s")
    print("load it with peft:")
    for line in lines:
        print("    " + line)
    print(f"accuracy before: {100 * before:.0f}% after: {100 * after:.0f}%")
    return results


__all__ = ["add_arguments", "evaluate", "format_table", "generate_answers", "load_lines",
           "lora_config", "prompts_of", "run"]
