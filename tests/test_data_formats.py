"""fastpeft.data: format detection, templates and loss masking for every format, with the real
SmolLM2 tokenizer (chat template) and a copy of it without a chat template; truncation,
ranked-pair expansion, prompts for PPO, collation."""

import json

import pytest
import torch
from _tokenizer import example, plain_tokenizer, prompt_text, smollm2_tokenizer, trained_text
from fastpeft.data import (
    FORMATS,
    Collator,
    DataError,
    detect_format,
    load_preference_dataset,
    load_prompt_dataset,
    load_rows,
    load_sft_dataset,
    pad_id_of,
)
from fastpeft.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT

TOKENIZERS = {"chat": smollm2_tokenizer, "plain": plain_tokenizer}
EOS = "<|im_end|>"


def rows_of(name):
    with open(example(name)) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("alpaca.jsonl", "alpaca"),
        ("messages.jsonl", "messages"),
        ("text.jsonl", "text"),
        ("prompt_completion.jsonl", "prompt_completion"),
        ("prompt_completion.csv", "prompt_completion"),
        ("preference.jsonl", "preference"),
        ("ranked.jsonl", "ranked"),
    ],
)
def test_detects_every_example_format(name, fmt):
    mode = "preference" if fmt in ("preference", "ranked") else "sft"
    rows, stats = load_rows(example(name), mode=mode)
    assert stats.format == fmt and stats.rows == len(rows) >= 24 and stats.skipped == 0


def test_detect_format_names_the_expected_fields():
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    with pytest.raises(ValueError, match="cannot tell the format.*'foo'.*alpaca"):
        detect_format({"foo": 1})
    assert set(FORMATS) == {
        "alpaca",
        "messages",
        "prompt_completion",
        "text",
        "preference",
        "ranked",
    }


def test_forced_format_overrides_detection(tmp_path):
    # A row with both 'text' and 'prompt'/'completion': detected as prompt_completion, or forced.
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"prompt": "P:", "completion": " C", "text": "all of it"}) + "\n")
    tok = smollm2_tokenizer()
    (ex,), stats = load_sft_dataset(str(path), tok)
    assert stats.format == "prompt_completion" and trained_text(tok, ex) == " C" + EOS
    (ex,), stats = load_sft_dataset(str(path), tok, format="text")
    assert stats.format == "text" and trained_text(tok, ex) == "all of it" + EOS
    with pytest.raises(ValueError, match="format must be one of"):
        load_sft_dataset(str(path), tok, format="sharegpt")


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_alpaca_masks_all_but_the_output(kind):
    tok = TOKENIZERS[kind]()
    rows = rows_of("alpaca.jsonl")
    examples, _ = load_sft_dataset(example("alpaca.jsonl"), tok)
    for row, ex in zip(rows, examples):
        assert trained_text(tok, ex) == row["output"] + EOS + ("\n" if kind == "chat" else "")
        prompt = prompt_text(tok, ex)
        assert row["instruction"] in prompt and row["input"] in prompt
        assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
        for q, a in row.get("history", []):
            assert q in prompt and a in prompt
        if row.get("system"):
            assert prompt.count(row["system"]) == 1
    if kind == "plain":  # the Alpaca template itself
        first, with_history = examples[0], examples[4]
        assert prompt_text(tok, first) == (
            ALPACA_PREAMBLE_INPUT + "### Instruction:\n"
            "Add the two numbers.\n\n### Input:\n"
            f"{rows[0]['input']}\n\n### Response:\n"
        )
        q, a = rows[4]["history"][0]
        assert prompt_text(tok, with_history) == (
            ALPACA_PREAMBLE + f"### Instruction:\n{q}\n\n### Response:\n{a}{EOS}\n\n"
            f"### Instruction:\n{rows[4]['instruction']}\n\n### Response:\n"
        )
    else:  # the chat template, with the input after the instruction
        assert prompt_text(tok, examples[0]).endswith(
            f"Add the two numbers.\n\n{rows[0]['input']}{EOS}\n<|im_start|>assistant\n"
        )


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_messages_train_on_assistant_turns_only(kind):
    tok = TOKENIZERS[kind]()
    examples, _ = load_sft_dataset(example("messages.jsonl"), tok)
    sep = "\n" if kind == "chat" else ""
    for row, ex in zip(rows_of("messages.jsonl"), examples):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained_text(tok, ex) == "".join(a + EOS + sep for a in answers)
        whole = tok.decode(ex["input_ids"])
        for m in row["messages"]:
            assert m["content"] in whole
    if kind == "chat":  # the ids are the chat template's own rendering, tokenized
        msgs = rows_of("messages.jsonl")[2]["messages"]
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert tok.decode(examples[2]["input_ids"]) == text


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("name", ["prompt_completion.jsonl", "prompt_completion.csv"])
def test_prompt_completion_is_raw_text(kind, name):
    tok = TOKENIZERS[kind]()
    examples, _ = load_sft_dataset(example(name), tok)
    for row, ex in zip(rows_of("prompt_completion.jsonl"), examples):
        assert prompt_text(tok, ex) == row["prompt"]
        assert trained_text(tok, ex) == row["completion"] + EOS


