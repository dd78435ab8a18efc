"""fastpeft.patch vs peft.get_peft_model: one LoRA training step of a whole model.

SmolLM2-135M-Instruct (the embedded default model) with LoRA on all linear layers (r=16,
lora_alpha=32, lora_dropout=0.05), a batch of 4 x 256 random token ids, fp32 on the CPU (bf16 on
CUDA), train mode: `model(input_ids=ids, labels=ids).loss.backward()`. The two models start
from the same weights (peft's LoRA weights, B made nonzero, copied into fastpeft's), and their
eval-mode logits are compared before timing (`check_max_abs_diff`).

Timing as bench/_common.py: interleaved rounds in shuffled order, medians, ratios from the same
run. Memory:
- peak MB (CPU): the highest total of bytes held by torch's CPU allocator during one step,
  above what it held before the step: torch.profiler's allocation / free events
  (profile_memory=True) summed in time order. The CPU counterpart of CUDA's
  max_memory_allocated: it counts every tensor (activations, logits, gradients, dropout masks,
  workspaces) but not memory that libraries take outside torch's allocator, nor Python objects.
- peak MB (CUDA): torch.cuda.max_memory_allocated over one step, above the memory before it.
- saved MB: the bytes autograd keeps for the backward (bench/_common.py), weights excluded.

    python bench/bench_patch.py [--device cpu|cuda] [--quick] [--rounds N] [--out DIR]

--quick runs a tiny random Llama built from a config (batch 2 x 32): a smoke test in seconds.
"""

import copy
import sys

import torch

import fastpeft
from _common import measure, parse_args, peak_mb, write_results

RANK, ALPHA, DROPOUT = 16, 32, 0.05
BATCH, SEQ = 4, 256


def load_model(quick: bool) -> tuple[torch.nn.Module, str]:
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config), "tiny-llama"
    from fastpeft.default_model import DEFAULT_MODEL_NAME, load_default_model

    return load_default_model(with_tokenizer=False)[0], DEFAULT_MODEL_NAME


def make_models(base: torch.nn.Module, device: str, dtype: torch.dtype):
    """(peft model, fastpeft model), the same LoRA weights in both, in train mode."""
    import peft

    base = base.to(device=device, dtype=dtype)
    fast_base = copy.deepcopy(base)
    kwargs = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear")
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    fast_model = fastpeft.patch(fast_base, fastpeft.LoraConfig(**kwargs))
    peft_params = dict(peft_model.base_model.model.named_parameters())
    fast_params = dict(fast_model.named_parameters())
    lora_names = [n for n in fast_params if ".lora_" in n]
    if not lora_names or set(lora_names) - set(peft_params):
        raise RuntimeError("fastpeft's LoRA parameters do not match peft's names")
    with torch.no_grad():
        for name in lora_names:
            if ".lora_B." in name:
                peft_params[name].normal_(0, 0.02)
            fast_params[name].copy_(peft_params[name])
    return peft_model.train(), fast_model.train()


def check_same_logits(peft_model, fast_model, ids) -> float:
    peft_model.eval(), fast_model.eval()
    with torch.no_grad():
        diff = (peft_model(input_ids=ids).logits - fast_model(input_ids=ids).logits).abs().max()
    peft_model.train(), fast_model.train()
    return float(diff)


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, "a tiny random Llama, batch 2 x 32 (a smoke test)")
    if args is None:
        return 2
    device, dtype = args.device, args.dtype
    batch, seq = (2, 32) if args.quick else (BATCH, SEQ)
    rounds = args.rounds or (3 if args.quick else 7)
    torch.manual_seed(0)
    base, model_name = load_model(args.quick)
    peft_model, fast_model = make_models(base, device, dtype)
    vocab = fast_model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    diff = check_same_logits(peft_model, fast_model, ids[:1, : min(seq, 32)])

    providers = {
        "peft": lambda: peft_model(input_ids=ids, labels=ids).loss,
        "fastpeft": lambda: fast_model(input_ids=ids, labels=ids).loss,
    }
    trainable = [p for m in (peft_model, fast_model) for p in m.parameters() if p.requires_grad]
    weights = [p for m in (peft_model, fast_model) for p in m.parameters()]
    res = measure(providers, trainable, None, weights, device, rounds, inner=1)
    for name, fn in providers.items():
        for p in trainable:
            p.grad = None
        res[name]["peak_mb"] = peak_mb(lambda fn=fn: fn().backward(), device)
    ratio = {k: res["fastpeft"][k] / res["peft"][k] for k in ("median_ms", "peak_mb", "saved_mb")}
    row = {"model": model_name, "batch": batch, "seq": seq, "r": RANK, "lora_alpha": ALPHA,
           "dropout": DROPOUT, "target_modules": "all-linear", "dtype": str(dtype),
           "check_max_abs_diff": diff, "results": res,
           "time_fastpeft_over_peft": ratio["median_ms"],
           "peak_fastpeft_over_peft": ratio["peak_mb"],
           "saved_fastpeft_over_peft": ratio["saved_mb"]}
    print(f"{model_name} LoRA all-linear r={RANK} B={batch} T={seq} {dtype} {device}: "
          f"step peft {res['peft']['median_ms']:.0f} ms, "
          f"fastpeft {res['fastpeft']['median_ms']:.0f} ms "
          f"(time ratio fastpeft/peft {ratio['median_ms']:.3f}); peak MB peft "
          f"{res['peft']['peak_mb']:.1f}, fastpeft {res['fastpeft']['peak_mb']:.1f} "
          f"(peak ratio {ratio['peak_mb']:.3f}); logits check {diff:.1e}", flush=True)
    header = ["model", "B x T", "step ms peft / fastpeft", "time fastpeft / peft",
              "peak MB peft / fastpeft", "peak fastpeft / peft", "saved MB peft / fastpeft",
              "saved fastpeft / peft"]
    table = [[model_name, f"{batch} x {seq}",
              f"{res['peft']['median_ms']:.0f} / {res['fastpeft']['median_ms']:.0f}",
              f"{ratio['median_ms']:.3f}",
              f"{res['peft']['peak_mb']:.1f} / {res['fastpeft']['peak_mb']:.1f}",
              f"{ratio['peak_mb']:.3f}",
              f"{res['peft']['saved_mb']:.1f} / {res['fastpeft']['saved_mb']:.1f}",
              f"{ratio['saved_mb']:.3f}"]]
    note = (f"LoRA all-linear r={RANK}, lora_alpha={ALPHA}, dropout {DROPOUT}, {dtype}, "
            f"model(input_ids, labels).loss.backward() in train mode. peak MB: the most bytes "
            f"torch's allocator held during one step above what it held before (CPU: "
            f"torch.profiler memory events; CUDA: max_memory_allocated). saved MB: bytes autograd "
            f"keeps for the backward. Logits of the two models differ by at most {diff:.1e}.")
    text = write_results("patch", device, args.quick, rounds, [row], header, table, args.out,
                         note=note)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
