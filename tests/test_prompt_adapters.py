"""Several prompt-learning adapters on one model (add / set / delete / disable), and the two
functions the adapter files use: prompt_embeddings_to_save (peft's `prompt_embeddings`) and
load_prompt_embeddings (peft's inference form), against files written by the installed peft."""

import warnings

import peft
import pytest
import torch
from _models import build, input_ids, left_padded_mask, outputs
from _prompt import peft_pair
from safetensors.torch import load_file

import fastpeft
from fastpeft.tuners import prompt

CONFIGS = {
    "prompt": lambda n=3: fastpeft.PromptTuningConfig(num_virtual_tokens=n),
    "ptuning": lambda n=3: fastpeft.PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=16),
    "prefix": lambda n=3: fastpeft.PrefixTuningConfig(num_virtual_tokens=n),
    "prefix_projection": lambda n=3: fastpeft.PrefixTuningConfig(
        num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=12),
}
PEFT_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
        encoder_hidden_size=12),
}


def _single(family, method, n, seed):
    torch.manual_seed(seed)
    model = build(family)
    torch.manual_seed(seed)
    return fastpeft.patch(model, CONFIGS[method](n))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_adapters_switch_and_delete(family, method):
    ids, mask = input_ids(), left_padded_mask()
    a, b = _single(family, method, 3, seed=1), _single(family, method, 5, seed=2)
    model = _single(family, method, 3, seed=1)
    torch.manual_seed(2)
    fastpeft.add_adapter(model, CONFIGS[method](5), "b")
    with torch.no_grad():
        want_a = outputs(a, ids, attention_mask=mask)
        want_b = outputs(b, ids, attention_mask=mask)
        base = outputs(build(family), ids, attention_mask=mask)
        torch.testing.assert_close(outputs(model, ids, attention_mask=mask), want_a, atol=0, rtol=0)
        fastpeft.set_adapter(model, "b")
        torch.testing.assert_close(outputs(model, ids, attention_mask=mask), want_b, atol=0, rtol=0)
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
            f"prompt_encoder.b.{n}" for n, _ in model.prompt_encoder.b.named_parameters())
        with fastpeft.disable_adapter(model):
            off = outputs(model, ids, attention_mask=mask)
        torch.testing.assert_close(off, base, atol=0, rtol=0)
        fastpeft.delete_adapter(model, "b")
        assert list(model.prompt_encoder) == ["default"]
        assert fastpeft.active_adapters(model) == ["default"]
        torch.testing.assert_close(outputs(model, ids, attention_mask=mask), want_a, atol=0, rtol=0)
    with pytest.raises(ValueError, match="only one .* adapter can be active at a time"):
        fastpeft.set_adapter(model, ["default", "default"])


def test_adapters_of_another_method_are_refused():
    model = _single("llama", "prefix", 3, seed=1)
    with pytest.raises(ValueError, match="PREFIX_TUNING adapters.*PROMPT_TUNING config"):
        fastpeft.add_adapter(model, CONFIGS["prompt"](), "p")


def _peft_dir(tmp_path, method):
    reference, ours = peft_pair("llama", PEFT_CONFIGS[method]())
    reference.save_pretrained(tmp_path)
    return reference, ours, load_file(str(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_prompt_embeddings_to_save_is_what_peft_saves(tmp_path, method):
    _, ours, saved = _peft_dir(tmp_path, method)
    assert list(saved) == ["prompt_embeddings"]
    got = prompt.prompt_embeddings_to_save(ours, "default")
    assert got.device.type == "cpu" and not got.requires_grad
    torch.testing.assert_close(got, saved["prompt_embeddings"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
@pytest.mark.parametrize("inference_mode", [True, False])
def test_load_prompt_embeddings_gives_peft_logits(tmp_path, method, inference_mode):
    _peft_dir(tmp_path, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    config = fastpeft.load_config(tmp_path).replace(inference_mode=inference_mode)
    model = build("llama")
    torch.manual_seed(123)  # a fresh init unlike the saved one
    fastpeft.patch(model, config)
    table = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
    prompt.load_prompt_embeddings(model, "default", table)
    ids, mask = input_ids(), left_padded_mask()
    with torch.no_grad():
        want = outputs(loaded, ids, attention_mask=mask)
        got = outputs(model, ids, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    table_form = method in ("prompt", "prefix")  # their trained parameters are the table
    assert model._fastpeft.configs["default"].inference_mode == (inference_mode or not table_form)
    torch.testing.assert_close(prompt.prompt_embeddings_to_save(model, "default"), table)


def test_load_prompt_embeddings_shape_error():
    model = _single("llama", "prefix", 3, seed=0)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 32\).*needs \(3, 64\)"):
        prompt.load_prompt_embeddings(model, "default", torch.zeros(3, 32))
    model = _single("gpt2", "ptuning", 3, seed=0)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(4, 32\).*needs \(3, 32\)"):
        prompt.load_prompt_embeddings(model, "default", torch.zeros(4, 32))
