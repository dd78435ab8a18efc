"""fastpeft ia3_linear vs Hugging Face peft's IA3 layer vs the unscaled base nn.Linear.

Forward+backward of one layer whose input needs a gradient, the base weight frozen and the IA3
vector l trained, for peft's two placements: scale_input (feed-forward layers, `(x * l) W^T + b`)
and output scaling (k / v, `(x W^T + b) * l`). Targets: at most 1.05x the base's time; saved
activations no larger than the base linear's. A frozen base keeps nothing (its weight is not
an activation) while l's gradient needs one activation, so the memory reference is the same
layer trained in full ("base-trained" keeps x), the least a layer with a trained parameter keeps.
Timing and memory columns as described in bench/_common.py.

    python bench/bench_ia3_linear.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import sys

import torch
import torch.nn.functional as F

from _common import measure, parse_args, write_results
from fastpeft.ops import ia3_linear, use_backend

# (M, in, out, scale_input): SmolLM2-135M's MLP down / up projections and its k / v projection.
CPU_SHAPES = [(1024, 1536, 576, True), (1024, 576, 1536, True), (1024, 576, 192, False),
              (1024, 576, 576, False), (4096, 2048, 2048, True)]
CUDA_SHAPES = [(8192, 4096, 11008, True), (8192, 11008, 4096, True), (8192, 4096, 1024, False)]


def peft_layer(base: torch.nn.Linear, feedforward: bool):
    from peft import IA3Config
    from peft.tuners.ia3 import Linear as PeftIA3Linear

    return PeftIA3Linear(base, "default", config=IA3Config(), is_feedforward=feedforward)


def make_providers(m, k, n, scale_input, device, dtype, with_triton):
    base = torch.nn.Linear(k, n, device=device, dtype=dtype)
    base.requires_grad_(False)
    peft = peft_layer(base, scale_input).to(device=device, dtype=dtype).train()
    l = peft.ia3_l["default"]
    with torch.no_grad():
        l.uniform_(0.5, 1.5)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, n, device=device, dtype=dtype)
    w_trained = base.weight.detach().clone().requires_grad_(True)
    providers = {
        "base": lambda: F.linear(x, base.weight, base.bias),
        "base-trained": lambda: F.linear(x, w_trained, base.bias),
        "peft": lambda: peft(x),
        "fastpeft": lambda: ia3_linear(x, base.weight, base.bias, l, scale_input),
    }
    if with_triton:
        def triton_provider():
            with use_backend("triton"):
                return ia3_linear(x, base.weight, base.bias, l, scale_input)

        providers["fastpeft-triton"] = triton_provider
    return providers, [x, l, w_trained], grad, [base.weight, base.bias, l, w_trained]


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "two shapes, fewer rounds")
    if args is None:
        return 2
    device, dtype = args.device, args.dtype
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[1:3]
    rounds = args.rounds or (5 if args.quick else 11)
    with_triton = device == "cuda"
    torch.manual_seed(0)
    rows, table = [], []
    for m, k, n, scale_input in shapes:
        inner = 1 if (device == "cpu" and m * k * n > 4e9) else (3 if device == "cpu" else 10)
        providers, params, grad, weights = make_providers(m, k, n, scale_input, device, dtype,
                                                          with_triton)
        res = measure(providers, params, grad, weights, device, rounds, inner)
        base = res["base"]["median_ms"]
        row = {"M": m, "in": k, "out": n, "scale_input": scale_input, "dtype": str(dtype),
               "results": res,
               "fastpeft_vs_base": res["fastpeft"]["median_ms"] / base,
               "peft_vs_base": res["peft"]["median_ms"] / base,
               "fastpeft_speedup_vs_peft": res["peft"]["median_ms"] / res["fastpeft"]["median_ms"]}
        saved = " / ".join(f"{res[p]['saved_mb']:.1f}" for p in ("base", "base-trained", "peft",
                                                                 "fastpeft"))
        cells = [m, f"{k} -> {n}", "input (ff)" if scale_input else "output (k, v)",
                 f"{row['fastpeft_vs_base']:.3f}", f"{row['peft_vs_base']:.3f}",
                 f"{row['fastpeft_speedup_vs_peft']:.2f}x", saved]
        if with_triton:
            row["triton_vs_base"] = res["fastpeft-triton"]["median_ms"] / base
            cells += [f"{row['triton_vs_base']:.3f}", " / ".join(
                f"{res[p]['peak_extra_mb']:.0f}" for p in ("base", "peft", "fastpeft"))]
        rows.append(row)
        table.append(cells)
        print(" | ".join(str(c) for c in cells), flush=True)
    header = ["M", "in -> out", "scaling", "fastpeft / base", "peft / base",
              "fastpeft speed-up vs peft", "saved MB base / base-trained / peft / fastpeft"]
    if with_triton:
        header += ["triton / base", "peak MB base / peft / fastpeft"]
    print(write_results("ia3_linear", device, args.quick, rounds, rows, header, table, args.out,
                        note=f"dtype {dtype}; base = frozen nn.Linear, l trained"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
