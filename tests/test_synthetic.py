"""The demo's synthetic task (fastpeft.data.synthetic): seeded, disjoint splits, correct answers,
and the exact-match scorer."""

import pytest

from fastpeft.data import synthetic as S


def test_splits_are_seeded():
    a = S.make_splits(50, 20, seed=3)
    assert a == S.make_splits(50, 20, seed=3)
    assert a != S.make_splits(50, 20, seed=4)
    # the held-out split does not depend on the training split's size
    assert S.make_splits(500, 20, seed=3)[1] == a[1]
    assert S.make_splits(500, 20, seed=3)[0][:50] == a[0]


def test_splits_are_disjoint_and_unique():
    train, held = S.make_splits(900, 100, seed=0, length=3)  # the whole pool of 1000
    questions = [ex.question for ex in train + held]
    assert len(train) == 900 and len(held) == 100
    assert len(set(questions)) == 1000
    assert not {ex.digits for ex in train} & {ex.digits for ex in held}


@pytest.mark.parametrize("length", [2, 4, 5])
def test_answers_are_the_reversed_digits(length):
    train, held = S.make_splits(30, 10, seed=1, length=length)
    for ex in train + held:
        assert len(ex.digits) == length and ex.digits.isdigit()
        assert ex.answer == "".join(reversed(ex.digits))
        assert ex.question == S.INSTRUCTION.format(digits=ex.digits)
        assert ex.digits in ex.question
    assert any(ex.digits[0] == "0" for ex in S.make_splits(200, 0, seed=0)[0])  # leading zeros


def test_reverse_example_and_rows():
    ex = S.reverse_example("48162")
    assert ex.answer == "26184"
    assert S.to_rows([ex]) == [{"messages": [
        {"role": "system", "content": S.SYSTEM},
        {"role": "user", "content": "Reverse the digits: 48162"},
        {"role": "assistant", "content": "26184"}]}]
    assert ex.messages(with_answer=False, system=False) == [
        {"role": "user", "content": "Reverse the digits: 48162"}]


def test_rows_load_as_sft_data(tmp_path):
    import json

    from _tokenizer import smollm2_tokenizer, trained_text

    from fastpeft.data import load_sft_dataset

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in S.to_rows(S.make_splits(3, 0)[0])))
    tok = smollm2_tokenizer()
    examples, stats = load_sft_dataset(str(path), tok)
    assert stats.format == "messages" and len(examples) == 3
    answer = S.make_splits(3, 0)[0][0].answer
    assert trained_text(tok, examples[0]).startswith(answer + "<|im_end|>")


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_train=5, n_eval=6, length=1), "length must be >= 2"),
    (dict(n_train=-1, n_eval=6), "n_train and n_eval must be >= 0"),
    (dict(n_train=95, n_eval=6, length=2), "exceeds the 100 distinct"),
])
def test_make_splits_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.make_splits(**kwargs)


def test_reverse_example_rejects_non_digits():
    with pytest.raises(ValueError, match="digits must be"):
        S.reverse_example("12a")


@pytest.mark.parametrize("prediction, ok", [
    ("26184", True), (" 26184\n", True), ("26184.", True), ("26184\nbecause ...", True),
    ("\n\n26184", True), ("2618", False), ("261840", False), ("26184..", False),
    ("The answer is 26184", False), ("2 6 1 8 4", False), ("", False), ("48162", False),
])
def test_exact_match(prediction, ok):
    assert S.exact_match(prediction, "26184") is ok


def test_accuracy():
    assert S.accuracy(["1", "2", "x", "4."], ["1", "2", "3", "4"]) == 0.75
    with pytest.raises(ValueError, match="same length, got 1 and 2"):
        S.accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="no examples"):
        S.accuracy([], [])


# ---- preference pairs (fastpeft demo --rlhf) -----------------------------------------------

