"""A seeded synthetic instruction task whose answers can be checked exactly: the demo's task
(`fastpeft demo`) and the methods benchmark's.

"Reverse the digits: 48162" -> "26184". SmolLM2's tokenizer gives every digit
its own token, so the answer is a short sequence of single-token copies (5 digits + end of
turn): cheap to train on and to generate, and learnable by LoRA in a few hundred steps on a
CPU, while SmolLM2-135M-Instruct gets it almost always wrong zero-shot and with few-shot
examples in the prompt (it explains, or rewrites the number instead of reversing it).

The train and held-out splits are drawn without replacement from the same pool of digit
strings, so they never share a question; the same seed gives the same splits, and the same
held-out split whatever the size of the training split.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INSTRUCTION = "Reverse the digits: {digits}"
# A short system turn: without one, the chat template inserts its default system prompt
# (17 more tokens in every sequence to train on and to prefill).
SYSTEM = "Answer with the digits only."


@dataclass(frozen=True)
class TaskExample:
    """One question: the digit string, the user turn asking for it and the exact answer."""

    digits: str
    question: str
    answer: str

    def messages(self, with_answer: bool = True, system: bool = True) -> list[dict]:
        """The example in the `messages` format of fastpeft.data (system, user, assistant)."""
        turns = [{"role": "system", "content": SYSTEM}] if system else []
        turns.append({"role": "user", "content": self.question})
        if with_answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns


def reverse_example(digits: str) -> TaskExample:
    if not digits or not digits.isdigit():
        raise ValueError(f"digits must be a non-empty string of 0-9, got {digits!r}")
    return TaskExample(digits, INSTRUCTION.format(digits=digits), digits[::-1])


def make_splits(n_train: int, n_eval: int, seed: int = 0,
                length: int = 5) -> tuple[list[TaskExample], list[TaskExample]]:
    """(train, held_out) examples of the digit-reversal task: n_train + n_eval distinct digit
    strings of `length` digits (leading zeros allowed), drawn one by one with
    random.Random(seed), repeats skipped. The first n_eval draws are held out, so the held-out
    split depends on (seed, n_eval, length) only, not on how much training data is asked for."""
    if length < 2:
        raise ValueError(f"length must be >= 2 (a reversal must change something), got {length}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    pool = 10**length
    if n_train + n_eval > pool:
        raise ValueError(f"n_train + n_eval = {n_train + n_eval} exceeds the {pool} distinct "
                         f"digit strings of length {length}")
    rng = random.Random(seed)
    seen: set[int] = set()
    numbers: list[int] = []
    while len(numbers) < n_train + n_eval:
        x = rng.randrange(pool)
        if x not in seen:
            seen.add(x)
            numbers.append(x)
    examples = [reverse_example(f"{x:0{length}d}") for x in numbers]
    return examples[n_eval:], examples[:n_eval]


def to_rows(examples: list[TaskExample]) -> list[dict]:
    """Rows in the `messages` format (load_sft_dataset / SFTTrainer read them as jsonl)."""
    return [{"messages": ex.messages()} for ex in examples]


NEAR_MISSES = ("unreversed", "changed", "swapped", "dropped", "added")


def near_miss(example: TaskExample, kind: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: the digits not reversed, one digit of the
    reversal changed, two adjacent different digits swapped, one dropped or one added. Never
    the exact answer (a kind that cannot differ for this question, such as "unreversed" for a
    palindrome, raises ValueError; preference_rows then picks another)."""
    answer = example.answer
    if kind == "unreversed":
        wrong = example.digits
    elif kind == "changed":
        i = rng.randrange(len(answer))
        wrong = answer[:i] + rng.choice([d for d in "0123456789" if d != answer[i]]) + answer[i + 1:]
    elif kind == "swapped":
        spots = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if not spots:
            raise ValueError(f"swapped: {answer!r} has no two adjacent different digits")
        i = rng.choice(spots)
        wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    elif kind == "dropped":
        i = rng.randrange(len(answer))
        wrong = answer[:i] + answer[i + 1:]
    elif kind == "added":
        i = rng.randrange(len(answer) + 1)
        wrong = answer[:i] + rng.choice("0123456789") + answer[i:]
    else:
        raise ValueError(f"kind must be one of {NEAR_MISSES}, got {kind!r}")
    if wrong == answer:
        raise ValueError(f"{kind}: {example.digits!r} reversed is itself")
    return wrong


def preference_rows(examples: list[TaskExample], seed: int = 0,
                    prompts: list[str] | None = None) -> list[dict]:
    """Preference pairs of the task, one per question, in fastpeft.data's preference format
    (prompt, chosen, rejected; load_preference_dataset reads them as jsonl): chosen = the exact
    reversal, rejected = a near miss (NEAR_MISSES, drawn with random.Random(seed)); "kind"
    records which.

    prompts: the prompt text of each question (default: the question itself). A reward model
    for PPO should be trained on the prompt text PPO passes it (the chat template rendered up
    to the assistant turn) so scoring tokenizes as training did."""
    if prompts is not None and len(prompts) != len(examples):
        raise ValueError(f"prompts must have one text per example, got {len(prompts)} for "
                         f"{len(examples)} examples")
    rng = random.Random(seed)
    rows = []
    for i, ex in enumerate(examples):
        kinds = list(NEAR_MISSES)
        rng.shuffle(kinds)
        for kind in kinds:  # the first kind that can differ for this question
            try:
                rejected = near_miss(ex, kind, rng)
                break
            except ValueError:
                continue
        rows.append({"prompt": ex.question if prompts is None else prompts[i],
                     "chosen": ex.answer, "rejected": rejected, "kind": kind})
    return rows


def normalize_answer(text: str) -> str:
    """What is compared: the first non-empty line, without surrounding whitespace and one
    trailing period ("26184." counts as "26184"; "The answer is 26184" does not)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return re.sub(r"\.$", "", first).strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy(predictions: list[str], answers: list[str]) -> float:
    """The fraction of exact matches, in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"predictions and answers must have the same length, got "
                         f"{len(predictions)} and {len(answers)}")
    if not answers:
        raise ValueError("accuracy of no examples")
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)


__all__ = ["INSTRUCTION", "NEAR_MISSES", "SYSTEM", "TaskExample", "accuracy", "exact_match",
           "make_splits", "near_miss", "normalize_answer", "preference_rows", "reverse_example",
           "to_rows"]
