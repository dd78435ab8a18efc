"""fastpeft ppo_policy_loss / ppo_value_loss (one fused pass: loss, stats and gradient) vs the
unfused PyTorch formulas (fastpeft.ops.reference, TRL's: exp, clamp, two products, max,
masked mean, stats, then autograd's backward through all of them).

Forward+backward of the loss over [B, T] tokens with right-padded masks, the stats computed
by both (TRL logs them every step). "saved" is what autograd keeps for the backward beyond the
inputs themselves (fastpeft: the one [N] gradient); "peak" is the peak of torch's allocations
during one forward+backward above what was held before (bench/_common.py peak_mb). Timing as
described in bench/_common.py; one thread by default (FASTPEFT_BENCH_THREADS; see main).

    python bench/bench_ppo_loss.py [--device cpu|cuda] [--quick] [--out DIR]
"""

import sys

import torch

from _common import measure, parse_args, peak_mb, set_bench_threads, step, write_results
from fastpeft.ops import ppo_policy_loss, ppo_value_loss, reference

SHAPES = [(64, 1024), (256, 2048)]
# (name, kl estimator or None); "value" is the value loss.
CASES = [("policy", None), ("policy+kl", "k3"), ("value", None)]


def make_providers(b, t, case, est, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(scale=1.0, shift=0.0):
        return (torch.randn(b, t, generator=g) * scale + shift).to(device=device, dtype=dtype)

    lp = rnd(0.5, -2.0).requires_grad_(True)
    old = (lp.detach() + rnd(0.3)).contiguous()
    adv, ref = rnd(), (lp.detach() + rnd(0.4)).contiguous()
    lengths = torch.randint(t // 2, t + 1, (b, 1), generator=g).to(device)
    mask = torch.arange(t, device=device) < lengths
    kl = {} if est is None else dict(ref_logprobs=ref, kl_coef=0.05, kl_estimator=est)
    if case == "value":
        return ({"unfused": lambda: reference.ppo_value_loss(lp, old, adv, mask, 0.2)[0],
                 "fastpeft": lambda: ppo_value_loss(lp, old, adv, mask, 0.2)[0]},
                [lp], [lp, old, adv, mask])
    return ({"unfused": lambda: reference.ppo_policy_loss(lp, old, adv, mask, 0.2, 0.2, **kl)[0],
             "fastpeft": lambda: ppo_policy_loss(lp, old, adv, mask, 0.2, 0.2, **kl)[0]},
            [lp], [lp, old, adv, ref, mask])


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "one shape, fewer rounds")
    if args is None:
        return 2
    device = args.device
    set_bench_threads()
    dtype = torch.float32
    shapes = SHAPES[:1] if args.quick else SHAPES
    cases = CASES[:2] if args.quick else CASES
    rounds = args.rounds or (3 if args.quick else 11)
    rows, table = [], []
    for b, t in shapes:
        for case, est in cases:
            providers, params, inputs = make_providers(b, t, case, est, device, dtype)
            loss_u, loss_f = providers["unfused"](), providers["fastpeft"]()
            check = (loss_u - loss_f).abs().item()
            grad = torch.ones((), device=device, dtype=dtype)
            res = measure(providers, params, grad, inputs, device, rounds,
                          inner=5 if device == "cpu" else 20)
            for name, fn in providers.items():
                res[name]["peak_mb"] = peak_mb(lambda fn=fn: step(fn, params, grad), device)
            unf, fus = res["unfused"], res["fastpeft"]
            row = {"B": b, "T": t, "case": case, "kl_estimator": est, "dtype": str(dtype),
                   "results": res, "check_loss_abs_diff": check,
                   "time_vs_unfused": fus["median_ms"] / unf["median_ms"],
                   "speedup": unf["median_ms"] / fus["median_ms"],
                   "saved_vs_unfused": fus["saved_mb"] / max(unf["saved_mb"], 1e-9),
                   "peak_vs_unfused": fus["peak_mb"] / max(unf["peak_mb"], 1e-9)}
            cells = [f"{b} x {t}", case, f"{unf['median_ms']:.3f}", f"{fus['median_ms']:.3f}",
                     f"{row['time_vs_unfused']:.3f} ({row['speedup']:.1f}x)",
                     f"{unf['saved_mb']:.2f} / {fus['saved_mb']:.2f}",
                     f"{unf['peak_mb']:.2f} / {fus['peak_mb']:.2f} ({row['peak_vs_unfused']:.2f}x)",
                     f"{check:.1e}"]
            rows.append(row)
            table.append(cells)
            print(" | ".join(cells), flush=True)
    header = ["B x T", "loss", "unfused ms", "fastpeft ms", "fastpeft / unfused time",
              "saved MB unfused / fastpeft", "peak MB unfused / fastpeft", "|loss diff|"]
    print(write_results("ppo_loss", device, args.quick, rounds, rows, header, table, args.out,
                        note=f"dtype {dtype}; clip 0.2; policy+kl: k3, kl_coef 0.05; stats "
                             "computed by both"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
