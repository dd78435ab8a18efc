"""The `fastpeft` command: training stages from YAML configs (sft, rm, ppo, dpo), merge,
sample, rank, info, bench, demo. See docs/cli.md."""

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import fastpeft

REPO = Path(__file__).resolve().parents[2]


def _run_bench(script: str, extra: list[str]) -> int:
    path = REPO / "bench" / script
    if not path.is_file():
        print(f"fastpeft: benchmark {path} not found (benchmarks run from a source checkout)")
        return 2
    return subprocess.call([sys.executable, str(path), *extra])


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(fastpeft.build_info(), indent=2))
    return 0


OP_BENCHMARKS = ("bench_lora_linear.py", "bench_ia3_linear.py", "bench_adapter_bottleneck.py",
                 "bench_prefix_attention.py", "bench_token_logprobs.py",
                 "bench_linear_cross_entropy.py", "bench_gae.py", "bench_ppo_loss.py")
# fastpeft.patch on the default model against peft.
MODEL_BENCHMARKS = ("bench_patch.py",)
# The benchmarks of each suite: "ops" the fused ops and the patched model, "e2e" whole training
# steps (SFT vs peft + transformers, DPO vs TRL, PPO vs a plain PyTorch loop), "methods" the
# fine-tuning methods trained and evaluated on the demo's task; "all" runs every suite.
SUITES = {"ops": OP_BENCHMARKS + MODEL_BENCHMARKS, "e2e": ("bench_e2e.py",),
          "methods": ("bench_methods.py",)}


def cmd_bench(args: argparse.Namespace) -> int:
    extra = (["--quick"] if args.quick else []) + ["--device", args.device]
    if args.op and args.suite != "ops":
        print(f"fastpeft bench: error: --op {args.op} selects one benchmark of --suite ops, "
              f"not of --suite {args.suite}", file=sys.stderr)
        return 2
    if args.op:
        scripts = [f"bench_{args.op}.py"]
    elif args.suite == "all":
        scripts = [s for suite in SUITES.values() for s in suite]
    else:
        scripts = SUITES[args.suite]
    status = 0
    for script in scripts:
        status = _run_bench(script, extra) or status
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    from fastpeft.demo import run

    run(args)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from fastpeft.sample import run

    run(args)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from fastpeft.rank import run

    return run(args)


STAGE_HELP = {
    "sft": "supervised fine-tuning / instruction tuning",
    "rm": "train a reward model on preference pairs",
    "ppo": "RLHF with PPO against a reward function or reward model",
    "dpo": "direct preference optimisation",
}


def _device():
    """cuda:LOCAL_RANK when a GPU is there (torchrun sets LOCAL_RANK), else the CPU."""
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_model(run):
    """(model, tokenizer) of a run: the base model in fp32 (train.dtype bf16 is autocast, so
    the trained weights stay fp32), on the run's device, patched with the method's config;
    for method "full" every parameter trains."""
    from fastpeft.models import load_model

    model, tokenizer = load_model(run.model, "fp32")
    model.to(_device())
    if run.peft is None:
        model.requires_grad_(True)
    else:
        model = fastpeft.patch(model, copy.deepcopy(run.peft))
    return model, tokenizer


def build_trainer(run, model, tokenizer):
    """The stage's trainer; the RLHF trainers are imported only when their command runs."""
    d = run.data
    common = dict(eval_dataset=d.eval, max_length=d.max_length, format=d.format,
                  skip_invalid=d.skip_invalid)
    if run.command == "sft":
        from fastpeft.train.sft import SFTTrainer

        return SFTTrainer(model, tokenizer, run.train, d.train, packing=d.packing, **common)
    if run.command == "rm":
        from fastpeft.train.reward import RewardTrainer

        return RewardTrainer(model, tokenizer, run.train, run.stage, d.train, **common)
    if run.command == "dpo":
        from fastpeft.train.dpo import DPOTrainer

        return DPOTrainer(model, tokenizer, run.train, run.stage, d.train, **common)
    if run.command == "ppo":
        from fastpeft.train.ppo import PPOTrainer

        return PPOTrainer(model, tokenizer, run.train, run.stage, d.train, **common)
    raise ValueError(f"unknown stage {run.command!r}")


def cmd_stage(args: argparse.Namespace) -> int:
    from fastpeft.run_config import load_run_config

    run = load_run_config(args.config, args.command, args.overrides)
    out = run.train.output_dir
    if _is_main_process():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "run_config.yaml"), "w") as f:
            f.write(run.to_yaml())
    from fastpeft.train.loop import seed_everything

    seed_everything(run.train.seed)  # the adapter's initial weights follow train.seed
    model, tokenizer = build_model(run)
    if _is_main_process() and run.peft is not None:
        fastpeft.print_trainable_parameters(model)
    trainer = build_trainer(run, model, tokenizer)
    final = trainer.train()
    if _is_main_process():
        saved = "adapter/" if run.peft is not None else "model/"
        print(f"fastpeft {args.command}: done after step {trainer.step}; "
              f"{os.path.join(out, saved)}, {os.path.join(out, 'metrics.jsonl')}, "
              f"{os.path.join(out, 'run_config.yaml')}")
        if final:
            print(json.dumps({k: v for k, v in final.items()
                              if isinstance(v, (int, float, str))}))
    return 0


