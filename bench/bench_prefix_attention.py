"""fastpeft prefix_attention vs concat + F.scaled_dot_product_attention.

Forward+backward of attention over [prefix ; keys] (prefix tuning / P-tuning v2), q, k, v and
the prefix all needing gradients. The baseline is what peft's KV-cache route amounts to: the
prefix concatenated to the keys and values, SDPA with an explicit mask (prefix visible, causal
lower-right on the sequence, padding) and enable_gqa. On CUDA it is also timed with the
flash-attention backend on the concat (GQA heads expanded, causal lower-right bias), and
fastpeft's C++ CUDA path (PyTorch's attention on prefix and sequence, merged by log-sum-exp)
next to its Triton kernel: the faster becomes "auto" (_backend.py).
Target (CPU, fp32, B=4, Hq=9, Hkv=3, T=256, P=32, D=64): at most 1.0x the concat path's time,
without allocating the concatenated keys. Timing and memory columns as in bench/_common.py.

    python bench/bench_prefix_attention.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import sys

import torch
import torch.nn.functional as F

from _common import measure, parse_args, write_results
from fastpeft.ops import prefix_attention, use_backend

# (B, Hq, Hkv, T, P, D, padded)
CPU_CASES = [(4, 9, 3, 256, 32, 64, False), (4, 9, 3, 256, 32, 64, True),
             (2, 9, 3, 512, 16, 64, False)]
CUDA_CASES = [(4, 32, 8, 2048, 64, 128, False), (4, 32, 8, 2048, 64, 128, True),
              (8, 16, 16, 1024, 32, 64, False)]


def concat_sdpa(q, k, v, prefix_k, prefix_v, attn_mask):
    B, _, T, _ = q.shape
    P = prefix_k.shape[2]
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], 2)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], 2)
    visible = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(diagonal=P)
    mask = visible
    if attn_mask is not None:
        mask = visible & torch.cat([attn_mask.new_ones(B, P), attn_mask], 1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def flash_concat(q, k, v, prefix_k, prefix_v):
    """Flash attention on the concat (no padding mask: flash takes none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    B, Hq, T, _ = q.shape
    group = Hq // k.shape[1]
    keys = torch.cat([prefix_k.expand(B, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([prefix_v.expand(B, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=causal_lower_right(T, keys.shape[2]))


def make_providers(case, device, dtype, with_triton):
    B, Hq, Hkv, T, P, D, padded = case

    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    q, k, v = t(B, Hq, T, D), t(B, Hkv, T, D), t(B, Hkv, T, D)
    prefix_k, prefix_v = t(1, Hkv, P, D), t(1, Hkv, P, D)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        for b in range(B):
            mask[b, : b * T // (2 * B)] = False  # left padding, up to a quarter of the row
    tensors = [q, k, v, prefix_k, prefix_v]
    providers = {
        "concat+sdpa": lambda: concat_sdpa(*tensors, mask),
        "fastpeft": lambda: prefix_attention(*tensors, mask),
    }
    if with_triton:
        def triton_provider():
            with use_backend("triton"):
                return prefix_attention(*tensors, mask)

        providers["fastpeft-triton"] = triton_provider

        def cpp_provider():  # the C++ path: PyTorch's attention on both parts, LSE-merged
            with use_backend("cpp"):
                return prefix_attention(*tensors, mask)

        providers["fastpeft-cpp"] = cpp_provider
        if not padded:
            providers["flash-concat"] = lambda: flash_concat(*tensors)
    return providers, tensors, torch.randn_like(q), []


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "one case, fewer rounds")
    if args is None:
        return 2
    device, dtype = args.device, args.dtype
    cases = CUDA_CASES if device == "cuda" else CPU_CASES
    if args.quick:
        cases = cases[:1]
    rounds = args.rounds or (5 if args.quick else 11)
    with_triton = device == "cuda"
    torch.manual_seed(0)
    rows, table = [], []
    for case in cases:
        B, Hq, Hkv, T, P, D, padded = case
        providers, params, grad, weights = make_providers(case, device, dtype, with_triton)
        res = measure(providers, params, grad, weights, device, rounds, 1 if device == "cpu" else 5)
        base = res["concat+sdpa"]["median_ms"]
        row = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "P": P, "D": D, "padded": padded,
               "dtype": str(dtype), "results": res,
               "fastpeft_vs_concat": res["fastpeft"]["median_ms"] / base}
        cells = [f"{B}x{Hq}/{Hkv}", T, P, D, "yes" if padded else "no", f"{base:.2f}",
                 f"{row['fastpeft_vs_concat']:.3f}",
                 f"{res['concat+sdpa']['saved_mb']:.1f} / {res['fastpeft']['saved_mb']:.1f}"]
        if with_triton:
            row["triton_vs_concat"] = res["fastpeft-triton"]["median_ms"] / base
            row["cpp_vs_concat"] = res["fastpeft-cpp"]["median_ms"] / base
            flash = res.get("flash-concat")
            row["triton_vs_flash_concat"] = (res["fastpeft-triton"]["median_ms"] / flash["median_ms"]
                                             if flash else None)
            cells += [f"{row['triton_vs_concat']:.3f}", f"{row['cpp_vs_concat']:.3f}",
                      f"{row['triton_vs_flash_concat']:.3f}" if flash else "-",
                      " / ".join(f"{res[p]['peak_extra_mb']:.0f}"
                                 for p in ("concat+sdpa", "fastpeft", "fastpeft-triton"))]
        rows.append(row)
        table.append(cells)
        print(" | ".join(str(c) for c in cells), flush=True)
    header = ["B x Hq/Hkv", "T", "P", "D", "padded", "concat+sdpa ms", "fastpeft / concat",
              "saved MB concat / fastpeft"]
    if with_triton:
        header += ["triton / concat", "cpp (LSE merge) / concat", "triton / flash-concat",
                   "peak MB concat / fastpeft / triton"]
    print(write_results("prefix_attention", device, args.quick, rounds, rows, header, table,
                        args.out, note=f"dtype {dtype}; causal; prefix batch 1 (shared)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