def test_prompt_completion_as_messages_uses_the_chat_template(tmp_path):
    path = tmp_path / "conv.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "completion": [{"role": "assistant", "content": "Hi!"}],
    }
    path.write_text(json.dumps(row) + "\n")
    tok = smollm2_tokenizer()
    (ex,), _ = load_sft_dataset(str(path), tok)
    assert trained_text(tok, ex) == "Hi!" + EOS + "\n"
    assert prompt_text(tok, ex).endswith(
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_text_trains_every_token(kind):
    tok = TOKENIZERS[kind]()
    examples, stats = load_sft_dataset(example("text.jsonl"), tok)
    for row, ex in zip(rows_of("text.jsonl"), examples):
        assert ex["labels"] == ex["input_ids"]
        assert tok.decode(ex["input_ids"]) == row["text"] + EOS
    assert stats.examples == 30


def test_max_length_truncates_from_the_right():
    tok = smollm2_tokenizer()
    full, _ = load_sft_dataset(example("messages.jsonl"), tok)
    cut, stats = load_sft_dataset(example("messages.jsonl"), tok, max_length=40)
    kept = [f for f in full if any(t != -100 for t in f["labels"][:40])]
    assert stats.dropped_empty == len(full) - len(kept) and len(cut) == len(kept)
    for f, c in zip(kept, cut):
        assert len(c["input_ids"]) == min(40, len(f["input_ids"]))
        assert c["input_ids"] == f["input_ids"][:40] and c["labels"] == f["labels"][:40]


def test_max_length_drops_examples_with_nothing_left_to_train(tmp_path):
    path = tmp_path / "long_prompt.jsonl"
    path.write_text(
        json.dumps({"prompt": "word " * 50, "completion": " end"})
        + "\n"
        + json.dumps({"prompt": "short", "completion": " end"})
        + "\n"
    )
    examples, stats = load_sft_dataset(str(path), smollm2_tokenizer(), max_length=16)
    assert len(examples) == 1 and stats.dropped_empty == 1


def test_preference_pairs_mask_the_prompt():
    for make_tokenizer in TOKENIZERS.values():
        tok = make_tokenizer()
        examples, stats = load_preference_dataset(example("preference.jsonl"), tok)
        assert stats.format == "preference" and len(examples) == 30
        for row, ex in zip(rows_of("preference.jsonl"), examples):
            for side in ("chosen", "rejected"):
                assert prompt_text(tok, ex, side + "_") == row["prompt"]
                assert trained_text(tok, ex, side + "_") == row[side] + EOS


def test_conversational_preference_uses_the_chat_template(tmp_path):
    path = tmp_path / "pref.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    path.write_text(json.dumps(row) + "\n")
    tok = smollm2_tokenizer()
    (ex,), _ = load_preference_dataset(str(path), tok)
    assert trained_text(tok, ex, "chosen_") == "4" + EOS + "\n"
    assert trained_text(tok, ex, "rejected_") == "5" + EOS + "\n"
    assert prompt_text(tok, ex, "chosen_") == prompt_text(tok, ex, "rejected_")


def test_ranked_rows_expand_to_all_ordered_pairs():
    tok = smollm2_tokenizer()
    rows = rows_of("ranked.jsonl")
    examples, stats = load_preference_dataset(example("ranked.jsonl"), tok)
    k = [len(r["responses"]) for r in rows]
    assert len(examples) == sum(n * (n - 1) // 2 for n in k) and stats.format == "ranked"
    for g, row in enumerate(rows):
        pairs = [
            (trained_text(tok, e, "chosen_"), trained_text(tok, e, "rejected_"))
            for e in examples
            if e["group"] == g
        ]
        order = [row["responses"][i] + EOS for i in row["ranking"]]
        expected = [
            (order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))
        ]
        assert pairs == expected


def test_ranked_rejects_a_ranking_that_is_not_a_permutation(tmp_path):
    path = tmp_path / "bad_rank.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"bad_rank.jsonl, line 1: 'ranking' must be a permutation of 0..2"
    ):
        load_preference_dataset(str(path), smollm2_tokenizer())


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_prompt_datasets_end_where_generation_starts(kind):
    tok = TOKENIZERS[kind]()
    prompts, _ = load_prompt_dataset(example("messages.jsonl"), tok)
    sft, _ = load_sft_dataset(example("messages.jsonl"), tok)
    # The prompt of a one-answer conversation is exactly the SFT example's masked prefix.
    assert prompts[0]["input_ids"] == sft[0]["input_ids"][: len(prompts[0]["input_ids"])]
    assert tok.decode(prompts[0]["input_ids"]) == prompt_text(tok, sft[0])
    pref, _ = load_prompt_dataset(example("preference.jsonl"), tok)
    assert tok.decode(pref[0]["input_ids"]) == rows_of("preference.jsonl")[0]["prompt"]
    alp, _ = load_prompt_dataset(example("alpaca.jsonl"), tok, max_length=8)
    full, _ = load_prompt_dataset(example("alpaca.jsonl"), tok)
    assert alp[0]["input_ids"] == full[0]["input_ids"][-8:]  # cut from the left


