"""train/modeling.py (hidden states, completion log-probs, the scalar head) and models.py
(load_model): against the model's own logits, for every kind of adapter."""

import pytest
import torch
from _models import VOCAB, tiny_model

import fastpeft
from fastpeft.models import load_model, resolve_dtype
from fastpeft.train.modeling import (
    ScalarHead,
    completion_logprobs,
    final_hidden,
    last_token_index,
    lm_parts,
    sequence_scores,
)

CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, target_modules="all-linear",
                                        init_lora_weights="gaussian"),
    "ia3": lambda: fastpeft.IA3Config(),
    "prompt": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "full": lambda: None,
}


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return ids, mask, labels


@pytest.mark.parametrize("method", list(CONFIGS))
def test_completion_logprobs_match_the_models_logits(method):
    model = tiny_model("llama", seed=0)
    config = CONFIGS[method]()
    if config is not None:
        model = fastpeft.patch(model, config)
    ids, mask, labels = _inputs()
    logp, valid = completion_logprobs(model, ids, mask, labels)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, logits.shape[1] - ids.shape[1]:]  # prompt tuning prepends positions
    want = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.equal(valid, labels[:, 1:] != -100)
    torch.testing.assert_close(logp.double(), want * valid, atol=2e-6, rtol=0)
    assert float(logp.detach()[~valid].abs().max()) == 0.0
    logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_final_hidden_honours_disable_adapter():
    model = fastpeft.patch(tiny_model("llama", seed=0), CONFIGS["lora"]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a trained adapter (B starts at zero)
    ids, mask, _ = _inputs()
    base = final_hidden(tiny_model("llama", seed=0), ids, mask)
    adapted = final_hidden(model, ids, mask)
    with fastpeft.disable_adapter(model):
        disabled = final_hidden(model, ids, mask)
    torch.testing.assert_close(disabled, base)
    assert float((adapted - base).detach().abs().max()) > 1e-4


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_sequence_scores_read_the_last_real_token():
    model = tiny_model("llama", seed=0)
    head = ScalarHead(32)
    ids, mask, _ = _inputs()
    scores = sequence_scores(model, head, ids, mask)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = head(hidden[torch.arange(3), torch.tensor([8, 5, 8])])
    torch.testing.assert_close(scores, want)
    assert scores.dtype == torch.float32 and scores.shape == (3,)


def test_lm_parts_refuses_a_classifier():
    with pytest.raises(ValueError, match="expected a causal LM.*BertForSequenceClassification"):
        lm_parts(tiny_model("bert"))


def test_load_model_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of .* got 'fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(FileNotFoundError, match="model: .*not a directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="model must be"):
        load_model("")


def test_load_model_from_a_local_directory(tmp_path):
    from _tokenizer import smollm2_tokenizer

    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path)
    tok = smollm2_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path), dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.config._name_or_path == str(tmp_path)
    assert tokenizer.pad_token_id is not None
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a.to(torch.bfloat16), b, msg=n)
