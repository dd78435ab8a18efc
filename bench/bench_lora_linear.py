"""fastpeft lora_linear vs Hugging Face peft's LoRA layer vs the frozen base nn.Linear.

Forward+backward of one layer whose input needs a gradient (a layer inside a network): the base
computes x W^T and grad_out W; LoRA adds the rank-r branch and its A / B gradients. Timing and
memory columns as described in bench/_common.py; on CUDA the peak allocated memory of one step
is reported too.

    python bench/bench_lora_linear.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import sys

import torch
import torch.nn.functional as F

from _common import measure, parse_args, write_results
from fastpeft.ops import lora_linear, use_backend

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


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "one shape, fewer rounds (the demo)")
    if args is None:
        return 2
    device, dtype = args.device, args.dtype
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
    header = ["M", "in -> out", "r", "dropout", "fastpeft / base", "peft / base",
              "fastpeft speed-up vs peft", "saved MB base / peft / fastpeft"]
    if with_triton:
        header += ["triton / base", "peak MB base / peft / fastpeft"]
    table = []
    for row in rows:
        res = row["results"]
        cells = [row["M"], f"{row['in']} -> {row['out']}", row["r"], row["dropout"],
                 f"{row['fastpeft_vs_base']:.3f}", f"{row['peft_vs_base']:.3f}",
                 f"{row['fastpeft_speedup_vs_peft']:.2f}x",
                 f"{res['base']['saved_mb']:.1f} / {res['peft']['saved_mb']:.1f} / "
                 f"{res['fastpeft']['saved_mb']:.1f}"]
        if with_triton:
            cells += [f"{row['triton_vs_base']:.3f}",
                      f"{res['base']['peak_extra_mb']:.0f} / {res['peft']['peak_extra_mb']:.0f} / "
                      f"{res['fastpeft']['peak_extra_mb']:.0f}"]
        table.append(cells)
    text = write_results("lora_linear", device, args.quick, rounds, rows, header, table, args.out,
                         note=f"dtype {dtype}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
