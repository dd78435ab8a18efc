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
