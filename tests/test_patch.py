"""fastpeft.patch on every supported family, checked against the installed peft; adapter
management (add / set / delete / disable), modules_to_save, unpatch."""

import copy

import peft
import pytest
import torch
from _models import FAMILIES, outputs, params_changed_by_one_step, tiny_inputs, tiny_model

import fastpeft
from fastpeft.tuners.lora import LoraLinear

PEFT_PREFIX = "base_model.model."


def _peft_and_fastpeft(family, **lora_kwargs):
    """The same tiny model patched by peft (random, non-zero B) and by fastpeft, with peft's
    adapter weights copied into fastpeft's."""
    base = tiny_model(family)
    modules_to_save = ["classifier"] if family in ("bert", "roberta") else None
    pcfg = peft.LoraConfig(init_lora_weights=False, modules_to_save=modules_to_save,
                           fan_in_fan_out=family == "gpt2", **lora_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    fm = fastpeft.patch(copy.deepcopy(base),
                        fastpeft.LoraConfig(modules_to_save=modules_to_save, **lora_kwargs))
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in pm.state_dict().items()}
    result = fm.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return base, pm, fm




@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_matches_peft_on_every_family(family, targets):
    base, pm, fm = _peft_and_fastpeft(family, r=4, lora_alpha=8, target_modules=targets)
    pm.eval(), fm.eval()
    ids = tiny_inputs()
    peft_trainable = sorted(n.removeprefix(PEFT_PREFIX) for n, p in pm.named_parameters()
                            if p.requires_grad)
    ours = sorted(n for n, p in fm.named_parameters() if p.requires_grad)
    assert ours == peft_trainable
    assert fastpeft.get_nb_trainable_parameters(fm) == pm.get_nb_trainable_parameters()
    expected = outputs(pm, ids)
    # the adapter does something
    assert (expected - outputs(base, ids)).abs().max() > 1e-2 * expected.abs().max()
    torch.testing.assert_close(outputs(fm, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_moves_only_adapter_params(family):
    _, _, fm = _peft_and_fastpeft(family, r=4, target_modules="all-linear")
    changed = params_changed_by_one_step(fm)
    assert changed == {n for n, _ in fm.named_parameters() if "lora_" in n}


def test_unsupported_model_names_the_supported_families():
    class NotHF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"supports .*'gpt2'.*'llama'.* got NotHF"):
        fastpeft.patch(NotHF(), fastpeft.LoraConfig(target_modules=["proj"]))


def test_no_target_match_lists_the_linear_modules():
    with pytest.raises(ValueError, match=r"matched no module.*'q_proj'"):
        fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["nope"]))


def test_target_on_a_non_linear_module_is_an_error():
    with pytest.raises(ValueError, match=r"'model.embed_tokens' is a Embedding"):
        fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(target_modules=["embed_tokens"]))


def test_failed_patch_leaves_the_model_unpatched():
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        fastpeft.patch(model, fastpeft.LoraConfig(target_modules=["nope"]))
    assert not hasattr(model, "_fastpeft")
    fastpeft.patch(model, fastpeft.LoraConfig())


def test_add_set_delete_adapters():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=2, init_lora_weights=False))
    ids = tiny_inputs()
    out_default = outputs(model, ids)
    fastpeft.add_adapter(model, fastpeft.LoraConfig(r=3, init_lora_weights=False), "other")
    assert fastpeft.active_adapters(model) == ["default"]
    torch.testing.assert_close(outputs(model, ids), out_default)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    fastpeft.set_adapter(model, "other")
    out_other = outputs(model, ids)
    assert (out_other - out_default).abs().max() > 1e-3
    assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
    fastpeft.delete_adapter(model, "other")
    assert fastpeft.active_adapters(model) == ["default"]
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(outputs(model, ids), out_default)


def test_adapter_management_errors():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig())
    with pytest.raises(ValueError, match="'default' already exists"):
        fastpeft.add_adapter(model, fastpeft.LoraConfig(), "default")
    with pytest.raises(ValueError, match="one model takes adapters of one method"):
        fastpeft.add_adapter(model, fastpeft.IA3Config(), "ia3")
    with pytest.raises(ValueError, match=r"unknown adapter.*\['default'\]"):
        fastpeft.set_adapter(model, "missing")
    with pytest.raises(ValueError, match="only adapter"):
        fastpeft.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="adapter_name must be"):
        fastpeft.add_adapter(model, fastpeft.LoraConfig(), "a.b")
    with pytest.raises(ValueError, match="is not patched"):
        fastpeft.unpatch(tiny_model("llama"))


