"""Every PEFT method on the embedded default model (SmolLM2-135M-Instruct): patch, one training
step, generate, unpatch."""

import pytest
import torch

import fastpeft

METHODS = {
    "lora": lambda: fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                        target_modules="all-linear"),
    "dora": lambda: fastpeft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: fastpeft.IA3Config(),
    "adapter": lambda: fastpeft.AdapterConfig(kind="houlsby"),
    "prefix": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                  encoder_hidden_size=32),
    "prompt": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning": lambda: fastpeft.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_patch_train_generate(smollm2, method):
    base, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = base(ids).logits[:, -1]
    model = fastpeft.patch(base, METHODS[method]())
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and sum(p.numel() for p in trainable) < 0.05 * sum(
            p.numel() for p in model.parameters())
        before = [p.detach().clone() for p in trainable]
        model.train()
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        torch.optim.AdamW(trainable, lr=1e-3).step()
        assert any(not torch.equal(p.detach(), b) for p, b in zip(trainable, before))
        model.eval()
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4)
        assert torch.equal(out[:, : ids.shape[1]], ids)
    finally:
        model.zero_grad(set_to_none=True)
        fastpeft.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits[:, -1], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_fastpeft_merge_saves_the_default_model(smollm2, tmp_path):
    """`fastpeft merge` on an adapter of the default model writes a plain Hugging Face model
    with the patched model's logits. transformers keeps the GGUF quantizer on the dequantized
    model, which made save_pretrained refuse it; load_default_model removes it."""
    from transformers import AutoModelForCausalLM

    from fastpeft import cli

    base, tokenizer = smollm2
    assert getattr(base, "hf_quantizer", None) is None
    ids = tokenizer(["Reverse the digits: 48162"], return_tensors="pt").input_ids
    model = fastpeft.patch(base, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
            patched = model.eval()(ids).logits
        fastpeft.save_adapter(model, str(tmp_path / "adapter"))
    finally:
        fastpeft.unpatch(model)
    assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(ids).logits
        plain = base.eval()(ids).logits
    assert (patched - plain).abs().max() > 1e-3  # the adapter changes the logits
    torch.testing.assert_close(got, patched, atol=1e-4, rtol=1e-4)
