"""Prefix tuning / P-tuning v2 through the registered "fastpeft_prefix" attention function,
against the installed peft (which injects the prefix into the KV cache): logits on the input
positions, GQA, left padding, given position ids, the fused op in training and prefill, the
SDPA fallback in decoding, gradient checkpointing, disable_adapter and unpatch."""

import peft
import pytest
import torch
from _models import build, input_ids, left_padded_mask, outputs
from _prompt import peft_pair

import fastpeft
import fastpeft.ops
from fastpeft.tuners import prefix_attn

N = 3


def prefix_config(projection=False, task="CAUSAL_LM"):
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N,
                                   prefix_projection=projection, encoder_hidden_size=12)


def _compare(reference, ours, family, ids, **kwargs):
    with torch.no_grad():
        want = outputs(reference, ids, **kwargs)
        got = outputs(ours, ids, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = outputs(build(family), ids, **kwargs)
    assert (got - base).abs().max() > 1e-3  # the prefix changes the outputs
    return got


def _count_op(monkeypatch):
    calls = []
    op = fastpeft.ops.prefix_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return op(*args, **kwargs)

    monkeypatch.setattr(fastpeft.ops, "prefix_attention", counting)
    return calls


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_peft(family, padded, projection):
    reference, ours = peft_pair(family, prefix_config(projection))
    assert ours.config._attn_implementation == prefix_attn.NAME
    ids = input_ids(batch=3, seq=6)
    mask = left_padded_mask(3, 6) if padded else None
    _compare(reference, ours, family, ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2", "mistral", "bert"])
def test_other_families_match_peft(family, monkeypatch):
    calls = _count_op(monkeypatch)
    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    reference, ours = peft_pair(family, prefix_config(task=task))
    _compare(reference, ours, family, input_ids(), attention_mask=left_padded_mask())
    assert len(calls) == 2  # the fused op in both layers (mistral: inside its sliding window)


def test_given_position_ids_are_offset_like_peft():
    reference, ours = peft_pair("llama", prefix_config())
    mask = left_padded_mask(3, 6)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    _compare(reference, ours, "llama", input_ids(3, 6), attention_mask=mask, position_ids=positions)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_op_in_prefill_and_sdpa_with_a_kv_cache(family, monkeypatch):
    calls = _count_op(monkeypatch)
    _, ours = peft_pair(family, prefix_config())
    ids, mask = input_ids(batch=3, seq=6), left_padded_mask(3, 6)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        assert len(calls) == 2  # one per layer
        out = ours(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert len(calls) == 4 and calls[-1][2] == 4  # prefill: the op, q of length 4
        steps = [out.logits]
        for t in (4, 5):  # decoding: SDPA over [prefix ; cache]
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                       past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        assert len(calls) == 4
        assert out.past_key_values.get_seq_length() == 6  # the cache holds no prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reentrant", [None, False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    """peft refuses gradient checkpointing with prefix tuning; fastpeft gives the gradients of
    the run without it (and peft's)."""
    reference, ours = peft_pair(family, prefix_config(projection=True))
    reference.train(), ours.train()
    ids, mask = input_ids(), left_padded_mask()
    labels = ids.masked_fill(mask == 0, -100)
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    encoder = ours.prompt_encoder.default
    encodes = []
    encoder.register_forward_hook(lambda *a: encodes.append(1))
    if reentrant is not None:
        ours.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ours.disable_input_require_grads()  # fastpeft needs no embedding hook
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    # reentrant re-runs each layer in the backward with a freshly encoded prefix
    assert len(encodes) == (1 + 2 if reentrant else 1)
    theirs = dict(reference.prompt_encoder.default.named_parameters())
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for n, p in ours.named_parameters() if "prompt_encoder" not in n)


def test_gradient_checkpointing_is_active(monkeypatch):
    calls = _count_op(monkeypatch)
    _, ours = peft_pair("llama", prefix_config())
    ours.train()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours(input_ids=input_ids()).logits.sum().backward()
    assert len(calls) == 4  # each layer's attention ran again in the backward


def test_attention_dropout_in_training_uses_sdpa(monkeypatch):
    calls = _count_op(monkeypatch)
    model = build("gpt2")
    model.config.attn_pdrop = 0.5
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.5
    fastpeft.patch(model, prefix_config()).train()
    model(input_ids=input_ids()).logits.sum().backward()
    assert calls == []
    assert model.prompt_encoder.default.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_disable_adapter_and_unpatch_give_the_base_model(implementation):
    model = build("llama")
    model.set_attn_implementation(implementation)
    ids, mask = input_ids(), left_padded_mask()
    with torch.no_grad():
        base = outputs(model, ids, attention_mask=mask)
        fastpeft.patch(model, prefix_config())
        assert model.config._attn_implementation == prefix_attn.NAME
        with fastpeft.disable_adapter(model):
            off = outputs(model, ids, attention_mask=mask)
        torch.testing.assert_close(off, base, atol=0, rtol=0)
        assert (outputs(model, ids, attention_mask=mask) - base).abs().max() > 1e-3
        fastpeft.unpatch(model)
        assert model.config._attn_implementation == implementation
        assert not hasattr(model, "prompt_encoder")
        torch.testing.assert_close(outputs(model, ids, attention_mask=mask), base, atol=0, rtol=0)


def test_misuse_is_an_error():
    _, ours = peft_pair("llama", prefix_config())
    with pytest.raises(ValueError, match="ran without the prefix; call the patched model"):
        ours.model(input_ids=input_ids())
    ours.set_attn_implementation("sdpa")
    with pytest.raises(ValueError,
                       match="needs attn_implementation 'fastpeft_prefix', the model has 'sdpa'"):
        ours(input_ids=input_ids())
    with pytest.raises(ValueError, match=r"\(num_attention_heads, token_dim\) must be .* "
                                         r"\(4, 32\), got \(4, 16\)"):
        fastpeft.patch(build("gpt2"),
                       fastpeft.PrefixTuningConfig(num_virtual_tokens=2, token_dim=16))
    with pytest.raises(ValueError, match="num_layers must be the model's 2 layers, got 3"):
        fastpeft.patch(build("gpt2"),
                       fastpeft.PrefixTuningConfig(num_virtual_tokens=2, num_layers=3))
    with pytest.raises(ValueError, match='init_weights must be None or "zero"'):
        fastpeft.PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")


def test_zero_init_is_the_base_model_shifted_by_n():
    """init_weights="zero": zero keys and values only add mass to the softmax; peft's result."""
    pc = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, init_weights="zero")
    reference, ours = peft_pair("gpt2", pc)
    assert ours.prompt_encoder.default.embedding.weight.abs().sum() == 0
    ours2 = fastpeft.patch(build("gpt2"), pc)
    assert ours2.prompt_encoder.default.embedding.weight.abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(outputs(ours2, input_ids()), outputs(reference, input_ids()),
                                   atol=1e-5, rtol=0)


def test_bf16_model_keeps_an_fp32_encoder():
    reference, _ = peft_pair("llama", prefix_config(projection=True))
    model = build("llama").to(torch.bfloat16)
    fastpeft.patch(model, prefix_config(projection=True))
    model.prompt_encoder.default.load_state_dict(reference.prompt_encoder.default.state_dict())
    assert model.prompt_encoder.default.embedding.weight.dtype == torch.float32  # as peft
    ids, mask = input_ids(), left_padded_mask()
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        want = outputs(reference, ids, attention_mask=mask)
    torch.testing.assert_close(logits.float(), want, atol=0.1, rtol=0.05)
    logits.float().sum().backward()
    grad = model.prompt_encoder.default.transform[2].weight.grad
    assert grad.dtype == torch.float32 and grad.isfinite().all() and grad.abs().sum() > 0
