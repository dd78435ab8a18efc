"""patch() routes a causal LM's training loss through linear_cross_entropy: the same loss and
gradients as the model's own loss, without the logits."""

import copy
import inspect

import pytest
import torch
from _models import tiny_inputs, tiny_model

import fastpeft


def _pair(family, config, **model_kwargs):
    base = tiny_model(family)
    fused = fastpeft.patch(copy.deepcopy(base), config)
    plain = fastpeft.patch(copy.deepcopy(base), config, fused_loss=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _loss_and_grads(model, **kwargs):
    model.train()
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gpt_neox"])
def test_same_loss_and_gradients_without_logits(family):
    fused, plain = _pair(family, fastpeft.LoraConfig(r=4, target_modules="all-linear",
                                                     init_lora_weights=False))
    ids = tiny_inputs(batch=3, seq=9)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    got, got_grads = _loss_and_grads(fused, input_ids=ids, attention_mask=mask, labels=labels)
    want, want_grads = _loss_and_grads(plain, input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_num_items_in_batch_sums_like_transformers():
    fused, plain = _pair("llama", fastpeft.LoraConfig(r=2, init_lora_weights=False))
    ids = tiny_inputs()
    kwargs = dict(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(50))
    got, _ = _loss_and_grads(fused, **kwargs)
    want, _ = _loss_and_grads(plain, **kwargs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_eval_and_unlabelled_calls_keep_the_logits():
    fused, plain = _pair("llama", fastpeft.LoraConfig(r=2, init_lora_weights=False))
    ids = tiny_inputs()
    fused.eval(), plain.eval()
    out = fused(input_ids=ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, plain(input_ids=ids, labels=ids).loss)
    fused.train()
    assert fused(ids).logits is not None
    with torch.no_grad():
        assert fused(ids, labels=ids).logits is not None


def test_prompt_tuning_labels_are_extended_first():
    fused, plain = _pair("llama", fastpeft.PromptTuningConfig(num_virtual_tokens=3))
    ids = tiny_inputs()
    got, got_grads = _loss_and_grads(fused, input_ids=ids, labels=ids)
    want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=ids)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_trained_lm_head_copy_is_used_and_an_adapted_head_falls_back():
    fused, plain = _pair("llama", fastpeft.LoraConfig(r=2, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for m in (fused, plain):
            m.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids = tiny_inputs()
    got, got_grads = _loss_and_grads(fused, input_ids=ids, labels=ids)
    want, want_grads = _loss_and_grads(plain, input_ids=ids, labels=ids)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    name = "lm_head.modules_to_save.default.weight"
    torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)

    adapted = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["lm_head"]))
    adapted.train()
    assert adapted(tiny_inputs(), labels=tiny_inputs()).logits is not None


def test_unpatch_and_classifiers_keep_their_own_forward():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig())
    assert "forward" in model.__dict__
    # generate() reads the forward's signature to decide what to pass (position_ids, ...)
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    fastpeft.unpatch(model)
    assert "forward" not in model.__dict__
    bert = fastpeft.patch(tiny_model("bert"), fastpeft.LoraConfig())
    assert "forward" not in bert.__dict__
