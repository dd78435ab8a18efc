"""IA3Linear against the installed peft: same parameter names and shapes, same logits and
gradients given the same vectors, and merge / unmerge / unpatch as peft does them."""

import copy

import peft
import pytest
import torch
from _models import build, input_ids, outputs, params_changed_by_one_step

import fastpeft
from fastpeft.tuners.ia3 import IA3Linear, is_feedforward

FAMILIES = ["llama", "gpt2", "gpt_neox", "bert"]
# Explicit (target_modules, feedforward_modules) per family, beside peft's defaults.
EXPLICIT = {
    "llama": (["q_proj", "v_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"]),
    "gpt2": (["c_attn", "c_fc", "mlp.c_proj"], ["c_fc"]),
    "gpt_neox": (["query_key_value", "dense", "dense_h_to_4h"], ["dense_h_to_4h"]),
    "bert": (["query", "intermediate.dense", "output.dense"], ["intermediate.dense"]),
}
ATOL = 1e-5


def ia3_kwargs(family, targets):
    if targets == "default":
        return {}
    if targets == "regex":  # a str is a regex on the whole path, for both fields
        return {"target_modules": r".*\.(k_proj|v_proj|down_proj)",
                "feedforward_modules": r".*\.mlp\.down_proj"}
    target, ff = EXPLICIT[family]
    return {"target_modules": target, "feedforward_modules": ff}


def peft_ia3(family, seed=0, **kwargs):
    """(base model, fastpeft-patched copy, peft model) with the same random ia3_l vectors."""
    base = build(family, seed)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.IA3Config(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(kwargs)))
    copy_random_vectors(ours, theirs, "default", seed)
    return base, ours, theirs


def copy_random_vectors(ours, theirs, adapter, seed):
    g = torch.Generator().manual_seed(seed + 100)
    mine = ia3_vectors(ours, adapter)
    peft_vectors = {k.removeprefix("base_model.model."): v
                    for k, v in ia3_vectors(theirs, adapter).items()}
    assert sorted(mine) == sorted(peft_vectors)
    with torch.no_grad():
        for key, p in mine.items():
            assert p.shape == peft_vectors[key].shape, key
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            peft_vectors[key].copy_(p)


def ia3_vectors(model, adapter="default"):
    return {n: p for n, p in model.named_parameters() if n.endswith(f"ia3_l.{adapter}")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", ["default", "explicit"])
def test_logits_and_gradients_match_peft(family, targets):
    base, ours, theirs = peft_ia3(family, **ia3_kwargs(family, targets))
    ids = input_ids()
    with torch.no_grad():
        base_out = outputs(base, ids)
    a, b = outputs(ours, ids), outputs(theirs, ids)
    assert (a - base_out).abs().max() > 1e-2  # the vectors do act
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)

    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    mine = ia3_vectors(ours)
    for key, p in ia3_vectors(theirs).items():
        q = mine[key.removeprefix("base_model.model.")]
        assert q.grad is not None and q.grad.abs().max() > 0, key
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(mine)


def test_regex_targets_match_peft():
    base, ours, theirs = peft_ia3("llama", **ia3_kwargs("llama", "regex"))
    ids = input_ids()
    shapes = {k: tuple(v.shape) for k, v in ia3_vectors(ours).items()}
    assert shapes["model.layers.0.mlp.down_proj.ia3_l.default"] == (1, 48)
    assert shapes["model.layers.0.self_attn.k_proj.ia3_l.default"] == (16, 1)
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), atol=ATOL, rtol=0)


