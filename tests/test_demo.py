"""`fastpeft demo --quick`: the demo's whole path on a tiny random Llama with the SmolLM2
tokenizer (the real demo on SmolLM2 takes minutes and is not in the suite): the table, the
final line, the adapter and loss plot, and the printed peft lines, run as printed."""

import json
import os
import re

import pytest
import torch

import fastpeft
from fastpeft.cli import main
from fastpeft.demo import format_table, load_lines, lora_config


def test_demo_quick(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--steps", "3", "--n-eval", "4",
                 "--shots", "2"]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert re.fullmatch(r"accuracy before: \d+% after: \d+%", lines[-1])
    assert sum(bool(re.match(r"accuracy before", line)) for line in lines) == 1
    for method in ("zero-shot", "few-shot ICL (k=2)", "LoRA SFT"):
        assert any(line.startswith(method) for line in lines), method

    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert [r["method"] for r in results["rows"]] == ["zero-shot", "few-shot ICL (k=2)",
                                                      "LoRA SFT"]
    assert results["rows"][0]["trainable"] == 0 and results["rows"][2]["trainable"] > 0
    assert results["n_eval"] == 4 and results["steps"] == 3
    assert results["rlhf"] is None and not os.path.exists(os.path.join(out, "reward_model"))
    before, after = (round(100 * results["rows"][i]["accuracy"]) for i in (0, 2))
    assert lines[-1] == f"accuracy before: {before}% after: {after}%"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "plots/loss.png", "metrics.jsonl", "data/train.jsonl", "data/heldout.jsonl"):
        assert os.path.isfile(os.path.join(out, name)), name

    def questions(name):
        with open(os.path.join(out, "data", name)) as f:
            return {json.loads(line)["messages"][1]["content"] for line in f}

    train, held = questions("train.jsonl"), questions("heldout.jsonl")
    assert len(held) == 4 and not train & held

    # The three printed lines load the adapter with the installed peft ...
    printed = lines[lines.index("load it with peft:") + 1:][:3]
    assert printed == ["    " + line for line in results["peft_lines"]]
    scope: dict = {}
    exec("\n".join(line.strip() for line in printed), scope)
    import peft

    assert isinstance(scope["model"], peft.PeftModel)
    # ... and give fastpeft's logits for the trained adapter (which changed the base's).
    from fastpeft.models import load_model

    base, tokenizer = load_model(os.path.join(out, "quick_base"))
    ids = tokenizer(["Reverse the digits: 48162"], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(ids).logits
        ours = fastpeft.load_adapter(base, os.path.join(out, "adapter")).eval()(ids).logits
        theirs = scope["model"].eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, base_logits, atol=1e-6)


