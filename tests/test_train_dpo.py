"""DPOTrainer (fastpeft.train.dpo) on tiny random Llamas and synthetic preferences
(tests/_pairs.py): the reward accuracy rises and the loss falls; the reference is the base
model (adapters disabled; a frozen copy for full fine-tuning) and its log-probs, and the
policy's, are the summed completion log-probs a plain log_softmax gives; grad accumulation;
datasets from paths (ranked rows expand); errors for bad input; one short run on SmolLM2
(slow)."""

import json
import math

import pytest
import torch
from _models import tiny_model
from _pairs import lora, preference_pairs, smollm2_sized_llama
from _tokenizer import example
from _train import config, max_diff

import fastpeft
from fastpeft.data import DataError
from fastpeft.train import DPOConfig, DPOTrainer, read_metrics

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def trainable(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.trainable_parameters()}


def reference_logps(base, batch, side: str) -> torch.Tensor:
    """Summed log p(completion) from the full logits of `base` (no fused op)."""
    ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


def test_dpo_raises_reward_accuracy_and_the_loss_falls(tmp_path):
    trainer = DPOTrainer(lora(), None, config(tmp_path, max_steps=40, batch_size=8, lr=2e-2,
                                              eval_every=40),
                         DPOConfig(beta=1.0), preference_pairs(64, seed=0),
                         eval_dataset=preference_pairs(64, seed=1))
    before = trainer.evaluate()
    # zero-init LoRA: the policy is the reference, every implicit reward is 0
    assert before["eval_rewards/accuracies"] == 0.0
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    last = trainer.train()
    assert last["eval_rewards/accuracies"] >= 0.75, last  # 0.84 measured (it plateaus there)
    assert last["eval_loss"] < 0.8 * math.log(2)
    assert last["eval_rewards/margins"] > 0.2
    losses = [h["loss"] for h in trainer.history]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    for key in ("loss",) + METRICS + tuple("eval_" + k for k in ("loss",) + METRICS):
        assert key in records[-1], key
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "peft_type"] == "LORA"


def test_the_reference_is_the_base_with_adapters_disabled(tmp_path, monkeypatch):
    import fastpeft.ops

    calls = []
    real = fastpeft.ops.linear_token_logprobs

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpeft.ops, "linear_token_logprobs", spy)
    pairs = preference_pairs(16, seed=2)
    trainer = DPOTrainer(lora(), None, config(tmp_path, max_steps=10, batch_size=8, lr=2e-2),
                         DPOConfig(beta=0.5), pairs)
    batch = trainer.collate(pairs[:5])
    base = tiny_model("llama", seed=0)  # the same weights the LoRA model was built on
    expected = [reference_logps(base, batch, s) for s in ("chosen", "rejected")]
    policy = [t.detach() for t in trainer.policy_logps(batch)]
    ref = trainer.reference_logps(batch)
    assert calls and calls[0][0] == 10  # chosen and rejected in one call (2B rows)
    for p, r, e in zip(policy, ref, expected):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6)  # step 0: policy == reference
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-4)
    trainer.train()
    trainer.model.eval()
    policy = [t.detach() for t in trainer.policy_logps(batch)]
    ref = trainer.reference_logps(batch)
    for p, r, e in zip(policy, ref, expected):
        assert (p - r).abs().max() > 1e-2  # the policy moved
        torch.testing.assert_close(r, e, rtol=1e-5, atol=1e-4)  # the reference did not
    # the policy's log-probs are those of its full logits too
    for p, s in zip(policy, ("chosen", "rejected")):
        torch.testing.assert_close(p, reference_logps(trainer.model, batch, s), rtol=1e-5,
                                   atol=1e-4)


def test_grad_accum_2x1_equals_1x2(tmp_path):
    pairs = preference_pairs(8, seed=4)
    runs = []
    for name, bs, ga in (("a", 1, 2), ("b", 2, 1)):
        t = DPOTrainer(lora(init="gaussian"), None,
                       config(tmp_path / name, max_steps=4, batch_size=bs, grad_accum=ga,
                              warmup_steps=1), DPOConfig(beta=0.2), pairs)
        t.train()
        runs.append(t)
    a, b = runs
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history],
                                                           abs=1e-6)
    # the first update is identical; Adam's normalisation then lifts float-order noise (rows
    # padded to other lengths) in near-zero gradient entries to ~5e-6 after 4 steps
    assert max_diff(trainable(a), trainable(b)) < 2e-5


def test_full_fine_tuning_uses_a_frozen_copy(tmp_path):
    model = tiny_model("llama", seed=0)
    pairs = preference_pairs(8, seed=6)
    trainer = DPOTrainer(model, None, config(tmp_path, max_steps=3, batch_size=4, lr=1e-3),
                         DPOConfig(), pairs)
    assert trainer.ref_model is not model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()
    batch = trainer.collate(pairs[:4])
    base = tiny_model("llama", seed=0)
    for r, s in zip(trainer.reference_logps(batch), ("chosen", "rejected")):
        torch.testing.assert_close(r, reference_logps(base, batch, s), rtol=1e-5, atol=1e-4)
    moved = max_diff({n: p.detach() for n, p in base.named_parameters()},
                     {n: p.detach() for n, p in model.named_parameters()})
    assert moved > 0
    assert (tmp_path / "model" / "config.json").is_file()
    assert not (tmp_path / "adapter").exists()


def test_dpo_from_paths_and_bad_input(tmp_path):
    model, tok = smollm2_sized_llama()
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules="all-linear"))
    trainer = DPOTrainer(model, tok, config(tmp_path / "run", max_steps=2, batch_size=4,
                                            eval_every=2),
                         DPOConfig(), example("ranked.jsonl"),
                         eval_dataset=example("preference.jsonl"), max_length=48)
    stats = trainer.data_stats["train"]
    assert stats.format == "ranked" and stats.examples > stats.rows  # K(K-1)/2 pairs a row
    last = trainer.train()
    assert math.isfinite(last["loss"]) and "eval_rewards/accuracies" in last
    # a dataset without chosen / rejected: the data error names the file and the line
    with pytest.raises(DataError, match=r"alpaca\.jsonl, line 1: preference data needs"):
        DPOTrainer(model, tok, config(tmp_path), DPOConfig(), example("alpaca.jsonl"))
    with pytest.raises(ValueError, match="ref_model: a patched model's reference"):
        DPOTrainer(model, tok, config(tmp_path), DPOConfig(), preference_pairs(2),
                   ref_model=tiny_model("llama"))
    with pytest.raises(ValueError, match="dpo.beta must be > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"eval_dataset: example 0 lacks"):
        DPOTrainer(model, tok, config(tmp_path), DPOConfig(), preference_pairs(2),
                   eval_dataset=[{"input_ids": [1], "labels": [1], "attention_mask": [1]}])


@pytest.mark.slow
def test_dpo_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                 "v_proj"]))
    try:
        trainer = DPOTrainer(model, tok, config(tmp_path, max_steps=2, batch_size=2, lr=1e-3),
                             DPOConfig(beta=0.1), example("preference.jsonl"), max_length=32)
        batch = trainer.collate(trainer.train_dataset[:2])
        with torch.no_grad():
            before = trainer.policy_logps(batch)
        ref = trainer.reference_logps(batch)
        for p, r in zip(before, ref):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-4)
        trainer.train()
        assert all(math.isfinite(h["loss"]) for h in trainer.history)
        model.eval()
        with torch.no_grad():
            after = trainer.policy_logps(batch)
        assert max(float((a - b).abs().max()) for a, b in zip(after, before)) > 1e-4
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        fastpeft.unpatch(model)
        model.eval()