def test_feedforward_list_is_matched_by_suffix_as_peft_does():
    # peft tests key.endswith(name) without a "." boundary: "proj" makes down_proj feed-forward.
    assert is_feedforward("model.layers.0.mlp.down_proj", ["proj"])
    assert not is_feedforward("model.layers.0.mlp.down_proj", ["up_proj"])
    assert is_feedforward("a.mlp.down_proj", r".*mlp\.down_proj")
    assert not is_feedforward("a.mlp.down_proj", r"down_proj")  # a regex matches the whole path
    _, ours, theirs = peft_ia3("llama", target_modules=["down_proj", "proj"],
                               feedforward_modules=["proj"])
    assert ia3_vectors(ours)["model.layers.0.mlp.down_proj.ia3_l.default"].shape == (1, 48)
    ids = input_ids()
    torch.testing.assert_close(outputs(ours, ids), outputs(theirs, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_init_matches_peft(family):
    base = build(family)
    ids = input_ids()
    # True: ones, the model's outputs are the base ones.
    ones = fastpeft.patch(copy.deepcopy(base), fastpeft.IA3Config())
    assert all(torch.equal(p, torch.ones_like(p)) for p in ia3_vectors(ones).values())
    with torch.no_grad():
        torch.testing.assert_close(outputs(ones, ids), outputs(base, ids), atol=1e-6, rtol=0)
    # False: peft's randn draws, in the same order, so the same seed gives the same vectors.
    torch.manual_seed(5)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.IA3Config(init_ia3_weights=False))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False))
    peft_vectors = ia3_vectors(theirs)
    for key, p in ia3_vectors(ours).items():
        assert torch.equal(p, peft_vectors["base_model.model." + key]), key
    assert not all(torch.equal(p, torch.ones_like(p)) for p in ia3_vectors(ours).values())


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_unpatch(family):
    base, ours, theirs = peft_ia3(family, **ia3_kwargs(family, "explicit"))
    ids = input_ids()
    with torch.no_grad():
        base_out, adapted = outputs(base, ids), outputs(ours, ids)

        fastpeft.merge(ours, unload=False)
        theirs.base_model.merge_adapter()
        merged = {k: v for k, v in ours.state_dict().items() if ".base_layer." in k}
        peft_merged = theirs.state_dict()
        for key, value in merged.items():  # W (and, on k / v layers, b) scaled as peft scales them
            torch.testing.assert_close(value, peft_merged["base_model.model." + key],
                                       atol=1e-6, rtol=1e-6)
        assert any(not torch.equal(v, base.state_dict()[k.replace(".base_layer", "")])
                   for k, v in merged.items())
        torch.testing.assert_close(outputs(ours, ids), adapted, atol=ATOL, rtol=0)

        fastpeft.unmerge(ours)
        theirs.base_model.unmerge_adapter()
        peft_unmerged = theirs.state_dict()
        for key, value in ours.state_dict().items():
            if ".base_layer." in key:
                torch.testing.assert_close(value, peft_unmerged["base_model.model." + key],
                                           atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(outputs(ours, ids), adapted, atol=ATOL, rtol=0)

        plain = fastpeft.merge(copy.deepcopy(ours))  # merge and unload
        assert not any(isinstance(m, IA3Linear) for m in plain.modules())
        torch.testing.assert_close(outputs(plain, ids), adapted, atol=ATOL, rtol=0)

        fastpeft.merge(ours, unload=False)
        restored = fastpeft.unpatch(ours)  # unmerges first
        assert not any(isinstance(m, IA3Linear) for m in restored.modules())
        torch.testing.assert_close(outputs(restored, ids), base_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_disable_adapter_gives_base_outputs(family):
    base, ours, _ = peft_ia3(family)
    ids = input_ids()
    with torch.no_grad():
        base_out = outputs(base, ids)
        with fastpeft.disable_adapter(ours):
            torch.testing.assert_close(outputs(ours, ids), base_out, atol=0, rtol=0)
        assert (outputs(ours, ids) - base_out).abs().max() > 1e-2
        fastpeft.merge(ours, unload=False)  # a disabled forward unmerges, as in peft
        with fastpeft.disable_adapter(ours):
            torch.testing.assert_close(outputs(ours, ids), base_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_active_adapters_multiply_as_peft(family):
    base, ours, theirs = peft_ia3(family)
    fastpeft.add_adapter(ours, fastpeft.IA3Config(), "other")
    theirs.add_adapter("other", peft.IA3Config())
    copy_random_vectors(ours, theirs, "other", seed=7)
    fastpeft.set_adapter(ours, ["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    ids = input_ids()
    with torch.no_grad():
        both = outputs(ours, ids)
        torch.testing.assert_close(both, outputs(theirs, ids), atol=ATOL, rtol=0)
        fastpeft.set_adapter(ours, "default")
        assert (outputs(ours, ids) - both).abs().max() > 1e-2


def test_training_step_changes_only_the_vectors():
    _, ours, _ = peft_ia3("llama")
    assert params_changed_by_one_step(ours) == set(ia3_vectors(ours))


def test_forward_goes_through_the_fused_op(monkeypatch):
    _, ours, _ = peft_ia3("gpt2")
    calls = []
    op = fastpeft.ops.ia3_linear
    monkeypatch.setattr(fastpeft.ops, "ia3_linear", lambda *a: calls.append(a[4]) or op(*a))
    with torch.no_grad():
        ours(input_ids())
    assert sorted(calls) == [False, False, True, True]  # c_attn (k, v-like) and mlp.c_proj
