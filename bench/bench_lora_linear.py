"""fastpeft lora_linear vs Hugging Face peft's LoRA layer vs the frozen base nn.Linear.

Forward+backward of one layer whose input needs a gradient (a layer inside a network): the base
computes x W^T and grad_out W; LoRA adds the rank-r branch and its A / B gradients. Each
provider is timed in interleaved rounds (the order shuffled every round) and the medians are
compared as ratios measured in the same run. Memory: "saved" is the bytes autograd keeps for
the backward (unique storages, the weights excluded), the activation memory that grows with
every layer in training; torch keeps no allocator statistics on the CPU, so that is the CPU
memory column. On CUDA the peak allocated memory of one step is reported too.

    python bench/bench_lora_linear.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.ops import lora_linear, use_backend

RESULTS = Path(__file__).resolve().parent / "results"
CPU_SHAPES = [(1024, 576, 576), (1024, 576, 1536), (1024, 1536, 576), (4096, 2048, 2048)]
CUDA_SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008)]
RANK, ALPHA = 16, 32


def peft_layer(base: torch.nn.Linear, p: float):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p)
    return PeftLoraLinear(base, "default", config=config, r=RANK, lora_alpha=ALPHA, lora_dropout=p)


def make_providers(m, k, n, p, device, dtype, with_triton):
    base = torch.nn.Linear(k, n, device=device, dtype=dtype)
    base.requires_grad_(False)
    peft = peft_layer(base, p).to(device=device, dtype=dtype).train()
    lora_a = peft.lora_A["default"].weight
    lora_b = peft.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_(0, 0.02)
    scaling = peft.scaling["default"]
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, n, device=device, dtype=dtype)
    providers = {
        "base": lambda: F.linear(x, base.weight, base.bias),
        "peft": lambda: peft(x),
        "fastpeft": lambda: lora_linear(x, base.weight, base.bias, lora_a, lora_b, scaling, p),
    }
    if with_triton:
        def triton_provider():
            with use_backend("triton"):
                return lora_linear(x, base.weight, base.bias, lora_a, lora_b, scaling, p)

        providers["fastpeft-triton"] = triton_provider
    params = [x, lora_a, lora_b]
    weights = [base.weight, base.bias, lora_a, lora_b]
    return providers, params, grad, weights


def step(fn, params, grad):
    for t in params:
        t.grad = None
    fn().backward(grad)


def saved_bytes(fn, params, grad, weights) -> int:
    """Bytes autograd saves for the backward: unique storages, the layer's weights excluded."""
    weight_storages = {w.untyped_storage().data_ptr() for w in weights}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weight_storages:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    y.backward(grad)
    return sum(storages.values())


def measure(providers, params, grad, weights, device, rounds, inner):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in providers}
    for fn in providers.values():  # warm-up
        for _ in range(2):
            step(fn, params, grad)
    names = list(providers)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                step(providers[name], params, grad)
            sync()
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    result = {name: {"median_ms": statistics.median(v), "runs_ms": v} for name, v in times.items()}
    for name, fn in providers.items():
        result[name]["saved_mb"] = saved_bytes(fn, params, grad, weights) / 2**20
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step(fn, params, grad)
            sync()
            result[name]["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="one shape, fewer rounds (the demo)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results dir (default bench/results)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure on cuda", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[1:2]
    rounds = args.rounds or (5 if args.quick else 11)
    with_triton = device == "cuda"
    torch.manual_seed(0)
    rows = []
    for m, k, n in shapes:
        for p in (0.0, 0.05):
            inner = 1 if (device == "cpu" and m * k * n > 4e9) else (3 if device == "cpu" else 10)
            providers, params, grad, weights = make_providers(m, k, n, p, device, dtype, with_triton)
            res = measure(providers, params, grad, weights, device, rounds, inner)
            base = res["base"]["median_ms"]
            row = {"M": m, "in": k, "out": n, "r": RANK, "dropout": p, "dtype": str(dtype),
                   "results": res,
                   "fastpeft_vs_base": res["fastpeft"]["median_ms"] / base,
                   "peft_vs_base": res["peft"]["median_ms"] / base,
                   "fastpeft_speedup_vs_peft": res["peft"]["median_ms"] / res["fastpeft"]["median_ms"]}
            if with_triton:
                row["triton_vs_base"] = res["fastpeft-triton"]["median_ms"] / base
            rows.append(row)
            print(f"M={m} {k}->{n} r={RANK} p={p}: base {base:.2f} ms | "
                  f"fastpeft {row['fastpeft_vs_base']:.3f}x base | peft {row['peft_vs_base']:.3f}x base | "
                  f"fastpeft {row['fastpeft_speedup_vs_peft']:.2f}x faster than peft | saved MB "
                  f"base {res['base']['saved_mb']:.1f} peft {res['peft']['saved_mb']:.1f} "
                  f"fastpeft {res['fastpeft']['saved_mb']:.1f}", flush=True)
    meta = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rounds": rounds, "build": fastpeft.build_info(), "quick": args.quick}
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"lora_linear_{device}" + ("_quick" if args.quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# lora_linear forward+backward, {device}, {dtype}, {meta['threads']} threads, "
             f"medians of {rounds} interleaved rounds", "",
             "| M | in -> out | r | dropout | fastpeft / base | peft / base | fastpeft speed-up vs peft "
             "| saved MB base / peft / fastpeft |"
             + (" triton / base | peak MB base / peft / fastpeft |" if with_triton else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_triton else "")]
    for row in rows:
        res = row["results"]
        lines.append(
            f"| {row['M']} | {row['in']} -> {row['out']} | {row['r']} | {row['dropout']} | "
            f"{row['fastpeft_vs_base']:.3f} | {row['peft_vs_base']:.3f} | "
            f"{row['fastpeft_speedup_vs_peft']:.2f}x | {res['base']['saved_mb']:.1f} / "
            f"{res['peft']['saved_mb']:.1f} / {res['fastpeft']['saved_mb']:.1f} |"
            + (f" {row['triton_vs_base']:.3f} | {res['base']['peak_extra_mb']:.0f} / "
               f"{res['peft']['peak_extra_mb']:.0f} / {res['fastpeft']['peak_extra_mb']:.0f} |"
               if with_triton else ""))
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
