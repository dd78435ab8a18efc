"""What every bench/bench_<op>.py shares: interleaved timing with medians, the bytes autograd
saves for the backward, CUDA peak memory, and writing results (JSON + a markdown table).

Timing: each provider runs forward+backward in interleaved rounds (the order shuffled every
round); the medians are compared as ratios measured in the same run, because these machines
are shared and noisy. "saved" is the bytes autograd keeps for the backward (unique storages,
the layer's weights excluded): the activation memory that grows with every layer in training.
torch keeps no allocator statistics on the CPU, so that is the CPU memory column.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import fastpeft

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(doc: str, argv, quick_help: str) -> argparse.Namespace | None:
    """The options every benchmark takes; None (after saying so) when --device cuda has no GPU.
    Sets args.dtype: bf16 on CUDA, fp32 on the CPU."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results dir (default bench/results)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure on cuda", file=sys.stderr)
        return None
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return args


def step(fn, params, grad):
    for t in params:
        t.grad = None
    fn().backward(grad)


def saved_bytes(fn, grad, weights) -> int:
    """Bytes autograd saves for the backward: unique storages, `weights` excluded."""
    weight_storages = {w.untyped_storage().data_ptr() for w in weights if w is not None}
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
    """{name: {median_ms, runs_ms, saved_mb[, peak_extra_mb]}} for providers {name: forward fn}."""
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
        result[name]["saved_mb"] = saved_bytes(fn, grad, weights) / 2**20
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step(fn, params, grad)
            sync()
            result[name]["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return result


def set_bench_threads() -> None:
    """One thread unless FASTPEFT_BENCH_THREADS says otherwise, for passes of a few hundred
    microseconds: on a shared 2-core machine every parallel region (ATen ops go parallel from
    32K elements) can wait a whole scheduler tick (~8 ms measured) for its second thread,
    which swamps what is being measured."""
    torch.set_num_threads(int(os.environ.get("FASTPEFT_BENCH_THREADS", "1")))


def peak_mb(fn, device: str) -> float:
    """Peak bytes allocated by torch during fn() above those held before it, in MB (CUDA:
    max_memory_allocated; CPU: torch.profiler's allocation and free events summed in time
    order, which counts every tensor but not memory libraries take outside torch)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()  # + for an allocation, - for a free
        peak = max(peak, held)
    return peak / 2**20


def reset_rss_high_water() -> bool:
    """Resets this process's RSS high-water mark (VmHWM) to its current RSS through
    /proc/self/clear_refs, so that a later VmHWM is the peak of what ran since; False where
    that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_results(op, device, quick, rounds, rows, header, table_rows, out_dir=None, note=""):
    """bench/results/<op>_<device>[_quick].{json,md}; returns the markdown text."""
    meta = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rounds": rounds, "build": fastpeft.build_info(), "quick": quick}
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{op}_{device}" + ("_quick" if quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {op} forward+backward, {device}, {meta['threads']} threads, medians of {rounds} "
             f"interleaved rounds", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in table_rows]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(text)
    return text
