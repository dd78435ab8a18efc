"""fastpeft gae (one C++ reverse scan per row) vs the Python loop over time.

The loop is TRL's PPOTrainer advantage loop (vectorised over rows, one step per token, as
trainers run it); the masked reference loop (fastpeft.ops.reference.gae: the same recursion,
skipping mask-0 positions) is timed too. Target: at least 20x faster than the Python loop at
[64, 1024] on the CPU. Medians of interleaved rounds (bench/_common.py), one thread by default
(FASTPEFT_BENCH_THREADS); gae has no backward,
so nothing is saved for one (saved_mb 0).

    python bench/bench_gae.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import random
import statistics
import sys
import time

import torch

from _common import parse_args, set_bench_threads, write_results
from fastpeft.ops import gae, reference

SHAPES = [(64, 1024), (256, 512), (8, 4096)]
GAMMA, LAM = 1.0, 0.95


def trl_loop(rewards, values, mask, gamma, lam):
    """TRL PPOTrainer.train's advantage computation (padding zeroed, loop over time)."""
    values = torch.masked_fill(values, ~mask, 0)
    rewards = torch.masked_fill(rewards, ~mask, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def time_providers(providers, device, rounds, inner):
    """inner: {name: calls per timed batch} (many for the fast kernel, so one preemption on a
    shared machine does not dominate its median)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in providers.values():
        fn()
    times = {name: [] for name in providers}
    names = list(providers)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            sync()
            start = time.perf_counter()
            for _ in range(inner[name]):
                providers[name]()
            sync()
            times[name].append((time.perf_counter() - start) / inner[name] * 1e3)
    return {name: {"median_ms": statistics.median(v), "runs_ms": v, "saved_mb": 0.0}
            for name, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "one shape, fewer rounds")
    if args is None:
        return 2
    device = args.device
    set_bench_threads()
    dtype = torch.float32  # the loop runs in fp32 in trainers; bf16 rewards are rare
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = args.rounds or (3 if args.quick else 11)
    torch.manual_seed(0)
    rows, table = [], []
    for b, t in shapes:
        rewards = torch.randn(b, t, device=device, dtype=dtype)
        values = torch.randn(b, t, device=device, dtype=dtype)
        lengths = torch.randint(t // 2, t + 1, (b, 1), device=device)
        mask = torch.arange(t, device=device) < lengths
        adv, _ = gae(rewards, values, mask, GAMMA, LAM)
        want, _ = trl_loop(rewards, values, mask, GAMMA, LAM)
        check = (adv - torch.where(mask, want, 0)).abs().max().item()
        providers = {
            "python_loop_trl": lambda: trl_loop(rewards, values, mask, GAMMA, LAM),
            "python_loop_reference": lambda: reference.gae(rewards, values, mask, GAMMA, LAM),
            "fastpeft": lambda: gae(rewards, values, mask, GAMMA, LAM),
        }
        inner = {"python_loop_trl": 1, "python_loop_reference": 1, "fastpeft": 50}
        res = time_providers(providers, device, rounds, inner)
        fast = res["fastpeft"]["median_ms"]
        row = {"B": b, "T": t, "dtype": str(dtype), "results": res,
               "check_max_abs_diff": check,
               "speedup_vs_trl_loop": res["python_loop_trl"]["median_ms"] / fast,
               "speedup_vs_reference_loop": res["python_loop_reference"]["median_ms"] / fast}
        cells = [f"{b} x {t}", f"{res['python_loop_trl']['median_ms']:.2f}",
                 f"{res['python_loop_reference']['median_ms']:.2f}", f"{fast:.3f}",
                 f"{row['speedup_vs_trl_loop']:.1f}x", f"{row['speedup_vs_reference_loop']:.1f}x",
                 f"{check:.1e}"]
        rows.append(row)
        table.append(cells)
        print(" | ".join(cells), flush=True)
    header = ["B x T", "TRL loop ms", "reference loop ms", "fastpeft ms",
              "speedup vs TRL loop", "speedup vs reference loop", "max |diff| vs TRL"]
    print(write_results("gae", device, args.quick, rounds, rows, header, table, args.out,
                        note=f"dtype {dtype}, gamma {GAMMA}, lam {LAM}, right-padded masks; "
                             "forward only (gae has no gradient)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
