"""The LoRA layer of fastpeft.patch against the installed peft: the same weights copied into
peft's model (state dict with the 'base_model.model.' prefix, strict) give the same logits,
gradients and trainable parameters, for each LoraConfig option, DoRA, several active adapters,
mixed batches, weighted combinations, and merge / unmerge."""

import copy
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from _models import build, input_ids, outputs, params_changed_by_one_step

import fastpeft
from fastpeft.tuners.base import TunerLayer
from fastpeft.tuners.lora import LoraLinear

ATOL = 1e-5


def _randomize_adapters(model: torch.nn.Module) -> None:
    """Random lora_A / lora_B and magnitudes, so every adapter changes the output."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _pair(family: str, adapters: dict[str, dict], randomize: bool = True):
    """(fastpeft model, peft model) with the same base and adapter weights."""
    base = build(family)  # random biases too, so bias handling shows
    theirs_base = copy.deepcopy(base)
    (first, first_kw), *rest = adapters.items()
    ours = fastpeft.patch(base, fastpeft.LoraConfig(**first_kw), first)
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**first_kw), adapter_name=first)
    theirs.eval()  # peft's wrappers start in training mode
    for name, kw in rest:
        fastpeft.add_adapter(ours, fastpeft.LoraConfig(**kw), name)
        theirs.add_adapter(name, peft.LoraConfig(**kw))
    if randomize:
        _randomize_adapters(ours)
    _load_into_peft(ours, theirs)
    return ours, theirs


def _load_into_peft(ours, theirs) -> None:
    state = {"base_model.model." + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)


def _trainable(model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, p in model.named_parameters()
                  if p.requires_grad)


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n.removeprefix("base_model.model."): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_match(ours, theirs, ids) -> None:
    mine, ref = _grads(ours, ids), _grads(theirs, ids)
    assert sorted(mine) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=ATOL, rtol=0, msg=name)


def _layers(model) -> dict[str, LoraLinear]:
    return {k: m for k, m in model.named_modules() if isinstance(m, LoraLinear)}


CONFIGS = {
    "list": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "regex": ("llama", dict(target_modules=r"model\.layers\.\d+\.mlp\.(up|down)_proj")),
    "all-linear-gpt2": ("gpt2", dict(target_modules="all-linear")),
    "exclude": ("llama", dict(target_modules="all-linear",
                              exclude_modules=["o_proj", "gate_proj"])),
    "layers": ("llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1],
                             layers_pattern="layers")),
    "patterns-rslora": ("llama", dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}, alpha_pattern={"k_proj": 3},
    )),
    "dora": ("llama", dict(target_modules="all-linear", use_dora=True, r=4, lora_alpha=6)),
    "dora-gpt2": ("gpt2", dict(target_modules="all-linear", use_dora=True)),
    "bias-all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "bias-lora-only": ("gpt2", dict(target_modules=["c_attn"], bias="lora_only")),
    "dora-bias-lora-only": ("gpt2", dict(target_modules=["c_attn", "c_proj"], bias="lora_only",
                                         use_dora=True)),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_config_matches_peft(case):
    family, kw = CONFIGS[case]
    ours, theirs = _pair(family, {"default": kw})
    ids = input_ids()
    assert _trainable(ours) == _trainable(theirs)
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), atol=ATOL, rtol=0)
    _assert_grads_match(ours, theirs, ids)


def test_bias_options_train_the_right_biases():
    ours_all, _ = _pair("gpt2", {"default": dict(target_modules=["c_attn"], bias="all")})
    ours_lora, _ = _pair("gpt2", {"default": dict(target_modules=["c_attn"], bias="lora_only")})
    all_biases = {n for n in _trainable(ours_all) if n.endswith("bias")}
    lora_biases = {n for n in _trainable(ours_lora) if n.endswith("bias")}
    assert lora_biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)}
    assert lora_biases < all_biases and "transformer.ln_f.bias" in all_biases


def test_init_true_and_dora_start_as_the_base_model():
    ids = input_ids()
    base = outputs(build("llama"), ids)
    for kw in (dict(), dict(use_dora=True), dict(init_lora_weights="gaussian")):
        config = fastpeft.LoraConfig(target_modules="all-linear", **kw)
        model = fastpeft.patch(build("llama"), config)
        torch.testing.assert_close(outputs(model, ids), base, atol=ATOL, rtol=0)
        for layer in _layers(model).values():
            a = layer.lora_A["default"].weight
            assert not layer.lora_B["default"].weight.any() and a.any()
            if not kw:  # kaiming_uniform(a=sqrt(5)): bound 1 / sqrt(in_features)
                assert a.abs().max() <= 1 / math.sqrt(layer.in_features)


def test_gaussian_init_std_is_one_over_r():
    model = fastpeft.patch(build("llama"), fastpeft.LoraConfig(r=4, init_lora_weights="gaussian",
                                                               target_modules="all-linear"))
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in _layers(model).values()])
    assert abs(a.std().item() - 1 / 4) < 0.02


def test_init_false_is_not_a_no_op():
    ids = input_ids()
    model = fastpeft.patch(build("llama"), fastpeft.LoraConfig(init_lora_weights=False))
    assert all(m.lora_B["default"].weight.any() for m in _layers(model).values())
    assert (outputs(model, ids) - outputs(build("llama"), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_magnitude_starts_at_column_norm_like_peft(family):
    kw = dict(target_modules="all-linear", use_dora=True, init_lora_weights=False, r=4,
              lora_alpha=8)
    ours = fastpeft.patch(build(family), fastpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(build(family), peft.LoraConfig(**kw))

    def expected(w, a, b, scaling):
        return torch.linalg.norm(w + scaling * (b @ a), dim=1)

    for key, layer in _layers(ours).items():
        w = layer.base_weight()
        got = layer.lora_magnitude_vector["default"].weight
        assert got.shape == (layer.out_features,)
        want = expected(w, layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        ref = theirs.base_model.model.get_submodule(key)
        w_ref = ref.base_layer.weight.t() if ref.fan_in_fan_out else ref.base_layer.weight
        torch.testing.assert_close(ref.lora_magnitude_vector["default"].weight,
                                   expected(w_ref, ref.lora_A["default"].weight,
                                            ref.lora_B["default"].weight, 2.0), atol=1e-6, rtol=0)


def test_dora_dropout_in_training_drops_the_input_of_both_terms():
    layer = LoraLinear(torch.nn.Linear(8, 6))
    layer.update_layer("d", fastpeft.LoraConfig(r=2, lora_alpha=4, use_dora=True, lora_dropout=0.5,
                                                init_lora_weights=False), "proj")
    layer.set_adapter(["d"])
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].weight.mul_(1.5)
    x = torch.randn(3, 8)
    torch.manual_seed(7)
    y = layer.train()(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, True)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["d"].weight, layer.lora_B["d"].weight
    scale = layer.lora_magnitude_vector["d"].weight / torch.linalg.norm(w + 2.0 * (b @ a), dim=1)
    expected = (F.linear(x, w, bias) + (scale - 1) * F.linear(xd, w)
                + scale * 2.0 * (xd @ a.t() @ b.t()))
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)


MULTI = {
    "a": dict(r=4, target_modules="all-linear"),
    "b": dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], use_dora=True),
    "c": dict(r=3, target_modules=["k_proj", "down_proj"], layers_to_transform=[0]),
}


@pytest.mark.parametrize("active", [["a", "b", "c"], ["b", "a"], ["c", "a"]])
def test_several_active_adapters_sum_like_peft(active):
    ours, theirs = _pair("llama", MULTI)
    fastpeft.set_adapter(ours, active)
    theirs.base_model.set_adapter(active)
    ids = input_ids()
    assert _trainable(ours) == _trainable(theirs)
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), atol=ATOL, rtol=0)
    _assert_grads_match(ours, theirs, ids)


MIXED = {
    "llama": {
        "a": dict(r=4, target_modules="all-linear"),
        "b": dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        "c": dict(r=3, target_modules=["k_proj", "down_proj"], use_rslora=True),
    },
    "gpt2": {
        "a": dict(r=4, target_modules="all-linear"),
        "b": dict(r=2, lora_alpha=5, target_modules=["c_attn"], layers_to_transform=[1]),
        "c": dict(r=3, target_modules=["c_fc"], use_rslora=True),
    },
}
ROWS = ["a", "b", "__base__", "c", "a"]


def _per_row(model, ids, rows, run):
    outs = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with fastpeft.disable_adapter(model):
                outs.append(run(model, ids[i : i + 1]))
        else:
            fastpeft.set_adapter(model, name)
            outs.append(run(model, ids[i : i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_batch_equals_per_row_runs_and_peft(family):
    ours, theirs = _pair(family, MIXED[family])
    ids = input_ids(batch=len(ROWS))
    got = ours(ids, adapter_ids=ROWS).logits
    expected = _per_row(ours, ids, ROWS, lambda m, x: m(x).logits)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    ref = theirs(ids, adapter_names=ROWS).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    with fastpeft.disable_adapter(ours):
        base = ours(ids).logits
    adapted = [i for i, name in enumerate(ROWS) if name != "__base__"]
    assert ((got - base).abs().amax(dim=(1, 2))[adapted] > 1e-3).all()
    # gradients through lora_linear_multi equal peft's mixed-batch gradients
    for model in (ours, theirs):
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
    mine = _mixed_grads(ours, ids, adapter_ids=ROWS)
    theirs_grads = _mixed_grads(theirs, ids, adapter_names=ROWS)
    assert sorted(mine) == sorted(theirs_grads)
    for name, g in theirs_grads.items():
        torch.testing.assert_close(mine[name], g, atol=ATOL, rtol=0, msg=name)


def _mixed_grads(model, ids, **kw):
    model.zero_grad()
    model(ids, labels=ids, **kw).loss.backward()
    return {n.removeprefix("base_model.model."): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def test_mixed_batch_generate_equals_per_row_generate():
    ours, _ = _pair("llama", MIXED["llama"])
    ids = input_ids(batch=len(ROWS), seq=5)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=torch.ones_like(ids), adapter_ids=ROWS, **kw)
    expected = _per_row(ours, ids, ROWS,
                        lambda m, x: m.generate(x, attention_mask=torch.ones_like(x), **kw))
    assert got.shape == (len(ROWS), 8)
    assert torch.equal(got, expected)
    logits = ours(ids, adapter_ids=ROWS).logits
    fastpeft.set_adapter(ours, "a")
    # the next forward without adapter_ids runs the active adapter on every row again
    torch.testing.assert_close(ours(ids).logits[0], logits[0], atol=ATOL, rtol=0)
    assert (ours(ids).logits[1] - logits[1]).abs().max() > 1e-3


def test_mixed_batch_with_dropout_in_training_keeps_base_rows():
    ours, _ = _pair("llama", {"a": dict(lora_dropout=0.5), "b": dict(r=2)})
    ids = input_ids(batch=3)
    with fastpeft.disable_adapter(ours):
        base = ours(ids).logits
    ours.train()
    out = ours(ids, adapter_ids=["a", "__base__", "b"]).logits
    torch.testing.assert_close(out[1], base[1], atol=ATOL, rtol=0)
    again = ours(ids, adapter_ids=["a", "__base__", "b"]).logits
    assert (out[0] - again[0]).abs().max() > 1e-4  # a fresh dropout mask on adapter a's row
    torch.testing.assert_close(out[2], again[2], atol=ATOL, rtol=0)  # b has no dropout


def test_mixed_batch_refuses_dora_and_merged_adapters():
    ours, _ = _pair("llama", {"a": dict(), "d": dict(use_dora=True)})
    ids = input_ids(batch=2)
    with pytest.raises(ValueError, match="DoRA"):
        ours(ids, adapter_ids=["a", "d"])
    ours(ids, adapter_ids=["a", "__base__"])
    fastpeft.merge(ours, unload=False)
    with pytest.raises(ValueError, match="merged"):
        ours(ids, adapter_ids=["a", "__base__"])


@pytest.mark.parametrize("combination_type,ranks,weights", [
    ("linear", (4, 4), [0.7, -0.4]),
    ("cat", (4, 2), [0.7, -0.4]),
    ("cat", (3, 5), [1.5, 0.25]),
])
def test_weighted_adapter_matches_peft(combination_type, ranks, weights):
    adapters = {"a": dict(r=ranks[0], lora_alpha=6, target_modules="all-linear"),
                "b": dict(r=ranks[1], target_modules=["q_proj", "v_proj"], use_rslora=True)}
    ours, theirs = _pair("llama", adapters)
    fastpeft.add_weighted_adapter(ours, ["a", "b"], weights, "ab",
                                  combination_type=combination_type)
    theirs.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination_type)
    new_rank = ranks[0] if combination_type == "linear" else sum(ranks)
    config = fastpeft.patching.state_of(ours).configs["ab"]
    assert (config.r, config.lora_alpha) == (new_rank, new_rank)
    for key, layer in _layers(ours).items():
        ref = theirs.base_model.model.get_submodule(key)
        delta = layer.delta_weight("ab")
        torch.testing.assert_close(delta, ref.get_delta_weight("ab"), atol=ATOL, rtol=0)
        if combination_type == "cat":  # exact: sum of w_i * scaling_i * B_i A_i
            exact = sum(w * layer.delta_weight(n) for n, w in zip("ab", weights)
                        if n in layer.lora_A)
            torch.testing.assert_close(delta, exact, atol=ATOL, rtol=0)
    fastpeft.set_adapter(ours, "ab")
    theirs.set_adapter("ab")
    ids = input_ids()
    assert _trainable(ours) == _trainable(theirs)
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), atol=ATOL, rtol=0)


def test_weighted_adapter_bad_input():
    ours, _ = _pair("llama", {"a": dict(r=4), "b": dict(r=2)})
    with pytest.raises(ValueError, match="same r|one rank"):
        fastpeft.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(ValueError, match="weights"):
        fastpeft.add_weighted_adapter(ours, ["a", "b"], [1.0], "x", combination_type="cat")
    with pytest.raises(ValueError, match="adapters"):
        fastpeft.add_weighted_adapter(ours, ["a", "zz"], [1.0, 1.0], "x", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type"):
        fastpeft.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "x", combination_type="svd")
    with pytest.raises(ValueError, match="already exists"):
        fastpeft.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "a", combination_type="cat")


MERGE_CASES = {
    "llama": ("llama", {"a": dict(target_modules="all-linear"),
                        "b": dict(r=2, target_modules=["q_proj"])}),
    "llama-dora": ("llama", {"a": dict(target_modules="all-linear"),
                             "b": dict(r=2, target_modules=["q_proj", "down_proj"],
                                       use_dora=True)}),
    "gpt2": ("gpt2", {"a": dict(target_modules="all-linear"),
                      "b": dict(r=2, target_modules=["c_attn"])}),
    "gpt2-dora": ("gpt2", {"a": dict(target_modules="all-linear", use_dora=True),
                           "b": dict(r=2, target_modules=["c_attn"], use_dora=True)}),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_unmerge_and_unload_like_peft(case):
    family, adapters = MERGE_CASES[case]
    ours, theirs = _pair(family, adapters)
    fastpeft.set_adapter(ours, ["a", "b"])
    theirs.base_model.set_adapter(["a", "b"])
    ids = input_ids()
    before = outputs(ours, ids)
    base_weights = {k: m.base_layer.weight.clone() for k, m in _layers(ours).items()}

    fastpeft.merge(ours, unload=False)
    assert all(m.merged_adapters == [n for n in ("a", "b") if n in m.lora_A]
               for m in _layers(ours).values())
    torch.testing.assert_close(outputs(ours, ids), before, atol=ATOL, rtol=0)
    fastpeft.unmerge(ours)
    torch.testing.assert_close(outputs(ours, ids), before, atol=ATOL, rtol=0)
    for k, m in _layers(ours).items():
        torch.testing.assert_close(m.base_layer.weight, base_weights[k], atol=ATOL, rtol=0)

    plain = fastpeft.merge(ours)
    assert not any(isinstance(m, TunerLayer) for m in plain.modules())
    assert not hasattr(plain, "_fastpeft")
    torch.testing.assert_close(outputs(plain, ids), before, atol=ATOL, rtol=0)
    ref = theirs.merge_and_unload()
    theirs_state = ref.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, theirs_state[k], atol=ATOL, rtol=0, msg=k)


def test_disable_adapter_after_merge_gives_the_base_model():
    ours, _ = _pair("llama", {"a": dict(use_dora=True)})
    ids = input_ids()
    with fastpeft.disable_adapter(ours):
        base = outputs(ours, ids)
    fastpeft.merge(ours, unload=False)
    with fastpeft.disable_adapter(ours):
        torch.testing.assert_close(outputs(ours, ids), base, atol=ATOL, rtol=0)


def test_one_training_step_changes_only_lora_parameters():
    ours, _ = _pair("llama", {"default": dict(target_modules="all-linear", use_dora=True, r=4)})
    changed = params_changed_by_one_step(ours)
    assert changed == {n for n, _ in ours.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_base_model_on_cpu(use_dora):
    fp32 = build("llama")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    config = fastpeft.LoraConfig(target_modules="all-linear", init_lora_weights=False,
                                 use_dora=use_dora)
    fastpeft.patch(bf16, config)
    fastpeft.patch(fp32, config)
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = input_ids()
    out = bf16(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16
               for p in bf16.parameters() if p.requires_grad)
    ref = fp32(ids).logits
    assert (out.logits.float() - ref).abs().max() < 0.05 * ref.abs().max()
    merged = fastpeft.merge(bf16)
    assert (merged(ids).logits.float() - ref).abs().max() < 0.05 * ref.abs().max()