def _is_near_miss(kind: str, ex, wrong: str) -> bool:
    a = ex.answer
    if kind == "unreversed":
        return wrong == ex.digits
    if kind == "changed":
        return len(wrong) == len(a) and sum(x != y for x, y in zip(wrong, a)) == 1
    if kind == "swapped":
        return any(wrong == a[:i] + a[i + 1] + a[i] + a[i + 2:] for i in range(len(a) - 1))
    if kind == "dropped":
        return any(wrong == a[:i] + a[i + 1:] for i in range(len(a)))
    if kind == "added":
        return len(wrong) == len(a) + 1 and any(wrong[:i] + wrong[i + 1:] == a
                                                for i in range(len(wrong)))
    raise AssertionError(kind)


def test_preference_rows_are_seeded_near_misses():
    train, held = S.make_splits(300, 50, seed=2)
    rows = S.preference_rows(train, seed=5)
    assert rows == S.preference_rows(train, seed=5)
    assert rows != S.preference_rows(train, seed=6)
    assert len(rows) == len(train)
    for row, ex in zip(rows, train):
        assert row["prompt"] == ex.question and row["chosen"] == ex.answer
        assert row["rejected"] != row["chosen"] and row["rejected"].isdigit()
        assert _is_near_miss(row["kind"], ex, row["rejected"]), row
    assert {r["kind"] for r in rows} == set(S.NEAR_MISSES)  # every kind occurs
    # held-out pairs come from the held-out questions: no prompt shared with training
    held_rows = S.preference_rows(held, seed=6)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in held_rows}


def test_preference_rows_never_reject_the_answer():
    """Palindromes (unreversed == answer) and repeated digits (nothing to swap) fall back to
    another kind."""
    examples = [S.reverse_example(d) for d in ("12321", "11111", "00", "90")]
    for seed in range(20):
        for row, ex in zip(S.preference_rows(examples, seed=seed), examples):
            assert row["rejected"] != ex.answer and _is_near_miss(row["kind"], ex,
                                                                   row["rejected"])
    with pytest.raises(ValueError, match="reversed is itself"):
        S.near_miss(S.reverse_example("12321"), "unreversed", __import__("random").Random(0))
    with pytest.raises(ValueError, match="kind must be one of"):
        S.near_miss(examples[0], "shuffled", __import__("random").Random(0))
    with pytest.raises(ValueError, match="prompts must have one text per example, got 1"):
        S.preference_rows(examples, prompts=["x"])


def test_preference_rows_load_as_preference_data(tmp_path):
    """With the chat-rendered prompts the demo passes, the pairs load as the preference format
    and their prompt text is the one load_prompt_dataset gives PPO for the same question (so
    the reward model scores PPO's completions as it was trained)."""
    import json

    from _tokenizer import smollm2_tokenizer

    from fastpeft.data import load_preference_dataset, load_prompt_dataset
    from fastpeft.demo import prompts_of

    tok = smollm2_tokenizer()
    train = S.make_splits(4, 0, seed=1)[0]
    rows = S.preference_rows(train, seed=0, prompts=prompts_of(tok, train))
    prefs, sft = tmp_path / "prefs.jsonl", tmp_path / "train.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft.write_text("".join(json.dumps(r) + "\n" for r in S.to_rows(train)))
    pairs, stats = load_preference_dataset(str(prefs), tok)
    assert stats.format == "preference" and len(pairs) == 4
    prompts, _ = load_prompt_dataset(str(sft), tok)
    for pair, prompt, row in zip(pairs, prompts, rows):
        assert prompt["prompt"] == row["prompt"]
        n = len(prompt["input_ids"])
        assert pair["chosen_input_ids"][:n] == prompt["input_ids"]
        assert tok.decode(pair["chosen_input_ids"][n:]) == row["chosen"] + tok.eos_token
        assert tok.decode(pair["rejected_input_ids"][n:]) == row["rejected"] + tok.eos_token
