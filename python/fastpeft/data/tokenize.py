"""Normalized rows to token ids: input_ids / labels (prompt tokens -100) / attention_mask.

Segments are tokenized one by one (no special tokens added) and concatenated, so a prompt's
tokens are exactly those the model sees when it is given the prompt alone at generation."""

from __future__ import annotations

from fastpeft.data.templates import has_chat_template, prompt_text, turn_segments

IGNORE_INDEX = -100


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front of plain text (Llama-2 style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _raw_prefix(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []


def segments_of(tokenizer, sft: dict) -> list[tuple[str, bool]]:
    if sft["kind"] == "raw":
        return list(sft["segments"])
    return turn_segments(tokenizer, sft["kind"], sft["turns"])


def tokenize_sft(tokenizer, sft: dict, max_length: int | None = None) -> dict[str, list[int]]:
    """A normalized SFT row (formats.normalize_sft) as input_ids / labels / attention_mask,
    cut to max_length from the right. Raw rows get the tokenizer's BOS (if it adds one) and
    EOS after the last trained text; templated rows carry their own."""
    input_ids: list[int] = []
    labels: list[int] = []
    if sft["kind"] == "raw":
        input_ids += _raw_prefix(tokenizer)
        labels += [IGNORE_INDEX] * len(input_ids)
    for text, trained in segments_of(tokenizer, sft):
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if sft["kind"] == "raw" and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def num_trained(example: dict, prefix: str = "") -> int:
    return sum(1 for t in example[prefix + "labels"] if t != IGNORE_INDEX)


def pair_to_sft(pair: dict) -> tuple[dict, dict]:
    """A {prompt, chosen, rejected} pair as two normalized SFT rows sharing the prompt."""
    prompt = pair["prompt"]
    out = []
    for side in ("chosen", "rejected"):
        if isinstance(prompt, str):
            out.append({"kind": "raw", "segments": [(prompt, False), (pair[side], True)]})
        else:
            turns = [dict(m, train=False) for m in prompt]
            turns += [dict(m, train=m["role"] == "assistant") for m in pair[side]]
            out.append({"kind": "chat", "turns": turns})
    return out[0], out[1]


def tokenize_pair(tokenizer, pair: dict, max_length: int | None = None) -> dict[str, list[int]]:
    """chosen_* and rejected_* input_ids / labels / attention_mask (prompt masked), for reward
    models and DPO; a pair's "margin" (reward models) is kept."""
    chosen, rejected = pair_to_sft(pair)
    out = {}
    for side, sft in (("chosen", chosen), ("rejected", rejected)):
        for key, value in tokenize_sft(tokenizer, sft, max_length).items():
            out[f"{side}_{key}"] = value
    if pair.get("margin") is not None:
        out["margin"] = pair["margin"]
    return out


def tokenize_prompt(tokenizer, prompt: dict, max_length: int | None = None) -> dict:
    """A prompt (formats.prompt_of) as input_ids / attention_mask ending where generation
    starts; cut from the left to max_length so the end of the prompt survives. `prompt` keeps
    the text."""
    if prompt["kind"] == "raw":
        text = prompt["text"]
        ids = _raw_prefix(tokenizer) + _ids(tokenizer, text)
    else:
        text = prompt_text(tokenizer, prompt["kind"], prompt["turns"])
        ids = _ids(tokenizer, text)
    if max_length is not None and len(ids) > max_length:
        ids = ids[len(ids) - max_length :]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "prompt": text}


__all__ = [
    "IGNORE_INDEX",
    "has_chat_template",
    "num_trained",
    "tokenize_pair",
    "tokenize_prompt",
    "tokenize_sft",
]