def test_demo_quick_rlhf(tmp_path, capsys):
    """--rlhf: preferences, a reward model (its directory reloads), PPO from the SFT policy (the
    KL to its reference starts at 0: the reference is the SFT model, not the bare base), the
    extra rows, lines and results."""
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--rlhf", "--out", out, "--steps", "2", "--n-eval", "4",
                 "--shots", "1", "--rm-steps", "2", "--ppo-steps", "2", "--lr", "0.1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"accuracy before: \d+% after: \d+%", lines[-1])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    r = results["rlhf"]
    assert [row["method"] for row in results["rows"]][-2:] == ["reward model (pairwise)",
                                                               "SFT + PPO"]
    for method in ("reward model (pairwise)", "SFT + PPO"):
        assert any(line.startswith(method) for line in lines), method
    assert r["rm_steps"] == 2 and r["ppo_steps"] == 2 and r["n_pref_heldout"] == 4
    for key in ("rm_heldout_accuracy", "sampled_accuracy_before", "sampled_accuracy_after",
                "accuracy_after_ppo"):
        assert 0.0 <= r[key] <= 1.0, key
    # the reference is the policy PPO starts from (KL 0), and that is the SFT model: PPO going
    # on training the SFT adapter (reference = the bare base) gives ~5e-3 here (--lr 0.1).
    # After PPO the policy has moved; its k1 estimate on a few samples can be of either sign.
    assert abs(r["kl_before"]) < 1e-4 < abs(r["kl_after"])
    assert results["rows"][-1]["accuracy"] == r["accuracy_after_ppo"]
    assert results["rows"][-2]["accuracy"] == r["rm_heldout_accuracy"]
    assert f"reward model held-out pairwise accuracy: {100 * r['rm_heldout_accuracy']:.1f}%" \
        in "\n".join(lines)
    assert (f"PPO, held-out prompts sampled at T={r['temperature']}: mean reward before: "
            f"{r['reward_before']:.3f} after: {r['reward_after']:.3f}   KL to the SFT "
            f"reference: {r['kl_after']:.3f} nats/sequence") in lines
    assert any(line.startswith("after PPO (greedy): ") for line in lines)
    for name in ("reward_model/reward_model.json", "reward_model/reward_head.safetensors",
                 "reward_model/adapter/adapter_config.json", "ppo/adapter/adapter_config.json",
                 "ppo/value_head.safetensors", "data/prefs_train.jsonl",
                 "data/prefs_heldout.jsonl", "adapter/adapter_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name

    def prefs(name):
        with open(os.path.join(out, "data", name)) as f:
            return [json.loads(line) for line in f]

    train, held = prefs("prefs_train.jsonl"), prefs("prefs_heldout.jsonl")
    assert len(held) == 4 and not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    assert all(p["chosen"] != p["rejected"] for p in train + held)
    # the saved reward model reloads and scores the held-out pairs as reported
    from fastpeft.train.reward import load_reward_model

    rm = load_reward_model(os.path.join(out, "reward_model"),
                           base_model=os.path.join(out, "quick_base"))
    prompts = [p["prompt"] for p in held]
    chosen = rm(prompts, [p["chosen"] for p in held])
    rejected = rm(prompts, [p["rejected"] for p in held])
    assert sum(c > x for c, x in zip(chosen, rejected)) / 4 == r["rm_heldout_accuracy"]


def test_format_table():
    rows = [dict(method="zero-shot", accuracy=0.0, trainable=0, train_s=0.0, eval_s=3.2),
            dict(method="LoRA SFT", accuracy=0.875, trainable=1234567, train_s=151.0,
                 eval_s=4.0)]
    table = format_table(rows).splitlines()
    assert len(table) == 4 and set(table[1]) <= {"-", "+"}
    assert [c.strip() for c in table[2].split("|")] == ["zero-shot", "0.0%", "0", "-", "3 s"]
    assert [c.strip() for c in table[3].split("|")] == ["LoRA SFT", "87.5%", "1,234,567",
                                                        "151 s", "4 s"]


@pytest.mark.slow
def test_peft_lines_load_a_smollm2_adapter(smollm2, tmp_path):
    """The lines the real demo prints (base "smollm2-135m") load its kind of adapter with the
    installed peft and give fastpeft's logits."""
    base, tokenizer = smollm2
    directory = str(tmp_path / "adapter")
    ids = tokenizer(["Reverse the digits: 48162"], return_tensors="pt").input_ids
    model = fastpeft.patch(base, lora_config(4))
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
            ours = model(ids).logits
            fastpeft.save_adapter(model, directory)
    finally:
        fastpeft.unpatch(model)
    with torch.no_grad():
        plain = base(ids).logits
    scope: dict = {}
    exec("\n".join(load_lines("smollm2-135m", directory)), scope)
    with torch.no_grad():
        theirs = scope["model"].eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (theirs - plain).abs().max() > 1e-2


def test_shared_prefix_cache_gives_the_padded_answers(tmp_path):
    """Few-shot prompts share their system turn and examples: generating from one copied KV
    cache of that prefix gives what plain left-padded generation gives."""
    from fastpeft.data.synthetic import make_splits
    from fastpeft.demo import _common_prefix, _tiny_model, generate_answers, prompts_of

    model, tokenizer = _tiny_model(str(tmp_path))
    model.train()
    train, held = make_splits(3, 5, seed=1)
    prompts = prompts_of(tokenizer, held, train)
    seen = []  # the tokens each forward call runs
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    shared = generate_answers(model, tokenizer, prompts, 6, batch_size=3)
    tokens_shared, seen[:] = sum(seen), []
    padded = generate_answers(model, tokenizer, prompts, 6, batch_size=3, share_prefix=False)
    hook.remove()
    assert shared == padded and len(shared) == 5 and all(shared)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = _common_prefix(rows)
    assert len(rows[0]) - 12 < prefix < len(rows[0])  # system turn + 3 examples
    assert sum(seen) - tokens_shared == 4 * prefix  # the prefix ran once, not 5 times
    assert model.training  # restored (the tiny model is loaded in train mode)
    # prompts of different lengths take the padded path
    mixed = prompts[:2] + prompts_of(tokenizer, make_splits(0, 1, length=7)[1])
    assert generate_answers(model, tokenizer, mixed, 6) == generate_answers(
        model, tokenizer, mixed, 6, share_prefix=False)


def test_docs_cli_md_lists_every_demo_option():
    import argparse

    from fastpeft.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "docs", "cli.md")).read()
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert "--rlhf" in options
    missing = [o for o in options if o != "--help" and o not in text]
    assert not missing, f"docs/cli.md does not list the demo options {missing}"


def test_prompt_learning_answers_with_and_without_the_shared_prefix(tmp_path):
    """Prompt tuning / P-tuning keep their virtual tokens in the KV cache, so they must not
    take the shared-prefix path (generate() would count them as prompt tokens and skip as many
    real ones); every prompt-learning method gives the padded path's answers."""
    import copy

    from fastpeft.data.synthetic import make_splits
    from fastpeft.demo import _tiny_model, generate_answers, prompts_of

    base, tokenizer = _tiny_model(str(tmp_path))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(8)  # a random model whose greedy answers are not all the same token
    prompts = prompts_of(tokenizer, make_splits(0, 4, seed=2)[1])
    plain = generate_answers(base, tokenizer, prompts, 6)
    for config in (fastpeft.PromptTuningConfig(num_virtual_tokens=3),
                   fastpeft.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
                   fastpeft.PrefixTuningConfig(num_virtual_tokens=3)):
        model = fastpeft.patch(copy.deepcopy(base), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        shared = generate_answers(model, tokenizer, prompts, 6)
        padded = generate_answers(model, tokenizer, prompts, 6, share_prefix=False)
        assert shared == padded, config.peft_type
        assert shared != plain, config.peft_type  # the adapter changes the answers


def test_demo_rejects_bad_options(capsys):
    for option, value in (("--steps", "0"), ("--shots", "-1"), ("--digits", "1"),
                          ("--rm-steps", "0"), ("--ppo-steps", "0")):
        with pytest.raises(SystemExit):
            main(["demo", "--quick", option, value])
        assert f"{option}: must be an integer >= " in capsys.readouterr().err
