"""save_adapter / load_adapter: peft's on-disk format both ways (logits against the installed
peft's PeftModel within 1e-5), exact round trips, and the errors for bad adapter directories."""

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from _models import tiny_inputs as input_ids, tiny_model as build
from fastpeft.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict
from fastpeft.patching import is_patched

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits[:, -ids.shape[1]:]  # the input positions


def perturb_(params, seed=3, std=0.1):
    """Make adapters that are not no-ops (and differ from any init) before saving."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def peft_save(family, config, directory, tweak=None, **save_kwargs):
    model = peft.get_peft_model(build(family), config).eval()
    if tweak is not None:
        tweak(model)
    model.save_pretrained(directory, **save_kwargs)
    return model


def peft_load(family, directory):
    return peft.PeftModel.from_pretrained(build(family), directory).eval()


def fastpeft_save(family, config, directory):
    model = fastpeft.patch(build(family), config).eval()
    perturb_(p for p in model.parameters() if p.requires_grad)
    fastpeft.save_adapter(model, directory)
    return model


def tweak_lm_head(model):
    perturb_([model.base_model.model.lm_head.modules_to_save["default"].weight], seed=5)


def tweak_lora_bias(model):
    perturb_([m.base_layer.bias for m in model.modules() if hasattr(m, "lora_A")], seed=6)


PEFT_TO_FASTPEFT = {
    "lora": ("llama", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), None),
    "rslora": ("llama", lambda: peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights=False), None),
    "dora": ("llama", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False), None),
    "lora_modules_to_save": ("llama", lambda: peft.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"],
        init_lora_weights=False, task_type="CAUSAL_LM"), tweak_lm_head),
    "ia3": ("llama", lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
        init_ia3_weights=False), None),
    "gpt2_lora_bias": ("gpt2", lambda: peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_fc"], bias="lora_only", init_lora_weights=False),
        tweak_lora_bias),
    "gpt2_ia3": ("gpt2", lambda: peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
        init_ia3_weights=False), None),
}


@pytest.mark.parametrize("case", list(PEFT_TO_FASTPEFT))
def test_peft_adapter_loads_into_fastpeft(case, tmp_path):
    family, make_config, tweak = PEFT_TO_FASTPEFT[case]
    peft_save(family, make_config(), tmp_path, tweak)
    ids = input_ids()
    expected = logits(peft_load(family, tmp_path), ids)
    base = logits(build(family), ids)
    assert (expected - base).abs().max() > 1e-3, "the adapter must change the logits"
    model = fastpeft.load_adapter(build(family), tmp_path).eval()
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in model.parameters()), "is_trainable=False freezes"


def test_peft_bin_file_loads(tmp_path):
    family, make_config, _ = PEFT_TO_FASTPEFT["lora"]
    peft_save(family, make_config(), tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    ids = input_ids()
    expected = logits(peft_load(family, tmp_path), ids)
    model = fastpeft.load_adapter(build(family), tmp_path).eval()
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)


FASTPEFT_TO_PEFT = {
    "lora": ("llama", lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "lora_modules_to_save": ("llama", lambda: fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], use_rslora=True)),
    "gpt2_lora": ("gpt2", lambda: fastpeft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"])),
    "dora": ("llama", lambda: fastpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                  use_dora=True)),
    "ia3": ("llama", lambda: fastpeft.IA3Config()),
    "gpt2_ia3": ("gpt2", lambda: fastpeft.IA3Config()),
    "prompt_tuning": ("llama", lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=3)),
}


@pytest.mark.parametrize("case", list(FASTPEFT_TO_PEFT))
def test_fastpeft_adapter_loads_into_peft(case, tmp_path):
    family, make_config = FASTPEFT_TO_PEFT[case]
    model = fastpeft_save(family, make_config(), tmp_path)
    ids = input_ids()
    expected = logits(model, ids)
    assert (expected - logits(build(family), ids)).abs().max() > 1e-3
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    peft_config = peft.PeftConfig.from_pretrained(tmp_path)  # every key is one peft knows
    known = set(type(peft_config).__dataclass_fields__)
    assert set(config) <= known, set(config) - known
    assert config["inference_mode"] is True and config["task_type"] == "CAUSAL_LM"
    torch.testing.assert_close(logits(peft_load(family, tmp_path), ids), expected,
                               atol=ATOL, rtol=0)


def test_gpt2_config_says_fan_in_fan_out(tmp_path):
    fastpeft_save("gpt2", fastpeft.LoraConfig(r=2, target_modules=["c_attn"]), tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["fan_in_fan_out"] is True


def test_saved_keys_are_peft_keys(tmp_path):
    """The same adapter saved by peft and by fastpeft: the same keys, shapes and config."""
    config = dict(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                  modules_to_save=["lm_head"])
    peft_save("llama", peft.LoraConfig(**config), tmp_path / "peft")
    fastpeft_save("llama", fastpeft.LoraConfig(**config), tmp_path / "fp")
    ours, theirs = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("fp", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.lm_head.weight" in ours
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in ours
    fp_cfg, peft_cfg = (json.loads((tmp_path / d / CONFIG_NAME).read_text())
                        for d in ("fp", "peft"))
    for key, value in fp_cfg.items():
        if key == "target_modules":  # a set in peft: saved in hash order
            value, peft_cfg[key] = sorted(value), sorted(peft_cfg[key])
        assert peft_cfg[key] == value or key == "task_type", (key, value, peft_cfg[key])


# --- round trips ---------------------------------------------------------------------------

ROUND_TRIPS = {
    "lora": ("gpt2", lambda: fastpeft.LoraConfig(r=4, target_modules="all-linear", bias="all")),
    "dora": ("llama", lambda: fastpeft.LoraConfig(r=4, use_dora=True)),
    "ia3": ("gpt2", lambda: fastpeft.IA3Config()),
    "houlsby": ("llama", lambda: fastpeft.AdapterConfig(kind="houlsby", reduction_factor=4)),
    "pfeiffer": ("gpt2", lambda: fastpeft.AdapterConfig(kind="pfeiffer", reduction_factor=8,
                                                        modules_to_save=["lm_head"])),
    "prompt_tuning": ("gpt2", lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=2)),
    "prefix": ("llama", lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=2)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_is_exact(case, tmp_path):
    family, make_config = ROUND_TRIPS[case]
    model = fastpeft_save(family, make_config(), tmp_path)
    ids = input_ids()
    loaded = fastpeft.load_adapter(build(family), tmp_path, is_trainable=True).eval()
    saved = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    again = adapter_state_dict(loaded)
    assert saved.keys() == again.keys()
    for key in saved:
        assert torch.equal(saved[key], again[key]), key
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert any(p.requires_grad for p in loaded.parameters()), "is_trainable=True trains"
    fastpeft.save_adapter(loaded, tmp_path / "again")
    first, second = (json.loads((d / CONFIG_NAME).read_text())
                     for d in (tmp_path, tmp_path / "again"))
    assert first == second


def test_bottleneck_config_names_its_type(tmp_path):
    fastpeft_save("llama", fastpeft.AdapterConfig(reduction_factor=4), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["kind"] == "houlsby"


def test_several_adapters_go_into_subdirectories(tmp_path):
    model = fastpeft.patch(build("llama"), fastpeft.LoraConfig(r=2, init_lora_weights=False))
    fastpeft.add_adapter(model, fastpeft.LoraConfig(r=3, init_lora_weights=False), "other")
    written = fastpeft.save_adapter(model, tmp_path)
    assert written == [str(tmp_path), str(tmp_path / "other")]
    assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(tmp_path / "other"))
    one = fastpeft.save_adapter(model, tmp_path / "one", "other")
    assert one == [str(tmp_path / "one" / "other")]
    ids = input_ids()
    fastpeft.set_adapter(model, "other")
    expected = logits(model.eval(), ids)
    loaded = fastpeft.load_adapter(build("llama"), tmp_path).eval()
    fastpeft.load_adapter(loaded, tmp_path / "other", adapter_name="other")
    assert fastpeft.active_adapters(loaded) == ["default"], "loading adds, as peft, unactivated"
    fastpeft.set_adapter(loaded, "other")
    torch.testing.assert_close(logits(loaded, ids), expected, atol=ATOL, rtol=0)
    # peft reads the same layout
    pm = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    pm.load_adapter(tmp_path / "other", adapter_name="other")
    pm.set_adapter("other")
    torch.testing.assert_close(logits(pm.eval(), ids), expected, atol=ATOL, rtol=0)


def test_base_model_name_is_written(tmp_path):
    model = build("llama")
    model.name_or_path = model.config._name_or_path = "org/tiny-llama"
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=2))
    fastpeft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"


# --- prompt learning from peft (needs fastpeft.tuners.prompt) ------------------------------

PEFT_PROMPT = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prompt_tuning_modules_to_save": lambda: peft.PromptTuningConfig(
        num_virtual_tokens=3, task_type="CAUSAL_LM", modules_to_save=["lm_head"]),
    "p_tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16,
                                                 task_type="CAUSAL_LM"),
    "prefix_gqa": lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix_projection_gqa": lambda: peft.PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
        task_type="CAUSAL_LM"),
}


def tweak_prompt(model):
    perturb_(model.prompt_encoder["default"].parameters(), seed=7, std=0.5)
    perturb_(p for n, p in model.named_parameters() if ".modules_to_save." in n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(PEFT_PROMPT))
def test_peft_prompt_learning_adapter_loads_into_fastpeft(case, family, tmp_path):
    peft_save(family, PEFT_PROMPT[case](), tmp_path, tweak_prompt)
    ids = input_ids()
    mask = torch.ones_like(ids)
    expected = logits(peft_load(family, tmp_path), ids, attention_mask=mask)
    assert (expected - logits(build(family), ids)).abs().max() > 1e-3
    model = fastpeft.load_adapter(build(family), tmp_path).eval()
    torch.testing.assert_close(logits(model, ids, attention_mask=mask), expected,
                               atol=ATOL, rtol=0)


# --- bad adapter directories ---------------------------------------------------------------

@pytest.fixture
def lora_dir(tmp_path):
    d = tmp_path / "lora"
    peft_save("llama", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False), d)
    return d


def edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(directory, fn):
    path = directory / WEIGHTS_NAME
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def assert_load_fails(model, directory, match, exc=ValueError, **kwargs):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patched = is_patched(model)
    with pytest.raises(exc, match=match):
        fastpeft.load_adapter(model, directory, **kwargs)
    assert is_patched(model) == patched, "a failed load leaves the model as it was"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_missing_directory(tmp_path):
    assert_load_fails(build("llama"), tmp_path / "nope", "nope: no such adapter directory",
                      FileNotFoundError)


def test_missing_config(lora_dir):
    os.remove(lora_dir / CONFIG_NAME)
    assert_load_fails(build("llama"), lora_dir, f"{CONFIG_NAME}: missing", FileNotFoundError)


def test_missing_weights(lora_dir):
    os.remove(lora_dir / WEIGHTS_NAME)
    assert_load_fails(build("llama"), lora_dir, f"{WEIGHTS_NAME}: missing", FileNotFoundError)


def test_unreadable_weights(lora_dir):
    (lora_dir / WEIGHTS_NAME).write_bytes(b"not safetensors")
    assert_load_fails(build("llama"), lora_dir, f"{WEIGHTS_NAME}: not a readable safetensors")


def test_config_of_another_method(lora_dir, tmp_path):
    model = fastpeft.patch(build("llama"), fastpeft.IA3Config())
    assert_load_fails(model, lora_dir, f"{CONFIG_NAME}: peft_type is LORA, but the model carries "
                      "IA3 adapters", adapter_name="second")


def test_unknown_method(lora_dir):
    edit_config(lora_dir, peft_type="LOHA")
    assert_load_fails(build("llama"), lora_dir, f"{CONFIG_NAME}: peft_type must be one of")


def test_config_that_does_not_fit_the_model(lora_dir):
    assert_load_fails(build("gpt2"), lora_dir, f"{CONFIG_NAME}: does not fit GPT2LMHeadModel")


def test_shape_that_does_not_fit(lora_dir):
    edit_config(lora_dir, r=8)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert_load_fails(build("llama"), lora_dir,
                      rf"{WEIGHTS_NAME}: {key} has shape \(4, 32\), the model expects \(8, 32\)")


def test_key_that_matches_no_module(lora_dir):
    edit_weights(lora_dir, lambda t: t.update({"base_model.model.model.nope.lora_A.weight":
                                              torch.zeros(4, 32)}))
    assert_load_fails(build("llama"), lora_dir, r"1 key\(s\) match no parameter.*model.nope")


def test_missing_key(lora_dir):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_weights(lora_dir, lambda t: t.pop(key))
    assert_load_fails(build("llama"), lora_dir, rf"1 key\(s\) .* are missing: {key}")


def test_adapter_name_taken(lora_dir):
    model = fastpeft.patch(build("llama"), fastpeft.LoraConfig(r=2))
    assert_load_fails(model, lora_dir, "adapter_name: the model already has an adapter 'default'")


def test_failed_load_into_patched_model_removes_the_new_adapter(lora_dir):
    model = fastpeft.patch(build("llama"), fastpeft.LoraConfig(r=2))
    edit_weights(lora_dir, lambda t: t.popitem())
    assert_load_fails(model, lora_dir, "missing", adapter_name="second")
    assert list(model._fastpeft.configs) == ["default"]


def test_base_model_mismatch(lora_dir):
    edit_config(lora_dir, base_model_name_or_path="org/llama-a")
    model = build("llama")
    model.name_or_path = "org/llama-b"
    assert_load_fails(model, lora_dir, "base_model_name_or_path is 'org/llama-a', but the model is "
                      "'org/llama-b'; pass allow_base_mismatch=True")
    fastpeft.load_adapter(model, lora_dir, allow_base_mismatch=True)
    assert is_patched(model)


@pytest.mark.parametrize("saved, current", [("org/llama-a", "/models/llama-a"),
                                            ("org/llama-a", "org/llama-a"), ("org/llama-a", "")])
def test_base_model_names_that_match(lora_dir, saved, current):
    edit_config(lora_dir, base_model_name_or_path=saved)
    model = build("llama")
    model.name_or_path = current
    fastpeft.load_adapter(model, lora_dir)
    assert is_patched(model)


def test_save_unknown_adapter(tmp_path):
    model = fastpeft.patch(build("llama"), fastpeft.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"adapter_name: unknown adapter\(s\) \['x'\]"):
        fastpeft.save_adapter(model, tmp_path, "x")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous adapter files whole, and no temporary files."""
    model = fastpeft_save("llama", fastpeft.LoraConfig(r=2), tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    perturb_(p for p in model.parameters() if p.requires_grad)

    def crash(fd):
        raise KeyboardInterrupt  # after the new bytes went to a temporary file, before the rename

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        fastpeft.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())
