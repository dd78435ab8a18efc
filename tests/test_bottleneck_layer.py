"""BottleneckAdapter (Houlsby / Pfeiffer) against a plain-PyTorch reference of
h + scaling * up(act(down(h))) on each family's output projections."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import build, input_ids, outputs, params_changed_by_one_step

import fastpeft
from fastpeft.tuners.bottleneck import BottleneckAdapter

FAMILIES = ["llama", "gpt2", "gpt_neox", "bert"]
# Per family: (prefix of block i, attention output projection, MLP output projection).
OUTPUTS = {
    "llama": ("model.layers.{}.", "self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("transformer.h.{}.", "attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.{}.", "attention.dense", "mlp.dense_4h_to_h"),
    "bert": ("bert.encoder.layer.{}.", "attention.output.dense", "output.dense"),
}
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_new": lambda z: F.gelu(z, approximate="tanh")}
HIDDEN = 32  # every output projection of the tiny models is hidden -> hidden
ATOL = 1e-5


def expected_paths(family, kind, layers=2):
    block, attn, mlp = OUTPUTS[family]
    names = [attn, mlp] if kind == "houlsby" else [mlp]
    return [block.format(i) + n for i in range(layers) for n in names]


def adapted_paths(model):
    return [k for k, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


def randomize(model, adapter="default", seed=0):
    """Make the adapter's weights and biases large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in n and ".adapter_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def reference_model(base, patched, adapters, activation, scaling):
    """base with forward hooks adding each adapter (in order) after the patched layers."""
    ref = copy.deepcopy(base)
    for path in adapted_paths(patched):
        layer = patched.get_submodule(path)
        params = [(layer.adapter_down[a].weight.detach(), layer.adapter_down[a].bias.detach(),
                   layer.adapter_up[a].weight.detach(), layer.adapter_up[a].bias.detach())
                  for a in adapters]

        def hook(module, args, h, params=params):
            for wd, bd, wu, bu in params:
                h = h + scaling * F.linear(ACTIVATIONS[activation](F.linear(h, wd, bd)), wu, bu)
            return h

        ref.get_submodule(path).register_forward_hook(hook)
    return ref


