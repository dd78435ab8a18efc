"""Fine-tuning methods compared on one task: "which method should I use" (the anchor is peft's
method_comparison suite; this is a small CPU version of it).

Task: the demo's (fastpeft.data.synthetic, `fastpeft demo`): reverse the digits of a 5-digit
number, the same seeded splits as the demo (60 x 8 = 480 training questions, the 100 held-out
questions disjoint from them). Model: SmolLM2-135M-Instruct (fastpeft.models.load_model
"smollm2-135m"), loaded once; every method starts from a fresh copy of the same base weights
and the same seed (fastpeft.train.loop.seed_everything before patching).

Methods (one row each), all trained by fastpeft's SFTTrainer on the same jsonl with the same
TrainConfig but for the learning rate: --steps optimizer steps (default 60, as the demo) of 8
questions, AdamW, linear schedule with min(10, steps // 10) warm-up steps, no gradient
accumulation, fp32:
- full: every parameter trains (method "full" of the CLI); the loss is transformers' own.
- lora: the demo's adapter (demo.lora_config: r=16, alpha=32, all linear layers, no dropout).
- rslora / dora: the same with use_rslora=True / use_dora=True.
- ia3: IA3Config() (peft's default targets for Llama: k_proj, v_proj, down_proj).
- houlsby / pfeiffer: AdapterConfig(kind=...), reduction factor 16.
- prefix: PrefixTuningConfig(num_virtual_tokens=20), no projection (P-tuning v2).
- prompt: PromptTuningConfig(num_virtual_tokens=20), initialised from the task's system text.
- ptuning: PTuningConfig(num_virtual_tokens=20), the MLP prompt encoder.

Learning rates (LR below) are fixed before any run, from the usual values for each method
(peft's docs and examples, the papers) scaled for a short run; none was chosen by looking at
the held-out split, which is used only for the reported accuracy:
- lora / dora 3e-3: the demo's. rslora 1e-3: its scale alpha/sqrt(r) is sqrt(r) = 4 times
  LoRA's alpha/r at r=16, so the same step on the product needs about a third of the rate.
- full 1e-4: full fine-tuning of a small LM for a few hundred examples (5e-5 .. 1e-4 usual).
- ia3 1e-2: a few thousand scaling factors starting at 1 (the IA3 paper uses 3e-3 for many
  more steps).
- houlsby / pfeiffer 3e-3: bottleneck adapters, like LoRA a near-identity low-rank update.
- prefix 1e-2, ptuning 1e-2, prompt 3e-2: peft's prompt-learning examples (3e-2 for prompt
  tuning of a causal LM, 1e-2 for prefix tuning); soft prompts need large rates.

Measured for each method:
- trainable parameters (fastpeft.get_nb_trainable_parameters; full: all of them);
- held-out exact-match accuracy on the 100 held-out questions after training (demo.evaluate:
  greedy, batched, KV cache), and once zero-shot on the base model (the baseline row);
- time per optimizer step: the median over the steps after the first of the trainer's own
  step time (tokens / tokens_per_s in its metrics: forward, backward, clipping, AdamW);
- training memory, on a separate fresh copy of the model that runs 2 optimizer steps of the
  same trainer setup before the timed run: torch_peak_mb = the most bytes torch's allocator
  held during those 2 steps above what it held before them (bench/_common.peak_mb: gradients,
  AdamW state and activations; the base weights, held before, are not counted); rss_step_mb =
  the process's RSS high-water mark during them above its RSS before (/proc/self/clear_refs;
  None where unavailable). rss_step_mb is kept in the JSON but not in the table: the methods
  run one after another in one process, and a later method reuses the memory an earlier one
  freed without raising the RSS (it reads 0 for several), so it does not compare methods.
- the wall time of training and of the evaluation.

    python bench/bench_methods.py [--quick] [--steps N] [--methods lora,ia3,...] [--out DIR]
                                  [--no-memory] [--report-only]

--quick: a tiny random Llama with SmolLM2's tokenizer (demo --quick's), 2 steps, 4 held-out
questions: checks every method's path in seconds; its accuracies are meaningless.

Threads: FASTPEFT_BENCH_THREADS (default: torch's). On a shared machine use 1: with 2 threads
on 2 busy cores every parallel region waits for its second thread (bench/_common.py's
set_bench_threads), and a LoRA step of SmolLM2 took 23 s instead of 2.3 s with 1 thread.
The full CPU run (bench/results/methods_cpu.*) took about 40 minutes with 1 thread.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastpeft
from _common import RESULTS, peak_mb, reset_rss_high_water, write_results

STEPS, BATCH, N_EVAL, DIGITS, SEED, VIRTUAL_TOKENS = 60, 8, 100, 5, 0, 20
METHODS = ("full", "lora", "rslora", "dora", "ia3", "houlsby", "pfeiffer", "prefix", "prompt",
           "ptuning")
# The learning rate of each method, fixed in advance: see the module docstring.
LR = {"full": 1e-4, "lora": 3e-3, "rslora": 1e-3, "dora": 3e-3, "ia3": 1e-2, "houlsby": 3e-3,
      "pfeiffer": 3e-3, "prefix": 1e-2, "prompt": 3e-2, "ptuning": 1e-2}
LABELS = {"full": "full fine-tuning", "lora": "LoRA", "rslora": "rsLoRA", "dora": "DoRA",
          "ia3": "IA3", "houlsby": "Houlsby adapter", "pfeiffer": "Pfeiffer adapter",
          "prefix": "prefix tuning (P-tuning v2)", "prompt": "prompt tuning",
          "ptuning": "P-tuning"}
MEMORY_STEPS = 2


def method_config(method: str, tokenizer):
    """The tuner config of a method (None for full fine-tuning)."""
    from fastpeft.data.synthetic import SYSTEM
    from fastpeft.demo import lora_config

    if method == "full":
        return None
    if method == "lora":
        return lora_config(16)
    if method == "rslora":
        return lora_config(16).replace(use_rslora=True)
    if method == "dora":
        return lora_config(16).replace(use_dora=True)
    if method == "ia3":
        return fastpeft.IA3Config()
    if method in ("houlsby", "pfeiffer"):
        return fastpeft.AdapterConfig(kind=method, reduction_factor=16)
    if method == "prefix":
        return fastpeft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS)
    if method == "prompt":
        return fastpeft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS,
                                           prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text=SYSTEM,
                                           tokenizer_name_or_path=tokenizer)
    if method == "ptuning":
        return fastpeft.PTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def build(base, method: str, tokenizer):
    """A fresh copy of the base weights with the method applied, seeded the same way for every
    method."""
    from fastpeft.train.loop import seed_everything

    seed_everything(SEED)
    model = copy.deepcopy(base)
    config = method_config(method, tokenizer)
    if config is None:
        model.requires_grad_(True)
        return model
    return fastpeft.patch(model, config)


def make_trainer(model, tokenizer, method: str, steps: int, train_path: str, out: str):
    from fastpeft.train.config import TrainConfig
    from fastpeft.train.sft import SFTTrainer

    config = TrainConfig(output_dir=out, max_steps=steps, batch_size=BATCH, lr=LR[method],
                         warmup_steps=min(10, steps // 10), scheduler="linear", seed=SEED,
                         log_every=1, tensorboard=False, plots=False, progress=False)
    return SFTTrainer(model, tokenizer, config, train_path)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure_memory(base, method, tokenizer, train_path, tmp) -> dict:
    """torch allocator peak and RSS high-water of the first MEMORY_STEPS optimizer steps, on a
    fresh copy of the model (freed afterwards)."""
    model = build(base, method, tokenizer)
    trainer = make_trainer(model, tokenizer, method, MEMORY_STEPS, train_path,
                           os.path.join(tmp, f"{method}_memory"))
    trainer.setup()
    trainer.model.train()
    before = _status_mb("VmRSS")
    reset = reset_rss_high_water()

    def steps():
        for _ in range(MEMORY_STEPS):
            trainer.train_step()

    torch_peak = peak_mb(steps, "cpu")
    hwm = _status_mb("VmHWM")
    trainer.logger.close()
    rss_step = hwm - before if reset and hwm is not None and before is not None else None
    return {"torch_peak_mb": torch_peak, "rss_step_mb": rss_step}


def run_method(base, method, tokenizer, args, train_path, held_out, tmp) -> dict:
    from fastpeft.demo import evaluate

    row = {"method": method, "label": LABELS[method], "lr": LR[method], "steps": args.steps}
    try:
        if not args.no_memory:
            row.update(measure_memory(base, method, tokenizer, train_path, tmp))
        model = build(base, method, tokenizer)
        row["trainable"], row["total"] = fastpeft.get_nb_trainable_parameters(model)
        trainer = make_trainer(model, tokenizer, method, args.steps, train_path,
                               os.path.join(tmp, method))
        t0 = time.perf_counter()
        last = trainer.train()
        row["train_s"] = time.perf_counter() - t0
        step_s = [h["tokens"] / h["tokens_per_s"] for h in trainer.history if "tokens_per_s" in h]
        row["step_s_runs"] = step_s
        row["step_s"] = statistics.median(step_s[1:] or step_s)
        row["final_loss"] = last.get("loss")
        row["losses"] = [h["loss"] for h in trainer.history if "loss" in h]
        acc, secs, outputs = evaluate(model, tokenizer, held_out)
        row.update(accuracy=acc, eval_s=secs, example_output=outputs[0], error=None)
        del trainer, model
    except Exception as e:  # noqa: BLE001 - reported as a failed row, not hidden
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    trained = [r for r in ok if r["method"] != "zero-shot"]
    panels = (("accuracy", "held-out accuracy (%)", 100, ok),
              ("step_s", "time per optimizer step (s)", 1, trained),
              ("torch_peak_mb", "training memory: torch peak MB (2 steps)", 1, trained),
              ("trainable", "trainable parameters (log scale)", 1, trained))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, title, scale, which) in zip(axes.flat, panels):
        ax.bar(range(len(which)), [(r.get(key) or 0) * scale for r in which], color="tab:blue")
        ax.set_xticks(range(len(which)))
        ax.set_xticklabels([r["method"] for r in which], rotation=45, ha="right")
        ax.set_title(title)
        if key == "accuracy":
            ax.set_ylim(0, 100)
        if key == "trainable":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def report(rows: list[dict], meta: dict, args, out_dir: Path, chart: bool = True) -> str:
    order = ("zero-shot", *METHODS)
    rows = sorted(rows, key=lambda r: order.index(r["method"]))  # whatever order they ran in
    header = ["method", "lr", "trainable params", "% of model", "held-out accuracy",
              "s / step", "torch peak MB (2 steps)", "train s", "final loss"]
    table = []
    for r in rows:
        if r["method"] == "zero-shot":
            table.append([r["label"], "-", "0", "0", f"{100 * r['accuracy']:.0f}%", "-", "-",
                          "-", "-"])
        elif r.get("error"):
            table.append([r["label"], r["lr"], "-", "-", f"failed: {r['error'][:120]}",
                          "-", "-", "-", "-"])
        else:
            table.append([r["label"], r["lr"], f"{r['trainable']:,}",
                          f"{100 * r['trainable'] / r['total']:.3f}",
                          f"{100 * r['accuracy']:.0f}%", f"{r['step_s']:.2f}",
                          _fmt(r.get("torch_peak_mb"), ".0f"), f"{r['train_s']:.0f}",
                          _fmt(r.get("final_loss"), ".3f")])
    load = meta.get("loadavg")
    note = (f"{meta['model']}, the demo's digit-reversal task: {meta['n_train']} training "
            f"questions, {meta['steps']} steps of {BATCH} (AdamW, linear schedule, "
            f"{min(10, meta['steps'] // 10)} warm-up steps, fp32) for every method, only the "
            f"learning rate differs (fixed in advance: bench/bench_methods.py's docstring); "
            f"exact-match accuracy on {meta['n_eval']} held-out questions (greedy, KV cache). "
            f"The adapters' loss goes through fastpeft's fused linear_cross_entropy; full "
            f"fine-tuning (an unpatched model) uses transformers' loss on the full logits. "
            f"s / step: median of the trainer's step times after the first. Memory of training, "
            f"on a fresh copy, over its first {MEMORY_STEPS} optimizer steps: torch peak = the "
            f"most bytes torch's allocator held above what it held before (gradients, AdamW "
            f"state, activations; not the base weights). Machine: {meta['cpus']} CPUs, {meta['threads']} torch "
            f"threads, load average {load} at the start and {meta.get('loadavg_end', 'n/a')} "
            f"at the end; shared, so times are indicative. Total wall time "
            f"{meta['wall_s']:.0f} s" + ("." if meta.get("complete", True)
                                         else " (an unfinished run: the methods done so far).")
            + (" Merged: " + meta["merged"].format(wall=meta["wall_s"]) + "."
               if meta.get("merged") else ""))
    text = write_results("methods", "cpu", args.quick, 1, rows,
                         header, table, out_dir, note=note)
    stem = "methods_cpu" + ("_quick" if args.quick else "")
    data = json.loads((out_dir / f"{stem}.json").read_text())
    data["meta"].update(meta)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    md = out_dir / f"{stem}.md"
    text = text.replace("# methods forward+backward, cpu", "# fine-tuning methods, cpu", 1)
    text = text.replace("medians of 1 interleaved rounds", "one run per method", 1)
    md.write_text(text)
    if chart:
        plot(rows, out_dir / f"{stem}.png")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random model, 2 steps, 4 held-out questions (seconds)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps for every method (default {STEPS}; 2 with --quick)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", type=Path, default=None,
                        help="results dir (default bench/results)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="the `fastpeft bench` command passes it; CPU only for now")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md and .png from the results .json in --out")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the methods not run now from the results .json "
                             "in --out (to re-run one method); the note says which run is which")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        print("bench_methods.py measures on the CPU only: nothing run for --device "
              f"{args.device}", file=sys.stderr)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        parser.error(f"--methods: no method given (choose from {','.join(METHODS)})")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: {m!r} is not one of {METHODS}")
    if args.steps is None:
        args.steps = 2 if args.quick else STEPS
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(int(os.environ.get("FASTPEFT_BENCH_THREADS", torch.get_num_threads())))
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((out_dir / ("methods_cpu" + ("_quick" if args.quick else "")
                                      + ".json")).read_text())
        torch.set_num_threads(data["meta"]["threads"])  # the run's, for the title line
        print(report(data["rows"], data["meta"], args, out_dir))
        return 0

    from fastpeft.data.synthetic import make_splits, to_rows
    from fastpeft.demo import _tiny_model, _write_jsonl, evaluate

    start = time.perf_counter()
    n_eval = 4 if args.quick else N_EVAL
    n_train = max(args.steps * BATCH, 64)  # as the demo: every training question seen once
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        if args.quick:
            base, tokenizer = _tiny_model(tmp)
            model_name = "tiny random Llama (2 x 32) with SmolLM2's tokenizer"
        else:
            from fastpeft.models import load_model

            base, tokenizer = load_model("smollm2-135m")
            model_name = "SmolLM2-135M-Instruct"
        base.eval()
        base.requires_grad_(False)
        train, held_out = make_splits(n_train, n_eval, seed=SEED, length=DIGITS)
        train_path = os.path.join(tmp, "train.jsonl")
        _write_jsonl(train_path, to_rows(train))
        meta = {"model": model_name, "steps": args.steps, "batch_size": BATCH,
                "n_train": len(train), "n_eval": len(held_out), "digits": DIGITS, "seed": SEED,
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "lr": LR,
                "memory": "torch allocator peak and RSS high-water of the first "
                          f"{MEMORY_STEPS} optimizer steps, on a fresh copy"}
        acc, secs, _ = evaluate(base, tokenizer, held_out)
        rows = [{"method": "zero-shot", "label": "zero-shot (base model)", "accuracy": acc,
                 "eval_s": secs, "trainable": 0, "error": None}]
        kept = []
        if args.merge:
            previous = json.loads((out_dir / ("methods_cpu" + ("_quick" if args.quick else "")
                                              + ".json")).read_text())
            kept = [r for r in previous["rows"] if r["method"] not in ("zero-shot", *methods)]
            old = previous["meta"]
            meta["merged"] = (f"{', '.join(methods)} re-run (wall {{wall:.0f}} s, load average "
                              f"{meta['loadavg']} at the start); the other rows from an earlier "
                              f"run ({old.get('threads')} threads, wall {old.get('wall_s', 0):.0f} s, "
                              f"load average {old.get('loadavg')} at the start)")
            rows += kept
        print(f"zero-shot: {100 * acc:.0f}%", flush=True)
        for method in methods:
            t0 = time.perf_counter()
            row = run_method(base, method, tokenizer, args, train_path, held_out, tmp)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("step_s_runs", "losses")}),
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            # the results so far, so that a long run interrupted midway leaves its rows
            meta["wall_s"] = time.perf_counter() - start
            meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            meta["complete"] = len(rows) == len(methods) + len(kept) + 1
            report(rows, meta, args, out_dir, chart=False)
    text = report(rows, meta, args, out_dir)
    print(text)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