def test_collator_pads_right_for_training_and_left_for_prompts():
    tok = smollm2_tokenizer()
    examples, _ = load_sft_dataset(example("alpaca.jsonl"), tok)
    batch = Collator(pad_token_id=pad_id_of(tok))(examples[:3])
    lengths = [len(e["input_ids"]) for e in examples[:3]]
    t = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, t)
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == examples[i]["input_ids"]
        assert (batch["input_ids"][i, n:] == pad_id_of(tok)).all()
        assert (batch["labels"][i, n:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
    prompts, _ = load_prompt_dataset(example("alpaca.jsonl"), tok)
    left = Collator(pad_token_id=pad_id_of(tok), padding_side="left", pad_to_multiple_of=8)(
        prompts[:3]
    )
    t = left["input_ids"].shape[1]
    assert t % 8 == 0
    for i, p in enumerate(prompts[:3]):
        n = len(p["input_ids"])
        assert left["input_ids"][i, t - n :].tolist() == p["input_ids"]
        assert left["attention_mask"][i].tolist() == [0] * (t - n) + [1] * n
    assert left["prompt"] == [p["prompt"] for p in prompts[:3]]


def test_collator_pads_preference_pairs():
    tok = smollm2_tokenizer()
    examples, _ = load_preference_dataset(example("ranked.jsonl"), tok)
    batch = Collator(pad_token_id=pad_id_of(tok))(examples[:4])
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].dtype == torch.long
        assert batch[f"{side}_labels"].shape == batch[f"{side}_attention_mask"].shape
    assert batch["group"] == [e["group"] for e in examples[:4]]