def test_disable_adapter_and_unpatch_restore_the_base_model():
    base = tiny_model("llama")
    ids = tiny_inputs()
    expected = outputs(base, ids)
    names = {n: p.requires_grad for n, p in base.named_parameters()}
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(
        init_lora_weights=False, target_modules="all-linear", modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(2)
    assert (outputs(model, ids) - expected).abs().max() > 1e-3
    with fastpeft.disable_adapter(model):
        torch.testing.assert_close(outputs(model, ids), expected, rtol=0, atol=0)
    model = fastpeft.unpatch(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == names
    torch.testing.assert_close(outputs(model, ids), expected, rtol=0, atol=0)


def test_modules_to_save_trains_a_copy():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert "lm_head.original_module.weight" not in trainable


def test_patch_takes_a_peft_config_dict_and_json(tmp_path):
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"], use_rslora=True)
    from_peft = fastpeft.LoraConfig.from_peft(pcfg)
    assert (from_peft.r, from_peft.lora_alpha, from_peft.use_rslora) == (4, 16, True)
    assert sorted(from_peft.target_modules) == ["k_proj", "q_proj"]
    pcfg.save_pretrained(tmp_path)
    from_json = fastpeft.LoraConfig.from_json(tmp_path)
    assert from_json.to_dict() == from_peft.to_dict()
    model = fastpeft.patch(tiny_model("llama"), pcfg)
    assert isinstance(model.model.layers[0].self_attn.k_proj, LoraLinear)
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(16 / 2)


def test_unknown_peft_feature_is_refused():
    with pytest.raises(ValueError, match=r"does not support use_qalora=True"):
        fastpeft.load_config({"peft_type": "LORA", "r": 4, "use_qalora": True})
    with pytest.raises(ValueError, match=r"peft_type must be one of .* got 'BONE'"):
        fastpeft.load_config({"peft_type": "BONE"})
    with pytest.raises(ValueError, match="expected a IA3 config, got peft_type LORA"):
        fastpeft.IA3Config.from_peft(peft.LoraConfig())


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive int, got 0"),
    (dict(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\), got 1.5"),
    (dict(bias="some"), "bias must be 'none', 'all' or 'lora_only', got 'some'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights must be True, False or 'gaussian'"),
])
def test_bad_lora_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastpeft.LoraConfig(**kwargs)


def test_print_trainable_parameters(capsys):
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=4))
    fastpeft.print_trainable_parameters(model)
    trainable, total = fastpeft.get_nb_trainable_parameters(model)
    assert trainable == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)  # q [32->32], v [32->16], 2 layers
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


def test_failed_add_adapter_leaves_no_trace():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig())
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.add_adapter(model, fastpeft.LoraConfig(modules_to_save=["lm_head"],
                                                        target_modules=["nope"]), "other")
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(
            modules_to_save=["lm_head"], target_modules=["nope"]))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_lora_with_dropout_under_gradient_checkpointing(use_reentrant):
    """The recompute regenerates the same dropout masks (the op's seed comes from the RNG
    state checkpointing restores), so the gradients equal those of a plain run."""
    base = tiny_model("llama")
    ids = tiny_inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random LoRA weights
        model = fastpeft.patch(copy.deepcopy(base), fastpeft.LoraConfig(
            r=4, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        torch.manual_seed(7)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_deepcopy_of_a_patched_model_is_independent():
    model = fastpeft.patch(tiny_model("llama"), fastpeft.LoraConfig(r=2, init_lora_weights=False))
    ids = tiny_inputs()
    expected = outputs(model, ids)
    twin = copy.deepcopy(model)
    fastpeft.unpatch(model)  # the twin must not lean on the original's state, hook or generate
    assert not model._forward_pre_hooks and "generate" not in model.__dict__
    torch.testing.assert_close(outputs(twin, ids), expected, rtol=0, atol=0)
    both = twin.generate(ids, adapter_ids=["default", "__base__"], max_new_tokens=2,
                         do_sample=False)
    assert both.shape == (2, ids.shape[1] + 2)
    fastpeft.unpatch(twin)
    assert not twin._forward_pre_hooks and "generate" not in twin.__dict__
    torch.testing.assert_close(outputs(twin, ids), outputs(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("config", [
    fastpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear",
                        init_lora_weights=False),
    fastpeft.IA3Config(),
    fastpeft.AdapterConfig(),
    fastpeft.PrefixTuningConfig(num_virtual_tokens=3),
    fastpeft.PromptTuningConfig(num_virtual_tokens=3),
], ids=lambda c: c.peft_type)
def test_bf16_autocast_training(config):
    """Under torch.autocast the fused ops get bf16 inputs, as F.linear would; the fp32 adapter
    parameters get finite fp32 gradients and the loss stays near the fp32 one."""
    model = fastpeft.patch(tiny_model("llama"), config)
    model.train()
    ids = tiny_inputs()
    torch.manual_seed(3)
    fp32 = model(ids, labels=ids).loss.item()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - fp32) < 0.02 * fp32
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
