"""`fastpeft sample` (fastpeft.sample): K responses per prompt in rows of the `ranked` format
(ranking null); the same seed gives the same file, whatever the batch size; a loaded adapter
changes the responses; K < 2 is refused before anything loads; prompts are tokenized as
load_prompt_dataset does (the chat template as in training). SmolLM2 tests are slow."""

import json
import os

import pytest
import torch
from _pairs import smollm2_sized_llama
from _tokenizer import example, smollm2_tokenizer

import fastpeft
from fastpeft import cli
from fastpeft.data import load_prompt_dataset
from fastpeft.sample import load_prompts, response_seed, write_samples


def head(tmp_path, name, n):
    path = tmp_path / f"head_{name}"
    with open(example(name)) as f:
        path.write_text("".join(f.readlines()[:n]))
    return str(path)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


SETTINGS = dict(num_responses=3, temperature=1.0, top_p=0.95, max_new_tokens=8, progress=False)


@pytest.mark.slow
def test_smollm2_k3_shape_and_the_same_seed_gives_the_same_file(smollm2, tmp_path):
    model, tok = smollm2
    prompts = head(tmp_path, "prompts.jsonl", 4)
    a, b, c = (str(tmp_path / f"{x}.jsonl") for x in "abc")
    write_samples(model, tok, prompts, a, seed=0, batch_size=4, **SETTINGS)
    write_samples(model, tok, prompts, b, seed=0, batch_size=4, **SETTINGS)
    write_samples(model, tok, prompts, c, seed=0, batch_size=3, **SETTINGS)
    rows = read(a)
    assert len(rows) == 4
    with open(prompts) as f:
        assert [r["prompt"] for r in rows] == [json.loads(line)["prompt"] for line in f]
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "responses", "ranking", "meta"} and row["ranking"] is None
        assert len(row["responses"]) == 3 and all(isinstance(t, str) and t
                                                  for t in row["responses"])
        assert len(set(row["responses"])) > 1  # sampled, not greedy
        assert row["meta"] == {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8,
                               "seed": 0, "index": i, "finished": row["meta"]["finished"]}
    with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
        text = fa.read()
        assert fb.read() == text
        assert fc.read() == text  # a row's responses do not depend on its batch


@pytest.mark.slow
def test_smollm2_another_seed_or_an_adapter_changes_the_responses(smollm2, tmp_path):
    model, tok = smollm2
    prompts = head(tmp_path, "prompts.jsonl", 4)
    base, seed1, adapted = (str(tmp_path / f"{x}.jsonl") for x in ("base", "seed1", "lora"))
    write_samples(model, tok, prompts, base, seed=0, batch_size=4, **SETTINGS)
    write_samples(model, tok, prompts, seed1, seed=1, batch_size=4, **SETTINGS)
    torch.manual_seed(0)
    fastpeft.patch(model, fastpeft.LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,
                                              target_modules=["q_proj", "v_proj"]))
    try:
        write_samples(model, tok, prompts, adapted, seed=0, batch_size=4, **SETTINGS)
    finally:
        fastpeft.unpatch(model)
    responses = {name: [r["responses"] for r in read(name)] for name in (base, seed1, adapted)}
    for other in (seed1, adapted):
        differ = sum(x != y for a, b in zip(responses[base], responses[other])
                     for x, y in zip(a, b))
        assert differ >= 6, (other, differ)  # of 12


def test_k_below_2_is_refused_naming_the_option(tmp_path, capsys):
    code = cli.main(["sample", "--model", "smollm2-135m", "--prompts", example("prompts.jsonl"),
                     "--num-responses", "1", "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "--num-responses must be at least 2" in err and "got 1" in err
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists()


def test_prompts_are_tokenized_as_for_training_and_stored_readably():
    tok = smollm2_tokenizer()
    for name, first in (("alpaca.jsonl", [{"role": "user", "content": "Add the two numbers."
                                                                       "\n\n25 and 49"}]),
                        ("prompts.jsonl", [{"role": "user",
                                            "content": "What is the capital of France?"}]),
                        ("prompt_completion.jsonl", "Q: What is 71 plus 38?\nA:")):
        examples, prompts = load_prompts(example(name), tok)
        expected, _ = load_prompt_dataset(example(name), tok)
        assert [e["input_ids"] for e in examples] == [e["input_ids"] for e in expected]
        assert prompts[0] == first


def test_the_command_with_an_adapter_on_a_tiny_model(tmp_path, capsys):
    """--adapter DIR (or the run's output_dir) is loaded onto --model; the rows name both."""
    model, tok = smollm2_sized_llama()
    directory = str(tmp_path / "tiny")
    model.config._name_or_path = directory
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    torch.manual_seed(1)
    fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=32, init_lora_weights=False,
                                              target_modules="all-linear"))
    fastpeft.save_adapter(model, str(tmp_path / "run" / "adapter"))
    out = {}
    for name, extra in (("base", []), ("lora", ["--adapter", str(tmp_path / "run")])):
        out[name] = str(tmp_path / f"{name}.jsonl")
        code = cli.main(["sample", "--model", directory, "--prompts", example("prompts.jsonl"),
                         "-k", "2", "--output", out[name], "--max-new-tokens", "6",
                         "--batch-size", "5", "--seed", "3", "--no-progress", *extra])
        assert code == 0
    assert "prompts/s" in capsys.readouterr().out
    base, lora = read(out["base"]), read(out["lora"])
    assert len(base) == len(lora) == 24 and all(len(r["responses"]) == 2 for r in lora)
    assert lora[0]["meta"]["adapter"] == os.path.join(str(tmp_path / "run"), "adapter")
    assert base[0]["meta"]["adapter"] is None and base[0]["meta"]["model"] == directory
    assert [r["responses"] for r in base] != [r["responses"] for r in lora]


def test_response_seeds_depend_on_seed_prompt_and_response():
    seeds = {response_seed(s, i, j) for s in range(3) for i in range(5) for j in range(4)}
    assert len(seeds) == 60 and response_seed(0, 1, 2) == response_seed(0, 1, 2)
