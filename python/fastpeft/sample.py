"""`fastpeft sample`: K sampled responses per prompt, for people to rank (`fastpeft rank`) and a
reward model to learn from (RLHF step 2, as InstructGPT collects comparison data).

Prompts come from any fastpeft.data format that has one (prompt / messages / alpaca / ...),
tokenized with fastpeft.data.load_prompt_dataset, so the chat template is applied exactly as
in training. Each prompt is repeated K times in a batch and generated with `model.generate`
and the KV cache. Sampling (temperature, then nucleus top_p; no top-k) draws every token of
response j to prompt i from its own generator seeded by (seed, i, j): the responses depend on
the seed and the settings, not on the batch size or on which other prompts share the batch
(up to float differences between padded batches, which move a draw only when it falls on a
boundary between two tokens).

Output: one JSON line per prompt, written and flushed (fsync) as each batch finishes, so a
crash keeps every finished row:
``{"prompt", "responses": [K strings], "ranking": null, "meta": {...}}``. `prompt` is the
prompt's text for raw prompts, its messages (``[{role, content}]``) for chat prompts; the
rows are the `ranked` format of fastpeft.data once `fastpeft rank` has filled `ranking`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch


def _at_least(low: int, name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {low}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {low}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="an alias (smollm2-135m), a model directory or a hub id")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a fastpeft / peft adapter directory (or a run's output_dir "
                             "holding adapter/) loaded onto --model")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="prompts in a fastpeft.data format (prompt / messages / alpaca ...)")
    parser.add_argument("--format", default=None,
                        help="the prompts' format (default: detected from the first row)")
    parser.add_argument("--num-responses", "-k", required=True, type=int, metavar="K",
                        help="responses per prompt (at least 2, to rank)")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    parser.add_argument("--max-new-tokens", type=_at_least(1, "--max-new-tokens"), default=128)
    parser.add_argument("--max-prompt-length", type=_at_least(1, "--max-prompt-length"),
                        default=None, help="cut longer prompts from the left (default: keep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_at_least(1, "--batch-size"), default=8,
                        help="prompts per generate call (each repeated K times)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_settings(num_responses: int, temperature: float, top_p: float) -> None:
    """ConfigError (the CLI prints it, exit status 2) naming the bad option."""
    from fastpeft.run_config import ConfigError

    if num_responses < 2:
        raise ConfigError(f"--num-responses must be at least 2 (a ranking compares responses), "
                          f"got {num_responses}")
    if not temperature > 0:
        raise ConfigError(f"--temperature must be > 0 (K samples of a greedy decoder are all the "
                          f"same), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def response_seed(seed: int, prompt_index: int, response_index: int) -> int:
    """The seed of response `response_index` to prompt `prompt_index` (64-bit, from a hash, so
    nearby (i, j) give unrelated streams)."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{response_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SeededSampler:
    """A logits processor that samples each row's next token with that row's own generator
    (temperature, then top_p, with transformers' warpers) and leaves only that token finite,
    so greedy `generate` emits it. Per-row generators make a row's tokens independent of the
    rest of the batch."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = generators
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        tokens = torch.stack([torch.multinomial(p, 1, generator=g)[0]
                              for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


def _decode(tokenizer, ids: list[int], eos_id: int | None) -> tuple[str, bool]:
    """(text up to the first EOS, whether the response ended with EOS)."""
    finished = eos_id is not None and eos_id in ids
    if finished:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True), finished


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], prompt_indices: list[int],
                     num_responses: int, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 128,
                     seed: int = 0) -> list[tuple[list[str], list[bool]]]:
    """For each prompt (token ids), (K response texts, whether each ended with EOS): one
    `generate` call on the K-times repeated, left-padded batch, with the KV cache. Response j
    to prompt prompt_indices[n] draws from the generator seeded by response_seed(seed, i, j)."""
    from transformers import GenerationConfig, LogitsProcessorList

    from fastpeft.data import Collator, pad_id_of

    pad_id = pad_id_of(tokenizer)
    eos_id = tokenizer.eos_token_id
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
            for ids in prompts for _ in range(num_responses)]
    batch = Collator(pad_token_id=pad_id, padding_side="left")(rows)
    device = next(model.parameters()).device
    generators = []
    for i in prompt_indices:
        for j in range(num_responses):
            generators.append(torch.Generator(device).manual_seed(response_seed(seed, i, j)))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                              min_new_tokens=None, eos_token_id=eos_id, pad_token_id=pad_id,
                              bos_token_id=None, use_cache=True, num_beams=1,
                              repetition_penalty=1.0)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             generation_config=config,
                             logits_processor=LogitsProcessorList(
                                 [SeededSampler(generators, temperature, top_p)]))
    finally:
        model.train(was_training)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    results = []
    for n in range(len(prompts)):
        decoded = [_decode(tokenizer, ids, eos_id)
                   for ids in new[n * num_responses:(n + 1) * num_responses]]
        results.append(([t for t, _ in decoded], [f for _, f in decoded]))
    return results


def _resolve_adapter(path: str) -> str:
    from fastpeft.tuners.config import CONFIG_NAME

    if not os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(
            os.path.join(path, "adapter", CONFIG_NAME)):
        return os.path.join(path, "adapter")  # a run's output_dir
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"--adapter {path}: no {CONFIG_NAME} there nor in its adapter/ "
                                "folder")
    return path


def row_prompt(prompt: dict):
    """The prompt as the output row stores it: the text of a raw prompt, the messages of a chat
    prompt (an alpaca instruction and input joined as the chat template sees them)."""
    from fastpeft.data.templates import _user_text

    if prompt["kind"] == "raw":
        return prompt["text"]
    return [{"role": t["role"], "content": _user_text(t)} for t in prompt["turns"]]


def load_prompts(path: str, tokenizer, format: str | None = None,
                 max_length: int | None = None) -> tuple[list[dict], list]:
    """(tokenized prompts, as load_prompt_dataset makes them, the row form of each prompt)."""
    from fastpeft.data.loading import load_rows
    from fastpeft.data.tokenize import tokenize_prompt

    pairs, _ = load_rows(path, format, mode="prompt", transform=lambda p: (
        tokenize_prompt(tokenizer, p, max_length), row_prompt(p)))
    return [e for e, _ in pairs], [r for _, r in pairs]


def write_samples(model, tokenizer, prompts_path: str, output: str, num_responses: int,
                  temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                  seed: int = 0, batch_size: int = 8, format: str | None = None,
                  max_prompt_length: int | None = None, meta: dict | None = None,
                  progress: bool = True) -> dict:
    """Sample num_responses responses to every prompt of prompts_path with `model` and write
    one row per prompt to `output`, flushed and fsynced after each batch. Returns {"prompts",
    "seconds", "output"}."""
    from tqdm.auto import tqdm

    check_settings(num_responses, temperature, top_p)
    examples, prompts = load_prompts(prompts_path, tokenizer, format, max_prompt_length)
    meta = dict(meta or {}, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, seed=seed)
    start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    bar = tqdm(total=len(examples), unit="prompt", desc="fastpeft sample", disable=not progress)
    with open(output, "w", encoding="utf-8") as f:
        for lo in range(0, len(examples), batch_size):
            indices = list(range(lo, min(lo + batch_size, len(examples))))
            ids = [examples[i]["input_ids"] for i in indices]
            results = sample_responses(model, tokenizer, ids, indices, num_responses,
                                       temperature, top_p, max_new_tokens, seed)
            for i, (texts, finished) in zip(indices, results):
                row = {"prompt": prompts[i], "responses": texts, "ranking": None,
                       "meta": dict(meta, index=i, finished=finished)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(indices))
    bar.close()
    return {"prompts": len(examples), "seconds": time.perf_counter() - start, "output": output}


def run(args: argparse.Namespace) -> dict:
    """The command: loads the model (and adapter), then write_samples."""
    import fastpeft
    from fastpeft.models import load_model
    from fastpeft.run_config import ConfigError

    check_settings(args.num_responses, args.temperature, args.top_p)  # before loading anything
    model, tokenizer = load_model(args.model, args.dtype)
    adapter = None
    if args.adapter:
        adapter = _resolve_adapter(args.adapter)
        try:
            fastpeft.load_adapter(model, adapter)
        except ValueError as e:
            raise ConfigError(f"--adapter {adapter}: {e}") from None
    if torch.cuda.is_available():
        model.to("cuda")
    result = write_samples(model, tokenizer, args.prompts, args.output, args.num_responses,
                           args.temperature, args.top_p, args.max_new_tokens, args.seed,
                           args.batch_size, args.format, args.max_prompt_length,
                           meta={"model": args.model, "adapter": adapter},
                           progress=not args.no_progress)
    n, seconds = result["prompts"], result["seconds"]
    print(f"fastpeft sample: {n} prompts x {args.num_responses} responses in {seconds:.1f} s "
          f"({n / seconds:.2f} prompts/s); written to {args.output}; rank them with: "
          f"fastpeft rank --input {args.output} --output RANKED.jsonl")
    return result
