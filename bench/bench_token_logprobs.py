"""fastpeft token_logprobs vs log_softmax + gather (and TRL's selective_log_softmax).

Forward+backward of the per-token log-probs of [B, T, V] logits (the logits need a gradient,
as under an LM head), and the same with the entropy (unfused: log_softmax, gather and
-(p log p).sum). Target (issue 5): at [4, 256, 49152] fp32, at most 0.5x the memory of
log_softmax + gather.

Memory columns:
- peak MB: the highest total of bytes held by torch's allocator during one step (forward +
  backward, the logits' gradient included) above what it held before: on the CPU from
  torch.profiler's allocation / free events summed in time order (as bench/bench_patch.py),
  on CUDA torch.cuda.max_memory_allocated.
- saved MB: the bytes autograd keeps for the backward (bench/_common.py), the logits excluded
  (every provider needs them or something as large: the unfused path keeps its log-softmax).
Timing as bench/_common.py: interleaved rounds in shuffled order, medians, ratios from one run.

    python bench/bench_token_logprobs.py [--device cpu|cuda] [--quick] [--rounds N] [--out DIR]
"""

import sys

import torch

from _common import measure, parse_args, peak_mb, write_results
from fastpeft.ops import reference, token_logprobs

CPU_SHAPES = [(4, 256, 49152)]
CUDA_SHAPES = [(4, 256, 49152), (4, 1024, 128256)]
QUICK_SHAPE = (2, 32, 4099)


def unfused(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_providers(shape, device, dtype, entropy, with_trl):
    b, t, v = shape
    logits = torch.randn(b, t, v, device=device, dtype=dtype).mul_(2).requires_grad_(True)
    tokens = torch.randint(0, v, (b, t), device=device)
    if entropy:
        def stack(pair):
            return torch.stack(pair, -1)

        grad = torch.randn(b, t, 2, device=device, dtype=dtype)
        providers = {
            "unfused": lambda: stack(reference.token_logprobs(logits, tokens, 1.0, True)),
            "fastpeft": lambda: stack(token_logprobs(logits, tokens, 1.0, True)),
        }
    else:
        grad = torch.randn(b, t, device=device, dtype=dtype)
        providers = {"unfused": lambda: unfused(logits, tokens),
                     "fastpeft": lambda: token_logprobs(logits, tokens)}
        if with_trl:
            from trl.trainer.utils import selective_log_softmax

            providers["trl"] = lambda: selective_log_softmax(logits, tokens)
    return providers, logits, grad


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "a small shape, fewer rounds")
    if args is None:
        return 2
    device, dtype = args.device, (torch.float32 if args.device == "cpu" else args.dtype)
    shapes = [QUICK_SHAPE] if args.quick else (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    rounds = args.rounds or (3 if args.quick else 7)
    inner = 1 if device == "cpu" else 5
    with_trl = not args.quick
    if with_trl:
        try:
            import trl.trainer.utils  # noqa: F401
        except ImportError:
            with_trl = False
    torch.manual_seed(0)
    rows, table = [], []
    for shape in shapes:
        for entropy in (False, True):
            providers, logits, grad = make_providers(shape, device, dtype, entropy,
                                                     with_trl and not entropy)
            res = measure(providers, [logits], grad, [logits], device, rounds, inner)
            for name, fn in providers.items():
                logits.grad = None
                res[name]["peak_mb"] = peak_mb(lambda fn=fn: fn().backward(grad), device)
            logits.grad = None
            unf, fus = res["unfused"], res["fastpeft"]
            row = {"shape": list(shape), "entropy": entropy, "dtype": str(dtype), "results": res,
                   "logits_mb": logits.numel() * logits.element_size() / 2**20,
                   "time_vs_unfused": fus["median_ms"] / unf["median_ms"],
                   "peak_vs_unfused": fus["peak_mb"] / unf["peak_mb"],
                   "saved_vs_unfused": fus["saved_mb"] / max(unf["saved_mb"], 1e-9)}
            cells = ["x".join(map(str, shape)), "yes" if entropy else "no",
                     f"{unf['median_ms']:.1f} / {fus['median_ms']:.1f}",
                     f"{row['time_vs_unfused']:.3f}",
                     f"{unf['peak_mb']:.0f} / {fus['peak_mb']:.0f}",
                     f"{row['peak_vs_unfused']:.3f}",
                     f"{unf['saved_mb']:.1f} / {fus['saved_mb']:.3f}"]
            if "trl" in res:
                row["trl_time_vs_unfused"] = res["trl"]["median_ms"] / unf["median_ms"]
                row["trl_peak_vs_unfused"] = res["trl"]["peak_mb"] / unf["peak_mb"]
                cells += [f"{row['trl_time_vs_unfused']:.3f}", f"{row['trl_peak_vs_unfused']:.3f}"]
            else:
                cells += ["-", "-"]
            rows.append(row)
            table.append(cells)
            print(" | ".join(str(c) for c in cells), flush=True)
    header = ["B x T x V", "entropy", "ms unfused / fastpeft", "time ratio",
              "peak MB unfused / fastpeft", "peak ratio", "saved MB unfused / fastpeft",
              "TRL selective_log_softmax time ratio", "TRL peak ratio"]
    print(write_results("token_logprobs", device, args.quick, rounds, rows, header, table,
                        args.out, note=f"dtype {dtype}; logits need a gradient; unfused = "
                        "log_softmax + gather (+ -(p log p).sum for the entropy); ratios are "
                        "fastpeft (or TRL) / unfused"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
