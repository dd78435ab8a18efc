"""Rendering turns to text: the tokenizer's chat template, or the Alpaca template when the
tokenizer has none (or for alpaca rows on such a tokenizer). The result is a list of text
segments ``(text, trained)``; the trained spans are found by rendering the conversation one
turn at a time and taking the text each assistant turn adds after the generation prompt."""

from __future__ import annotations

from fastpeft.data.formats import InvalidRowError

ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _user_text(turn: dict) -> str:
    """An alpaca user turn for a chat template: the instruction, then the input if any."""
    return turn["content"] + ("\n\n" + turn["input"] if turn.get("input") else "")


def render_chat(tokenizer, turns: list[dict], add_generation_prompt: bool) -> str:
    messages = [{"role": t["role"], "content": _user_text(t)} for t in turns]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_alpaca(tokenizer, turns: list[dict], add_generation_prompt: bool) -> str:
    """The Alpaca prompt template, extended to several turns: each user turn is an
    ``### Instruction:`` (+ ``### Input:``) block, each assistant turn its answer + EOS."""
    eos = tokenizer.eos_token or ""
    system = next((t["content"] for t in turns if t["role"] == "system"), None)
    users = [t for t in turns if t["role"] == "user"]
    if system is not None:
        text = system + "\n\n"
    else:
        text = ALPACA_PREAMBLE_INPUT if users and users[-1].get("input") else ALPACA_PREAMBLE
    first = True
    for t in turns:
        if t["role"] == "user":
            text += ("" if first else "\n\n") + f"### Instruction:\n{t['content']}\n\n"
            if t.get("input"):
                text += f"### Input:\n{t['input']}\n\n"
            text += "### Response:\n"
            first = False
        elif t["role"] == "assistant":
            text += t["content"] + eos
    if add_generation_prompt and turns and turns[-1]["role"] == "assistant":
        text += "\n\n### Response:\n"
    return text


def renderer(tokenizer, kind: str):
    """render(turns, add_generation_prompt) for a normalized row of `kind` ("chat" or "alpaca").
    The chat template is used whenever the tokenizer has one."""
    if has_chat_template(tokenizer):
        return lambda turns, gen: render_chat(tokenizer, turns, gen)
    return lambda turns, gen: render_alpaca(tokenizer, turns, gen)


def turn_segments(tokenizer, kind: str, turns: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation split into (text, trained) segments; a trained segment is
    what a trained assistant turn adds after the generation prompt (its end-of-turn tokens
    included)."""
    render = renderer(tokenizer, kind)
    full = render(turns, False)
    segments, cursor = [], 0
    for k, turn in enumerate(turns):
        if not turn["train"]:
            continue
        prompt, upto = render(turns[:k], True), render(turns[: k + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= cursor):
            raise InvalidRowError(
                "the chat template does not render a conversation as a prefix of its "
                "continuation, so the assistant turns cannot be located"
            )
        segments += [(full[cursor : len(prompt)], False), (full[len(prompt) : len(upto)], True)]
        cursor = len(upto)
    segments.append((full[cursor:], False))
    return [(text, trained) for text, trained in segments if text]


def prompt_text(tokenizer, kind: str, turns: list[dict]) -> str:
    """The text a model continues from: the rendered turns plus the generation prompt."""
    return renderer(tokenizer, kind)(turns, True)
