"""fastpeft.data loading: json / jsonl / parquet / csv files; a malformed row (bad JSON, a missing
field, a wrong type) is an error naming the file, the line or row and the problem;
skip_invalid skips and counts such rows."""

import json
import logging

import pytest
from _tokenizer import example, smollm2_tokenizer
from fastpeft.data import DataError, load_preference_dataset, load_rows, load_sft_dataset

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


BAD_ROWS = [
    ('{"instruction": "Say hi.", "output": "Hi."', r"line 3: bad JSON: Expecting ',' delimiter"),
    (
        '{"instruction": "Say hi.", "input": ""}',
        r"line 3: missing field 'output' \(format alpaca\)",
    ),
    (
        '{"instruction": "Say hi.", "input": "", "output": 7}',
        r"line 3: field 'output' must be a string, got int \(format alpaca\)",
    ),
    (
        '{"instruction": "Say hi.", "output": "Hi.", "history": [["q"]]}',
        r"line 3: history\[0\] must be a pair of strings",
    ),
    ('["a", "list"]', r"line 3: expected a JSON object, got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_malformed_jsonl_row_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(DataError, match=r"train\.jsonl, " + message):
        load_sft_dataset(path, smollm2_tokenizer())


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    lines = [json.dumps(GOOD)] * 4 + [bad for bad, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="fastpeft.data"):
        examples, stats = load_sft_dataset(path, smollm2_tokenizer(), skip_invalid=True)
    assert len(examples) == 4 and stats.rows == 9 and stats.skipped == 5
    assert "line 5: bad JSON" in stats.skipped_messages[0]
    assert "skipped 5 invalid row(s) of 9" in caplog.text


def test_messages_errors_name_the_turn(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: messages\[1\]\.role must be one of"):
        load_sft_dataset(path, smollm2_tokenizer())
    only_user = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "chat2.jsonl", [json.dumps(only_user)])
    with pytest.raises(DataError, match="line 1: 'messages' has no assistant turn"):
        load_sft_dataset(path, smollm2_tokenizer())


def test_rows_must_all_fit_the_detected_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(GOOD), json.dumps({"text": "x"})])
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: missing field 'instruction'"):
        load_rows(path)


def test_preference_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "pref.jsonl", [json.dumps({"prompt": "p", "chosen": "a", "rejected": None})]
    )
    with pytest.raises(DataError, match=r"pref\.jsonl, line 1: missing field 'rejected'"):
        load_preference_dataset(path, smollm2_tokenizer())
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps(GOOD)])
    with pytest.raises(DataError, match="preference data needs format preference or ranked"):
        load_preference_dataset(path, smollm2_tokenizer())


def test_json_list_file(tmp_path):
    rows = read_jsonl(example("alpaca.jsonl"))
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, indent=1))
    examples, stats = load_sft_dataset(str(path), smollm2_tokenizer())
    reference, _ = load_sft_dataset(example("alpaca.jsonl"), smollm2_tokenizer())
    assert examples == reference and stats.format == "alpaca"
    path.write_text(json.dumps(rows[:3] + [{"instruction": "x"}], indent=1))
    with pytest.raises(DataError, match=r"alpaca\.json, item 3: missing field 'output'"):
        load_sft_dataset(str(path), smollm2_tokenizer())
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"alpaca\.json, line 3: bad JSON"):
        load_rows(str(path))


def test_jsonl_under_a_json_name(tmp_path):
    path = tmp_path / "lines.json"
    with open(example("text.jsonl")) as f:
        path.write_text(f.read())
    _, stats = load_rows(str(path))
    assert stats.rows == 30 and stats.format == "text"


def test_parquet_and_csv_via_datasets(tmp_path):
    import pandas as pd

    rows = read_jsonl(example("prompt_completion.jsonl"))
    reference, _ = load_sft_dataset(example("prompt_completion.jsonl"), smollm2_tokenizer())
    pq = tmp_path / "pc.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    examples, stats = load_sft_dataset(str(pq), smollm2_tokenizer())
    assert examples == reference and stats.format == "prompt_completion"
    csv_examples, _ = load_sft_dataset(example("prompt_completion.csv"), smollm2_tokenizer())
    assert csv_examples == reference  # " 109" stays text, not the number 109
    broken = tmp_path / "broken.parquet"
    pd.DataFrame(
        [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    ).to_parquet(broken)
    with pytest.raises(DataError, match=r"broken\.parquet, row 2: missing field 'completion'"):
        load_sft_dataset(str(broken), smollm2_tokenizer())
    _, stats = load_sft_dataset(str(broken), smollm2_tokenizer(), skip_invalid=True)
    assert stats.skipped == 1 and stats.examples == 1


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_rows(str(other))
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no valid rows"):
        load_rows(empty)


def test_dataset_folder_goes_through_datasets_like_a_hub_id(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    with open(example("messages.jsonl")) as f:
        (folder / "train.jsonl").write_text(f.read())
    examples, stats = load_sft_dataset(str(folder), smollm2_tokenizer())
    reference, _ = load_sft_dataset(example("messages.jsonl"), smollm2_tokenizer())
    assert examples == reference and stats.format == "messages"
    with pytest.raises(DataError, match="my_dataset: cannot load: .*split"):
        load_rows(str(folder), split="validation")


def test_a_template_that_rewrites_earlier_turns_is_a_row_error(tmp_path):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer())
    # Marks the last message: a prefix render is then not a prefix of the whole conversation.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", read_jsonl_lines(example("messages.jsonl"))[:2])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: the chat template does not render"):
        load_sft_dataset(path, tok)
    with pytest.raises(DataError, match="no valid rows"):
        load_sft_dataset(path, tok, skip_invalid=True)


def read_jsonl_lines(path):
    with open(path) as f:
        return [line.rstrip("\n") for line in f]