# peft types fastpeft.merge can fold into the base weights.
MERGEABLE = ("LORA", "IA3")


def cmd_merge(args: argparse.Namespace) -> int:
    from fastpeft.models import load_model
    from fastpeft.run_config import ConfigError
    from fastpeft.tuners.config import CONFIG_NAME, load_config

    adapter = args.adapter
    if not os.path.isfile(os.path.join(adapter, CONFIG_NAME)) and os.path.isfile(
            os.path.join(adapter, "adapter", CONFIG_NAME)):
        adapter = os.path.join(adapter, "adapter")  # a run's output_dir
    if not os.path.isfile(os.path.join(adapter, CONFIG_NAME)):
        hint = (" (a `method: full` run writes output_dir/model/, a plain model with nothing "
                "to merge)" if os.path.isdir(os.path.join(adapter, "model")) else "")
        raise ConfigError(f"--adapter {args.adapter}: no {CONFIG_NAME} there nor in its "
                          f"adapter/ folder{hint}")
    try:
        config = load_config(adapter)
    except ValueError as e:
        raise ConfigError(f"--adapter {adapter}: {e}") from None
    if config.peft_type not in MERGEABLE:
        raise ConfigError(f"--adapter {adapter}: {config.peft_type} adapters cannot be merged "
                          f"into the base weights (only {', '.join(MERGEABLE)} can); load the "
                          "adapter with fastpeft.load_adapter instead")
    base = args.model or config.base_model_name_or_path
    if not base:
        raise ConfigError(f"--adapter {adapter}: {CONFIG_NAME} has no base_model_name_or_path; "
                          "pass --model")
    model, tokenizer = load_model(base, args.dtype)
    # An explicit --model is the user's choice of base: no name check against the adapter's.
    fastpeft.load_adapter(model, adapter, allow_base_mismatch=args.model is not None)
    try:
        model = fastpeft.merge(model, unload=True)
    except ValueError as e:
        raise ConfigError(f"--adapter {adapter}: {e}") from None
    model.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    print(f"fastpeft merge: {config.peft_type} adapter {adapter} merged into {base}; "
          f"written to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft", description=fastpeft.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="how fastpeft was built").set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side)")
    bench.add_argument("--suite", choices=[*SUITES, "all"], default="ops",
                       help="ops: the fused ops and the patched model; e2e: whole training "
                            "steps against peft + transformers / TRL; methods: full "
                            "fine-tuning, LoRA, IA3, adapters, prompt learning ... on the "
                            "demo's task (CPU); all: every suite")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    bench.add_argument("--op", choices=[s[6:-3] for s in OP_BENCHMARKS + MODEL_BENCHMARKS],
                       default=None, help="one benchmark (default: all)")
    bench.set_defaults(func=cmd_bench)
    demo = sub.add_parser("demo", help="the main job: LoRA SFT of the embedded default model on "
                          "a synthetic task, accuracy before / after (see fastpeft/demo.py)")
    from fastpeft.demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    for name, text in STAGE_HELP.items():
        stage = sub.add_parser(name, help=text, description=f"{text}. Keys: docs/cli.md.")
        stage.add_argument("--config", required=True, metavar="FILE.yaml",
                           help="the run's YAML config")
        stage.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                           help="override config keys, e.g. train.lr=1e-4 train.max_steps=10")
        stage.set_defaults(func=cmd_stage)
    merge = sub.add_parser("merge", help="fold a LoRA / IA3 adapter into its base model")
    merge.add_argument("--adapter", required=True, metavar="DIR",
                       help="an adapter directory (or a run's output_dir holding adapter/)")
    merge.add_argument("--output", required=True, metavar="DIR",
                       help="where the merged model and its tokenizer are written")
    merge.add_argument("--model", default=None,
                       help="the base model (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="the dtype the base is loaded and the merged model saved in")
    merge.set_defaults(func=cmd_merge)
    from fastpeft import rank, sample

    sampler = sub.add_parser("sample", help="K sampled responses per prompt, to rank "
                             "(see fastpeft/sample.py)")
    sample.add_arguments(sampler)
    sampler.set_defaults(func=cmd_sample)
    ranker = sub.add_parser("rank", help="rank sampled responses in the terminal; resumable "
                            "(see fastpeft/rank.py)")
    rank.add_arguments(ranker)
    ranker.set_defaults(func=cmd_rank)
    args = parser.parse_args(argv)
    from fastpeft.data import DataError, InvalidRowError
    from fastpeft.run_config import ConfigError
    from fastpeft.train.loop import NonFiniteLossError

    try:
        return args.func(args)
    except (ConfigError, DataError, InvalidRowError, FileNotFoundError) as e:
        # A problem with the user's config, data or paths: the message, not a traceback.
        print(f"fastpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:  # train.on_nan: stop
        print(f"fastpeft {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
