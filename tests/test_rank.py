"""`fastpeft rank` (fastpeft.rank) driven by piped input: malformed orders are rejected with a
message and asked again; every prompt is saved as soon as it is ranked, so a session ended by
EOF or killed mid-way resumes where it stopped; RANKED.jsonl is the `ranked` format the reward
model reads (ranking: 0-based indices, best first; rows still null are skipped and counted)."""

import json
import os
import subprocess
import sys
import time

import pytest
from _train import config

from fastpeft.data import DataError, load_preference_dataset
from fastpeft.rank import OrderError, parse_order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"), OMP_NUM_THREADS="1")


def sampled(path, k=3, n=3):
    """n rows as `fastpeft sample` writes them, K responses each, not ranked."""
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "responses": [f"answer {i}.{j}" for j in range(k)], "ranking": None,
             "meta": {"seed": 0, "index": i}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def rank_cli(inp, out, stdin: str):
    return subprocess.run([sys.executable, "-m", "fastpeft", "rank", "--input", str(inp),
                           "--output", str(out)], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=60)


@pytest.mark.parametrize("text, message", [
    ("1 2", "missing 3"),
    ("1 2 2", "2 appears twice"),
    ("1 2 4", "4 is out of range"),
    ("0 1 2", "0 is out of range"),
    ("", "empty order"),
    ("   ", "empty order"),
    ("a b c", "'a' is not a response number"),
    ("1 -2 3", "'-2' is not a response number"),
])
def test_bad_orders_say_what_is_wrong(text, message):
    with pytest.raises(OrderError, match=message):
        parse_order(text, 3)


def test_an_order_is_one_based_best_first_and_stored_zero_based():
    assert parse_order("2 1 3", 3) == [1, 0, 2]
    assert parse_order(" 3,1, 2 ", 3) == [2, 0, 1]


def test_bad_orders_are_asked_again_then_an_interrupted_session_resumes(tmp_path):
    inp, out = tmp_path / "sampled.jsonl", tmp_path / "ranked.jsonl"
    rows = sampled(inp)
    # Prompt 1: four bad orders (missing, duplicate, out of range, empty) then a good one;
    # prompt 2 ranked; then the input ends (EOF) while prompt 3 is on screen.
    result = rank_cli(inp, out, "1 2\n2 2 1\n1 2 9\n\n2 1 3\n3 2 1\n")
    assert result.returncode == 0, result.stderr
    for message in ("missing 3", "2 appears twice", "9 is out of range", "empty order"):
        assert message in result.stdout
    assert result.stdout.count("try again") == 4
    assert "Prompt 3 of 3" in result.stdout and "1 to go of 3" in result.stdout
    saved = read(out)
    assert [r["ranking"] for r in saved] == [[1, 0, 2], [2, 1, 0], None]
    assert [(r["prompt"], r["responses"], r["meta"]) for r in saved] == [
        (r["prompt"], r["responses"], r["meta"]) for r in rows]
    # The same command again asks only prompt 3 and keeps the first two rankings.
    result = rank_cli(inp, out, "1 3 2\n")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "Prompt 3 of 3" in result.stdout
    assert "Prompt 1 of 3" not in result.stdout
    assert [r["ranking"] for r in read(out)] == [[1, 0, 2], [2, 1, 0], [0, 2, 1]]
    assert "all prompts done" in result.stdout


def test_a_killed_session_keeps_every_ranked_prompt(tmp_path):
    inp, out = tmp_path / "sampled.jsonl", tmp_path / "ranked.jsonl"
    sampled(inp, k=2, n=3)
    proc = subprocess.Popen([sys.executable, "-m", "fastpeft", "rank", "--input", str(inp),
                             "--output", str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        proc.stdin.write("2 1\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not (out.exists() and read(out)[0]["ranking"] is not None):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL while prompt 2 waits for its order
        proc.wait()
    assert [r["ranking"] for r in read(out)] == [[1, 0], None, None]
    result = rank_cli(inp, out, "s\n1 2\n")  # skip prompt 2, rank prompt 3
    assert result.returncode == 0, result.stderr
    saved = read(out)
    assert [r["ranking"] for r in saved] == [[1, 0], None, [0, 1]]
    assert saved[1]["meta"]["skipped"] is True
    assert "1 skipped, 0 to go" in result.stdout


def test_q_quits_and_a_foreign_output_file_is_refused(tmp_path):
    inp, out = tmp_path / "sampled.jsonl", tmp_path / "ranked.jsonl"
    sampled(inp)
    result = rank_cli(inp, out, "q\n")
    assert result.returncode == 0 and "3 to go of 3" in result.stdout
    assert [r["ranking"] for r in read(out)] == [None, None, None]
    other = tmp_path / "other.jsonl"
    sampled(other, n=2)
    result = rank_cli(other, out, "1 2 3\n")
    assert result.returncode == 2
    assert "holds rankings of other prompts" in result.stderr and "Traceback" not in result.stderr


def test_the_reward_model_trains_on_all_pairs_of_each_ranking(tmp_path, caplog):
    """A ranked file of K=4 (2 ranked rows, 1 null, 1 skipped): 6 pairs per ranked prompt,
    each better response chosen over each worse one; the unranked rows are counted and
    logged; RewardTrainer trains on the 12 pairs."""
    from _pairs import smollm2_sized_llama

    import fastpeft
    from fastpeft.train import RewardConfig, RewardTrainer

    path = tmp_path / "ranked.jsonl"
    rows = sampled(path, k=4, n=4)
    rows[0]["ranking"], rows[2]["ranking"] = [2, 0, 3, 1], [0, 1, 2, 3]
    rows[3]["meta"]["skipped"] = True
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = smollm2_sized_llama()
    with caplog.at_level("WARNING", logger="fastpeft.data"):
        pairs, stats = load_preference_dataset(str(path), tok, max_length=64)
    assert stats.unranked == 2 and stats.rows == 4 and len(pairs) == 12
    assert "skipped 2 of 4 row(s) with ranking null" in caplog.text
    assert [sum(p["group"] == g for p in pairs) for g in sorted({p["group"] for p in pairs})] \
        == [6, 6]
    first = [p for p in pairs if p["group"] == pairs[0]["group"]]
    chosen = {tok.decode([t for t in p["chosen_labels"] if t != -100]) for p in first}
    rejected = {tok.decode([t for t in p["rejected_labels"] if t != -100]) for p in first}
    # ranking [2, 0, 3, 1]: answer 0.2 is never rejected, answer 0.1 never chosen; a string
    # reply to a chat prompt is trained as the assistant turn (its end-of-turn token included)
    assert all(text.rstrip().endswith("<|im_end|>") for text in chosen | rejected)
    assert not any("0.2" in t for t in rejected) and not any("0.1" in t for t in chosen)
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules="all-linear"))
    trainer = RewardTrainer(model, tok,
                            config(tmp_path / "rm", max_steps=2, batch_size=6),
                            RewardConfig(), str(path), max_length=64)
    assert len(trainer.train_dataset) == 12 and trainer.data_stats["train"].unranked == 2
    trainer.train()
    assert trainer.step == 2
    path.write_text("".join(json.dumps(dict(r, ranking=None)) + "\n" for r in rows))
    with pytest.raises(DataError, match="no ranked rows"):
        load_preference_dataset(str(path), tok)
