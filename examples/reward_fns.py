"""Rule-based reward functions for `fastpeft ppo` (ppo.reward_fn: "examples/reward_fns.py:NAME").

A reward function takes the batch's prompts and generated completions (decoded text, in the
same order) and returns one float per completion. These need no model, so PPO can run on the
CPU in minutes and its reward curve is easy to read.
"""

from __future__ import annotations

POLITE = ("please", "thank", "glad", "happy to", "you're welcome", "of course", "sure",
          "certainly", "i hope", "kind")
TARGET_WORDS = 12


def polite_and_concise(prompts: list[str], completions: list[str]) -> list[float]:
    """politeness + concision, in [-2, 2] per completion.

    politeness: +1 when the completion contains one of POLITE (case-insensitive), else 0.
    concision: 1 - |words - TARGET_WORDS| / TARGET_WORDS, clipped to [-1, 1]: 12 words score
        1, an empty answer or one of 24 words 0, one of 36 words or more -1.
    """
    scores = []
    for text in completions:
        lower = text.lower()
        polite = 1.0 if any(word in lower for word in POLITE) else 0.0
        words = len(text.split())
        concise = max(-1.0, min(1.0, 1.0 - abs(words - TARGET_WORDS) / TARGET_WORDS))
        scores.append(polite + concise)
    return scores


def short(prompts: list[str], completions: list[str]) -> list[float]:
    """Minus the number of words over 8 (0 for answers of 8 words or fewer): the simplest
    reward that PPO visibly climbs."""
    return [-max(0.0, len(text.split()) - 8.0) for text in completions]
