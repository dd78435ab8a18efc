"""model.generate (greedy, KV cache) with every prompt-learning method gives the tokens of
greedy decoding with peft's own model by full forwards.

The reference is peft's forward, not peft's generate: with transformers 5 (which hands the cache
to the model as `cache`), peft 0.21's prepare_inputs_for_generation never sees the cache and
re-injects the virtual tokens (prompt tuning) or a fresh prefix-only cache (prefix tuning) at
every step, so its cached generate disagrees with its own forward (checked below)."""

import peft
import pytest
import torch
from _models import build, input_ids, left_padded_mask
from _prompt import greedy_reference, peft_pair

N, STEPS = 3, 8

CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix_projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
        encoder_hidden_size=12),
}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_gives_peft_tokens(family, method):
    reference, ours = peft_pair(family, CONFIGS[method]())
    ids, mask = input_ids(batch=3, seq=6, seed=4), left_padded_mask(3, 6)
    want = greedy_reference(reference, ids, mask, STEPS, positions=method.startswith("prefix"))
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
    assert torch.equal(got, want)
    without_cache = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS,
                                  do_sample=False, use_cache=False)
    assert torch.equal(without_cache, want)
    base = greedy_reference(build(family), ids, mask, STEPS, positions=False)
    assert not torch.equal(got, base)  # the adapter changes what is generated


def test_peft_generate_disagrees_with_its_own_forward():
    """Why the reference above is peft's forward (if this starts failing, peft's generate is
    fixed and can be compared directly)."""
    reference, _ = peft_pair("llama", CONFIGS["prompt"]())
    ids, mask = input_ids(batch=3, seq=6, seed=4), left_padded_mask(3, 6)
    want = greedy_reference(reference, ids, mask, STEPS, positions=False)
    got = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS,
                             do_sample=False)
    assert not torch.equal(got, want)
