"""Dataset row formats: detection, validation, and conversion to one internal form.

Every SFT row becomes a list of turns ``{"role", "content", "train"}`` (or, for raw text
formats, text segments); every preference row becomes one or more (prompt, chosen, rejected)
pairs. A string prompt / completion is raw text (no template); a list of ``{role, content}``
messages goes through the chat template, as in TRL.
"""

from __future__ import annotations

from typing import Any

SFT_FORMATS = ("alpaca", "messages", "prompt_completion", "text")
PREFERENCE_FORMATS = ("preference", "ranked")
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS

# Fields that identify a format, checked in this order (the most specific first).
_SIGNATURES = (
    ("ranked", ("prompt", "responses", "ranking")),
    ("preference", ("prompt", "chosen", "rejected")),
    ("messages", ("messages",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)
ROLES = ("system", "user", "assistant")


class InvalidRowError(ValueError):
    """A row that does not fit its format; the message says what is wrong."""


def detect_format(row: dict[str, Any]) -> str:
    """The format whose fields `row` has; ValueError naming the fields seen otherwise."""
    if not isinstance(row, dict):
        raise InvalidRowError(f"expected a JSON object, got {type(row).__name__}")
    for name, fields in _SIGNATURES:
        if all(f in row for f in fields):
            return name
    raise InvalidRowError(
        f"cannot tell the format from the fields {sorted(row)}; expected one of "
        + "; ".join(f"{n}: {{{', '.join(f)}}}" for n, f in _SIGNATURES)
    )


def _need(row: dict, field: str, types: type | tuple, what: str, optional: bool = False):
    if field not in row or row[field] is None:
        if optional:
            return None
        raise InvalidRowError(f"missing field '{field}'")
    value = row[field]
    if not isinstance(value, types) or isinstance(value, bool):
        raise InvalidRowError(f"field '{field}' must be {what}, got {type(value).__name__}")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidRowError(f"field '{field}' must be a non-empty list of {{role, content}}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRowError(f"{field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidRowError(f"{field}[{i}].role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise InvalidRowError(
                f"{field}[{i}].content must be a string, got {type(m['content']).__name__}"
            )
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def _text_or_messages(row: dict, field: str) -> str | list[dict]:
    value = row.get(field)
    if field not in row or value is None:
        raise InvalidRowError(f"missing field '{field}'")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, field)
    raise InvalidRowError(
        f"field '{field}' must be a string or a list of messages, got {type(value).__name__}"
    )


def normalize_sft(row: dict, fmt: str) -> dict:
    """One SFT row as {"kind": "chat", "turns": [...]} or {"kind": "raw", "segments": [...]}.

    A turn is {"role", "content", "train"}; a segment is (text, trained). alpaca trains on
    `output` only (history turns are context); messages on every assistant turn."""
    if fmt == "text":
        return {"kind": "raw", "segments": [(_need(row, "text", str, "a string"), True)]}
    if fmt == "prompt_completion":
        prompt, completion = _text_or_messages(row, "prompt"), _text_or_messages(row, "completion")
        if isinstance(prompt, str) != isinstance(completion, str):
            raise InvalidRowError("'prompt' and 'completion' must both be strings or both messages")
        if isinstance(prompt, str):
            return {"kind": "raw", "segments": [(prompt, False), (completion, True)]}
        turns = [dict(m, train=False) for m in prompt]
        return {"kind": "chat", "turns": turns + [dict(m, train=True) for m in completion]}
    if fmt == "messages":
        turns = [
            dict(m, train=m["role"] == "assistant")
            for m in _messages(row.get("messages"), "messages")
        ]
        if not any(t["train"] for t in turns):
            raise InvalidRowError("'messages' has no assistant turn to train on")
        return {"kind": "chat", "turns": turns}
    if fmt == "alpaca":
        instruction = _need(row, "instruction", str, "a string")
        inp = _need(row, "input", str, "a string", optional=True) or ""
        output = _need(row, "output", str, "a string")
        system = _need(row, "system", str, "a string", optional=True)
        history = _need(
            row, "history", list, "a list of [instruction, output] pairs", optional=True
        )
        turns = [{"role": "system", "content": system, "train": False}] if system else []
        for i, pair in enumerate(history or []):
            if not (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(isinstance(x, str) for x in pair)
            ):
                raise InvalidRowError(
                    f"history[{i}] must be a pair of strings [instruction, output]"
                )
            turns += [
                {"role": "user", "content": pair[0], "train": False},
                {"role": "assistant", "content": pair[1], "train": False},
            ]
        turns += [
            {"role": "user", "content": instruction, "input": inp, "train": False},
            {"role": "assistant", "content": output, "train": True},
        ]
        return {"kind": "alpaca", "turns": turns}
    raise ValueError(f"format must be one of {SFT_FORMATS} for SFT data, got {fmt!r}")


def normalize_preference(row: dict, fmt: str) -> list[dict]:
    """A preference row as [{"prompt", "chosen", "rejected"}]; a ranked row of K responses as
    its K(K-1)/2 pairs (InstructGPT). `ranking` lists response indices, best first; a ranked
    row with `ranking: null` (sampled, not ranked yet) gives no pair."""
    if fmt == "preference":
        pair = {k: _text_or_messages(row, k) for k in ("prompt", "chosen", "rejected")}
        _same_kind(pair)
        if row.get("margin") is not None:  # TRL's per-pair margin for reward models
            pair["margin"] = _margin(row["margin"])
        return [pair]
    if fmt == "ranked":
        prompt = _text_or_messages(row, "prompt")
        responses = _need(row, "responses", list, "a list of responses")
        k = len(responses)
        if k < 2:
            raise InvalidRowError(f"'responses' needs at least 2 entries, got {k}")
        if row.get("ranking") is None:  # not ranked yet (`fastpeft sample`): no pairs
            return []
        ranking = _need(row, "ranking", list, "a list of response indices, best first")
        if sorted(ranking) != list(range(k)) or not all(type(r) is int for r in ranking):
            raise InvalidRowError(
                f"'ranking' must be a permutation of 0..{k - 1} (response indices, best first), "
                f"got {ranking}"
            )
        resp = [_text_or_messages({"responses": r}, "responses") for r in responses]
        if not isinstance(prompt, str):  # a string reply to a chat prompt is its assistant turn
            resp = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r
                    for r in resp]
        pairs = []
        for i in range(k):
            for j in range(i + 1, k):
                pairs.append(
                    {"prompt": prompt, "chosen": resp[ranking[i]], "rejected": resp[ranking[j]]}
                )
        for p in pairs:
            _same_kind(p)
        return pairs
    raise ValueError(f"format must be one of {PREFERENCE_FORMATS} for preference data, got {fmt!r}")


def _margin(value: Any) -> float:
    """A number (or, from CSV, a string holding one)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRowError(f"'margin' must be a number, got {value!r}") from None


def _same_kind(pair: dict) -> None:
    kinds = {isinstance(v, str) for v in pair.values()}
    if len(kinds) > 1:
        raise InvalidRowError(
            "'prompt', 'chosen' and 'rejected' must all be strings or all messages"
        )


def prompt_of(row: dict, fmt: str) -> dict:
    """The prompt part of any row, for PPO prompt datasets: {"kind": "raw", "text"} or
    {"kind": "chat"|"alpaca", "turns"} (generation starts after the last turn)."""
    if fmt in PREFERENCE_FORMATS or fmt == "prompt_completion" or (fmt is None and "prompt" in row):
        prompt = _text_or_messages(row, "prompt")
        if isinstance(prompt, str):
            return {"kind": "raw", "text": prompt}
        return {"kind": "chat", "turns": [dict(m, train=False) for m in prompt]}
    if fmt == "text":
        return {"kind": "raw", "text": _need(row, "text", str, "a string")}
    sft = normalize_sft(row, fmt)
    turns = sft["turns"]
    # Drop the trained final answer; keep the context before it.
    while turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns:
        raise InvalidRowError("no prompt left once the assistant turns are removed")
    return {"kind": sft["kind"], "turns": [dict(t, train=False) for t in turns]}
