"""fastpeft adapter_bottleneck vs the unfused PyTorch module (nn.Linear, act, nn.Linear, add).

Forward+backward of one Houlsby / Pfeiffer bottleneck block inside a network (h needs a
gradient, the adapter's weights train), for several activations. Targets: at most 0.8x the
unfused module's time and at most 0.6x its saved-activation memory. Both must keep h (the
down projection's weight gradient is gz^T h), so the table gives the saved memory in total and
beyond h: the unfused module also keeps act(z) (and its output, for relu) where fastpeft keeps
only the pre-activation z. Timing and memory columns as described in bench/_common.py.

    python bench/bench_adapter_bottleneck.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import sys

import torch

from _common import measure, parse_args, write_results
from fastpeft.ops import adapter_bottleneck, reference, use_backend

# (M, hidden, bottleneck): reduction factor 16 at SmolLM2-135M's width and at a 2048 width.
CPU_SHAPES = [(1024, 576, 36), (4096, 576, 36), (1024, 2048, 128)]
CUDA_SHAPES = [(8192, 4096, 256), (16384, 2048, 128)]
CPU_ACTIVATIONS = ["relu", "gelu", "silu"]


class UnfusedAdapter(torch.nn.Module):
    """The module as AdapterHub / Houlsby write it."""

    def __init__(self, d, r, activation, device, dtype):
        super().__init__()
        self.down = torch.nn.Linear(d, r, device=device, dtype=dtype)
        self.up = torch.nn.Linear(r, d, device=device, dtype=dtype)
        self.act = reference.ACTIVATIONS[activation]

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


def make_providers(m, d, r, activation, device, dtype, with_triton):
    unfused = UnfusedAdapter(d, r, activation, device, dtype)
    with torch.no_grad():
        unfused.up.weight.normal_(0, 0.02)
    h = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, d, device=device, dtype=dtype)
    weights = [unfused.down.weight, unfused.down.bias, unfused.up.weight, unfused.up.bias]

    def fused():
        return adapter_bottleneck(h, *weights, activation)

    providers = {"unfused": lambda: unfused(h), "fastpeft": fused}
    if with_triton:
        def triton_provider():
            with use_backend("triton"):
                return fused()

        providers["fastpeft-triton"] = triton_provider
    return providers, [h, *weights], grad, weights, h.numel() * h.element_size() / 2**20


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "one shape, fewer rounds")
    if args is None:
        return 2
    device, dtype = args.device, args.dtype
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    activations = ["gelu", "silu"] if device == "cuda" else CPU_ACTIVATIONS
    if args.quick:
        shapes, activations = shapes[:1], activations[1:2]
    rounds = args.rounds or (5 if args.quick else 11)
    with_triton = device == "cuda"
    torch.manual_seed(0)
    rows, table = [], []
    for m, d, r in shapes:
        for activation in activations:
            inner = 3 if device == "cpu" else 10
            providers, params, grad, weights, h_mb = make_providers(m, d, r, activation, device,
                                                                   dtype, with_triton)
            res = measure(providers, params, grad, weights, device, rounds, inner)
            unf, fus = res["unfused"], res["fastpeft"]
            row = {"M": m, "hidden": d, "bottleneck": r, "activation": activation,
                   "dtype": str(dtype), "results": res, "h_mb": h_mb,
                   "time_vs_unfused": fus["median_ms"] / unf["median_ms"],
                   "saved_vs_unfused": fus["saved_mb"] / unf["saved_mb"],
                   "saved_beyond_h_vs_unfused":
                       (fus["saved_mb"] - h_mb) / max(unf["saved_mb"] - h_mb, 1e-9)}
            cells = [m, f"{d} / {r}", activation, f"{unf['median_ms']:.2f}",
                     f"{row['time_vs_unfused']:.3f}",
                     f"{unf['saved_mb']:.2f} / {fus['saved_mb']:.2f}",
                     f"{row['saved_vs_unfused']:.3f}", f"{row['saved_beyond_h_vs_unfused']:.3f}"]
            if with_triton:
                row["triton_vs_unfused"] = res["fastpeft-triton"]["median_ms"] / unf["median_ms"]
                cells += [f"{row['triton_vs_unfused']:.3f}",
                          f"{unf['peak_extra_mb']:.0f} / {fus['peak_extra_mb']:.0f}"]
            rows.append(row)
            table.append(cells)
            print(" | ".join(str(c) for c in cells), flush=True)
    header = ["M", "hidden / bottleneck", "act", "unfused ms", "fastpeft / unfused time",
              "saved MB unfused / fastpeft", "saved ratio", "saved beyond h ratio"]
    if with_triton:
        header += ["triton / unfused time", "peak MB unfused / fastpeft"]
    print(write_results("adapter_bottleneck", device, args.quick, rounds, rows, header, table,
                        args.out, note=f"dtype {dtype}; residual = h, adapter weights trained"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
