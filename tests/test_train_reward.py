"""RewardTrainer and load_reward_model (fastpeft.train.reward) on tiny random Llamas and
synthetic preferences (tests/_pairs.py): held-out pairwise accuracy >= 0.9, one forward for
both sides, margins and centering as pairwise_reward_loss defines them, grad accumulation,
exact resume with the head, the saved reward model reloading with the same scores (LoRA and
full fine-tuning), errors for bad input; one short run on SmolLM2 (slow)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _pairs import lora, preference_pairs, smollm2_sized_llama
from _tokenizer import example
from _train import config, max_diff

import fastpeft
from fastpeft.data import DataError
from fastpeft.train import RewardConfig, RewardTrainer, load_reward_model, read_metrics
from fastpeft.train.modeling import ScalarHead, sequence_scores


def trainable(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.trainable_parameters()}


def test_reward_model_reaches_090_accuracy_on_held_out_pairs(tmp_path):
    trainer = RewardTrainer(lora(), None, config(tmp_path, max_steps=30, batch_size=8, lr=1e-2,
                                                   eval_every=30),
                            RewardConfig(), preference_pairs(64, seed=0),
                            eval_dataset=preference_pairs(64, seed=1))
    head_before = trainer.head.linear.weight.detach().clone()
    before = trainer.evaluate()
    last = trainer.train()
    assert before["eval_accuracy"] < 0.7
    assert last["eval_accuracy"] >= 0.9, last
    assert last["eval_loss"] < 0.5 * before["eval_loss"]
    assert last["eval_rewards/margin"] > 1.0
    assert not torch.equal(trainer.head.linear.weight.detach(), head_before)  # trained too
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin",
                "eval_loss", "eval_accuracy", "eval_rewards/chosen", "eval_rewards/rejected",
                "eval_rewards/margin"):
        assert key in records[-1], key
    info = json.loads((tmp_path / "reward_model.json").read_text())
    assert info["method"] == "lora" and info["adapter"] == "adapter" and info["model"] is None
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / info["head"]).is_file()


def test_one_forward_serves_chosen_and_rejected(tmp_path):
    model = lora()
    rows = []
    model.model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0] if a else None))
    trainer = RewardTrainer(model, None, config(tmp_path, max_steps=2, batch_size=4, grad_accum=2),
                            RewardConfig(), preference_pairs(16))
    trainer.train()
    assert len(rows) == 4  # one per micro-batch


def test_margin_and_centering_follow_the_formula(tmp_path):
    pairs = preference_pairs(4, seed=3)
    pairs[0]["margin"], pairs[2]["margin"] = 1.5, -0.25  # per pair; the others get rm.margin
    trainer = RewardTrainer(lora(init="gaussian"), None, config(tmp_path), RewardConfig(
        margin=0.5, center_rewards_coefficient=0.1), pairs)
    batch = trainer.collate(pairs)
    assert batch["margin"] == [1.5, None, -0.25, None]
    loss, metrics = trainer.pair_outputs(batch)
    with torch.no_grad():
        c, r = trainer.scores(batch)
    m = torch.tensor([1.5, 0.5, -0.25, 0.5])
    expected = -F.logsigmoid(c - r - m).mean() + 0.1 * ((c + r) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert metrics["accuracy"].tolist() == (c > r).float().tolist()
    torch.testing.assert_close(metrics["rewards/margin"], c - r)


def test_grad_accum_2x1_equals_1x2(tmp_path):
    pairs = preference_pairs(8, seed=4)
    for i in range(0, 8, 3):
        pairs[i]["margin"] = 0.3 * i
    runs = []
    for name, bs, ga in (("a", 1, 2), ("b", 2, 1)):
        t = RewardTrainer(lora(init="gaussian"), None,
                          config(tmp_path / name, max_steps=4, batch_size=bs, grad_accum=ga,
                                 warmup_steps=1),
                          RewardConfig(center_rewards_coefficient=0.05), pairs)
        t.train()
        runs.append(t)
    a, b = runs
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history],
                                                           abs=1e-6)
    assert max_diff(trainable(a), trainable(b)) < 1e-6


def test_resume_reproduces_the_uninterrupted_run_head_included(tmp_path):
    kw = dict(max_steps=6, save_every=3, keep_last=None, batch_size=4, grad_accum=2,
              warmup_steps=2, weight_decay=0.1)
    rm = RewardConfig(margin=0.2, center_rewards_coefficient=0.01)
    pairs = preference_pairs(16, seed=5)
    full = RewardTrainer(lora(init="gaussian", dropout=0.1), None,
                         config(tmp_path / "full", **kw), rm, pairs)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "reward_model.json").is_file()  # a checkpoint is a reward-model directory
    # another LoRA init and another head: everything trainable must come from the checkpoint
    resumed = RewardTrainer(lora(init="gaussian", init_seed=7, dropout=0.1), None,
                            config(tmp_path / "resumed", resume=str(ckpt), **kw), rm, pairs,
                            head=ScalarHead(32, std=0.5, bias=False))
    resumed.train()
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for h_full, h_res in zip(full.history[3:], resumed.history):
        assert h_res["loss"] == pytest.approx(h_full["loss"], abs=1e-6)
        assert h_res["accuracy"] == h_full["accuracy"]
    after_full, after_res = trainable(full), trainable(resumed)
    assert "reward_head.linear.weight" in after_full
    assert max_diff(after_full, after_res) < 1e-6


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_reward_model_reloads_with_the_same_scores(tmp_path, method):
    from fastpeft.models import load_model

    model, tok = smollm2_sized_llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model, tok = load_model(str(base_dir))  # name_or_path = base_dir, as the CLI would load it
    if method == "lora":
        model = fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8,
                                                          target_modules="all-linear",
                                                          init_lora_weights="gaussian"))
    out = tmp_path / "out"
    trainer = RewardTrainer(model, tok, config(out, max_steps=2, batch_size=4, lr=1e-2),
                            RewardConfig(), example("preference.jsonl"), max_length=40)
    assert trainer.data_stats["train"].format == "preference"
    trainer.train()
    assert (out / ("adapter" if method == "lora" else "model")).is_dir()
    rows = [json.loads(line) for line in open(example("preference.jsonl"))][:3]
    prompts = [r["prompt"] for r in rows]
    completions = [r["chosen"] for r in rows]
    trainer.model.eval()
    batch = trainer.collate([ex for ex in trainer.train_dataset if ex["group"] < 3])
    with torch.no_grad():
        expected = sequence_scores(trainer.model, trainer.head, batch["chosen_input_ids"],
                                   batch["chosen_attention_mask"])
    rm = load_reward_model(str(out))
    assert not rm.model.training
    assert not any(p.requires_grad for p in rm.parameters())
    ids = [rm.tokenize(p, c) for p, c in zip(prompts, completions)]
    assert ids == [ex["chosen_input_ids"] for ex in trainer.train_dataset if ex["group"] < 3]
    got = rm(prompts, completions)
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    # score() on left-padded rows gives the same
    from fastpeft.data import pad_lists

    left = pad_lists(ids, 0, side="left")
    mask = pad_lists([[1] * len(i) for i in ids], 0, side="left")
    assert rm.score(left, mask).tolist() == pytest.approx(got, abs=1e-5)


def test_bad_input_is_reported(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                   + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    model, tok = smollm2_sized_llama()
    with pytest.raises(DataError, match=r"prefs\.jsonl, line 2: .*rejected"):
        RewardTrainer(model, tok, config(tmp_path), RewardConfig(), str(bad))
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c",
                               "margin": "big"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: 'margin' must be a number, got 'big'"):
        RewardTrainer(model, tok, config(tmp_path), RewardConfig(), str(bad))
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c",
                                "margin": 2}) + "\n")
    trainer = RewardTrainer(model, tok, config(tmp_path), RewardConfig(), str(good))
    assert trainer.train_dataset[0]["margin"] == 2.0
    sft_examples = [{"input_ids": [1, 2], "labels": [1, 2], "attention_mask": [1, 1]}]
    with pytest.raises(ValueError, match=r"train_dataset: example 0 lacks \['chosen_input_ids'"):
        RewardTrainer(lora(), None, config(tmp_path), RewardConfig(), sft_examples)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        RewardTrainer(lora(), None, config(tmp_path), RewardConfig(), str(good))
    with pytest.raises(FileNotFoundError, match="reward_model.json: missing"):
        load_reward_model(str(tmp_path))


@pytest.mark.slow
def test_reward_model_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                 "v_proj"]))
    try:
        trainer = RewardTrainer(model, tok, config(tmp_path, max_steps=2, batch_size=2,
                                                   lr=1e-3),
                                RewardConfig(), example("preference.jsonl"), max_length=32)
        trainer.train()
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
        model.eval()
        rows = [json.loads(line) for line in open(example("preference.jsonl"))][:2]
        batch = trainer.collate([ex for ex in trainer.train_dataset if ex["group"] < 2])
        with torch.no_grad():
            expected = sequence_scores(model, trainer.head, batch["rejected_input_ids"],
                                       batch["rejected_attention_mask"])
        fastpeft.unpatch(model)
        # reload onto the already loaded base (PPO would load the alias)
        rm = load_reward_model(str(tmp_path), base_model=model)
        got = rm([r["prompt"] for r in rows], [r["rejected"] for r in rows])
        assert got == pytest.approx(expected.tolist(), abs=1e-4)
        assert json.loads((tmp_path / "reward_model.json").read_text())["base_model"]
    finally:
        if "_fastpeft" in model.__dict__:
            fastpeft.unpatch(model)
        model.eval()
    assert os.path.isfile(tmp_path / "reward_head.safetensors")
