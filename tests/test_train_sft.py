"""SFTTrainer (fastpeft.train.sft) on tiny random Llamas: the loss falls, it goes through the
fused linear_cross_entropy, the eval loss is the token mean over the eval set, the final
adapter reloads in peft format, and datasets given as paths load (plain and packed) with the
SmolLM2 tokenizer; and the loss falls on the real SmolLM2 (slow)."""

import json
import os

import pytest
import torch
from _models import tiny_model
from _tokenizer import example, smollm2_tokenizer
from _train import config, lora_model, pattern_examples
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft
from fastpeft.data import Collator
from fastpeft.train import SFTTrainer


def lora_with_head():
    """LoRA on every linear layer plus a trainable copy of the LM head: a frozen random head
    (std 0.02) after RMSNorm cannot produce logits far from uniform."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    return fastpeft.patch(model, fastpeft.LoraConfig(r=8, lora_alpha=16,
                                                     target_modules="all-linear",
                                                     modules_to_save=["lm_head"]))


def test_sft_loss_falls_and_the_adapter_reloads(tmp_path):
    train, held_out = pattern_examples(32, seed=0), pattern_examples(8, seed=1)
    trainer = SFTTrainer(lora_with_head(), None, config(tmp_path, max_steps=40, lr=1e-2,
                                                        warmup_steps=4, eval_every=20),
                         train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_loss"]
    last = trainer.train()
    losses = [h["loss"] for h in trainer.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert last["eval_loss"] < 0.7 * before
    # output_dir/adapter/ in peft format gives the trained model back
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = fastpeft.load_adapter(tiny_model("llama"), str(adapter))
    ids = torch.tensor([held_out[0]["input_ids"]])
    trainer.model.eval()
    torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits)


def test_sft_loss_goes_through_linear_cross_entropy(tmp_path, monkeypatch):
    import fastpeft.ops

    calls = []
    real = fastpeft.ops.linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpeft.ops, "linear_cross_entropy", spy)
    trainer = SFTTrainer(lora_with_head(), None, config(tmp_path, max_steps=2, grad_accum=2),
                         pattern_examples())
    trainer.train()
    assert len(calls) == 4  # one per micro-batch


def test_eval_loss_is_the_token_mean_over_the_eval_set(tmp_path):
    model = lora_model()
    held_out = pattern_examples(7, seed=3)
    trainer = SFTTrainer(model, None, config(tmp_path, batch_size=3), pattern_examples(),
                         eval_dataset=held_out)
    got = trainer.evaluate()["eval_loss"]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in held_out:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(ids).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    assert got == pytest.approx(total / count, rel=1e-5)


def smollm2_sized_llama():
    torch.manual_seed(0)
    tok = smollm2_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None))
    return fastpeft.patch(model, fastpeft.LoraConfig(r=4, lora_alpha=8,
                                                     target_modules="all-linear")), tok


@pytest.mark.parametrize("packing", [False, True])
def test_sft_from_dataset_paths_with_the_smollm2_tokenizer(tmp_path, packing):
    model, tok = smollm2_sized_llama()
    trainer = SFTTrainer(model, tok, config(tmp_path, max_steps=3, batch_size=4, eval_every=3),
                         example("alpaca.jsonl"), eval_dataset=example("messages.jsonl"),
                         max_length=96, packing=packing)
    assert trainer.data_stats["train"].format == "alpaca"
    assert trainer.data_stats["eval"].format == "messages"
    assert ("position_ids" in trainer.train_dataset[0]) == packing
    last = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    assert last["eval_loss"] > 0
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_packed_and_padded_batches_give_the_same_step_loss(tmp_path):
    # the same examples, padded or packed into one row: the loss of a step is the token mean
    # either way (packed samples do not see each other: use_cache=False)
    examples = pattern_examples(4, seed=5)
    from fastpeft.data import pack

    packed = pack(examples, 64)
    assert len(packed) == 1
    padded_run = SFTTrainer(lora_model(), None, config(tmp_path / "a", max_steps=1,
                                                       batch_size=4), examples)
    packed_run = SFTTrainer(lora_model(), None, config(tmp_path / "b", max_steps=1,
                                                       batch_size=1), packed,
                            collator=Collator())
    padded_run.train()
    packed_run.train()
    assert packed_run.history[0]["loss"] == pytest.approx(padded_run.history[0]["loss"],
                                                          abs=1e-5)


@pytest.mark.slow
def test_sft_loss_falls_on_smollm2(smollm2, tmp_path):
    """The embedded SmolLM2-135M with LoRA: a few steps over 8 alpaca rows (2 epochs) lower
    the training loss on them."""
    model, tok = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fastpeft.patch(model, fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                              target_modules=["q_proj", "v_proj", "o_proj"]))
    try:
        from fastpeft.data import load_sft_dataset

        rows, _ = load_sft_dataset(example("alpaca.jsonl"), tok, max_length=64)
        trainer = SFTTrainer(model, tok, config(tmp_path, max_steps=8, batch_size=4, lr=2e-3,
                                                warmup_steps=0, scheduler="constant"),
                             rows[:8])
        trainer.train()
        losses = [h["loss"] for h in trainer.history]
        # steps 1-2 are the first pass over the 8 rows, 7-8 the fourth
        assert (losses[-2] + losses[-1]) < 0.8 * (losses[0] + losses[1]), losses
    finally:
        fastpeft.unpatch(model)
        model.eval()
        torch.set_num_threads(threads)
