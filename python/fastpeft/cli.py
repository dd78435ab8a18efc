"""The `fastpeft` command."""

import argparse
import json
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


def cmd_bench(args: argparse.Namespace) -> int:
    extra = (["--quick"] if args.quick else []) + ["--device", args.device]
    scripts = [f"bench_{args.op}.py"] if args.op else OP_BENCHMARKS + MODEL_BENCHMARKS
    status = 0
    for script in scripts:
        status = _run_bench(script, extra) or status
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    print("fastpeft build:")
    print(json.dumps(fastpeft.build_info(), indent=2))
    print("\nfused LoRA linear vs peft vs the frozen base layer (forward+backward, CPU fp32):")
    return _run_bench("bench_lora_linear.py", ["--quick"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft", description=fastpeft.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="how fastpeft was built").set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side)")
    bench.add_argument("--suite", choices=["ops"], default="ops")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    bench.add_argument("--op", choices=[s[6:-3] for s in OP_BENCHMARKS + MODEL_BENCHMARKS],
                       default=None, help="one benchmark (default: all)")
    bench.set_defaults(func=cmd_bench)
    sub.add_parser("demo", help="the main job on the embedded default model").set_defaults(
        func=cmd_demo
    )
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