CASES = [("houlsby", None, "silu", 1.0), ("pfeiffer", None, "relu", 1.0),
         ("houlsby", "gelu_new", "gelu_new", 0.5), ("pfeiffer", "gelu", "gelu", 2.0)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,activation,reference_activation,scaling", CASES)
def test_matches_reference(family, kind, activation, reference_activation, scaling):
    base = build(family)
    config = fastpeft.AdapterConfig(kind=kind, activation=activation, scaling=scaling)
    model = fastpeft.patch(copy.deepcopy(base), config)
    assert adapted_paths(model) == expected_paths(family, kind)
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if ".adapter_" in n}
    path = expected_paths(family, kind)[0]
    assert names[f"{path}.adapter_down.default.weight"] == (HIDDEN // 16, HIDDEN)
    assert names[f"{path}.adapter_down.default.bias"] == (HIDDEN // 16,)
    assert names[f"{path}.adapter_up.default.weight"] == (HIDDEN, HIDDEN // 16)
    assert names[f"{path}.adapter_up.default.bias"] == (HIDDEN,)
    assert len(names) == 4 * len(expected_paths(family, kind))

    randomize(model)
    ids = input_ids()
    ref = reference_model(base, model, ["default"], reference_activation, scaling)
    with torch.no_grad():
        out, base_out = outputs(model, ids), outputs(base, ids)
        assert (out - base_out).abs().max() > 1e-2
        torch.testing.assert_close(out, outputs(ref, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradients_match_reference(family):
    base = build(family)
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.AdapterConfig())
    randomize(model)
    ref = copy.deepcopy(model)  # same weights; its layers run the plain formula below
    for m in ref.modules():
        if isinstance(m, BottleneckAdapter):
            m.forward = lambda x, m=m: plain_forward(m, x)
    ids = input_ids()
    w = torch.randn(outputs(base, ids).shape, generator=torch.Generator().manual_seed(2))
    (outputs(model, ids) * w).sum().backward()
    (outputs(ref, ids) * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    grads = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n, _ in grads} == {n for n in ref_params if ".adapter_" in n}
    for n, p in grads:
        assert p.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, ref_params[n].grad, atol=1e-5, rtol=1e-4)


def plain_forward(layer, x):
    h = layer.base_layer(x)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    return h + up(F.silu(down(h)))


def test_fresh_adapter_is_near_identity_and_init_is_bert_like():
    base = build("llama")
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.AdapterConfig(init_std=1e-2))
    for n, p in model.named_parameters():
        if n.endswith(".bias") and ".adapter_" in n:
            assert torch.equal(p, torch.zeros_like(p)), n
        elif ".adapter_" in n:
            assert 1e-3 < p.std().item() < 3e-2, n
    ids = input_ids()
    with torch.no_grad():
        diff = (outputs(model, ids) - outputs(base, ids)).abs().max().item()
    assert 0 < diff < 1e-3


@pytest.mark.parametrize("reduction_factor,bottleneck", [(2.5, 12), (8, 4), (64, 1)])
def test_bottleneck_width(reduction_factor, bottleneck):
    model = fastpeft.patch(build("gpt2"), fastpeft.AdapterConfig(reduction_factor=reduction_factor))
    layer = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert layer.adapter_down["default"].weight.shape == (bottleneck, HIDDEN)
    assert layer.adapter_up["default"].weight.shape == (HIDDEN, bottleneck)


def test_target_modules_override():
    model = fastpeft.patch(build("llama"), fastpeft.AdapterConfig(target_modules=["o_proj"]))
    assert adapted_paths(model) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_step_changes_only_adapter_parameters(family):
    model = fastpeft.patch(build(family), fastpeft.AdapterConfig())
    changed = params_changed_by_one_step(model, lr=0.5)
    assert changed == {n for n, _ in model.named_parameters() if ".adapter_" in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_and_unpatch_restore_base_exactly(family):
    base = build(family)
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.AdapterConfig())
    randomize(model)
    ids = input_ids()
    with torch.no_grad():
        base_out = outputs(base, ids)
        assert (outputs(model, ids) - base_out).abs().max() > 1e-2
        with fastpeft.disable_adapter(model):
            torch.testing.assert_close(outputs(model, ids), base_out, atol=0, rtol=0)
        restored = fastpeft.unpatch(model)
        assert not adapted_paths(restored)
        assert list(restored.state_dict()) == list(base.state_dict())
        torch.testing.assert_close(outputs(restored, ids), base_out, atol=0, rtol=0)


def test_merge_is_refused():
    model = fastpeft.patch(build("llama"), fastpeft.AdapterConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        fastpeft.merge(model)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()
    assert adapted_paths(model)  # still patched, still usable


def test_several_active_adapters_run_in_sequence():
    base = build("llama")
    model = fastpeft.patch(copy.deepcopy(base), fastpeft.AdapterConfig(kind="pfeiffer"))
    fastpeft.add_adapter(model, fastpeft.AdapterConfig(kind="pfeiffer"), "second")
    randomize(model, "default", seed=0)
    randomize(model, "second", seed=1)
    ids = input_ids()
    with torch.no_grad():
        for order in (["default", "second"], ["second", "default"]):
            fastpeft.set_adapter(model, order)
            ref = reference_model(base, model, order, "relu", 1.0)
            torch.testing.assert_close(outputs(model, ids), outputs(ref, ids), atol=ATOL, rtol=0)
        fastpeft.set_adapter(model, "second")
        ref = reference_model(base, model, ["second"], "relu", 1.0)
        torch.testing.assert_close(outputs(model, ids), outputs(ref, ids), atol=ATOL, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)


@pytest.mark.parametrize("kwargs,argument", [
    ({"kind": "parallel"}, "kind"),
    ({"reduction_factor": 0}, "reduction_factor"),
    ({"reduction_factor": -4}, "reduction_factor"),
    ({"reduction_factor": "16"}, "reduction_factor"),
    ({"activation": "tanh"}, "activation"),
    ({"scaling": "1"}, "scaling"),
    ({"init_std": -0.1}, "init_std"),
])
def test_bad_config_names_the_argument(kwargs, argument):
    value = repr(next(iter(kwargs.values())))
    with pytest.raises(ValueError, match=f"{argument} must .*got {value}"):
        fastpeft.AdapterConfig(**kwargs)
    model = build("llama")
    with pytest.raises(ValueError, match=argument):  # the same from a dict, through patch
        fastpeft.patch(model, {"peft_type": "BOTTLENECK_ADAPTER", **kwargs})
    assert not adapted_paths(model) and not hasattr(model, "_fastpeft")


def test_forward_goes_through_the_fused_op(monkeypatch):
    model = fastpeft.patch(build("gpt_neox"), fastpeft.AdapterConfig())
    calls = []
    op = fastpeft.ops.adapter_bottleneck
    monkeypatch.setattr(fastpeft.ops, "adapter_bottleneck",
                        lambda *a, **k: calls.append(a[5]) or op(*a, **k))
    with torch.no_grad():
        model(input_ids())
    assert calls == ["silu"] * 4
