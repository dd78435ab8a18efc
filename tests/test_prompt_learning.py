"""Prompt tuning and P-tuning on tiny random models, against the installed peft: the filled-in
config, the encoders and their init, logits (num_virtual_tokens + T positions), labels, the
trainable parameters, disable_adapter and unpatch."""

import copy
import warnings

import peft
import pytest
import torch
from _models import build, input_ids, left_padded_mask, outputs
from _prompt import peft_pair

import fastpeft
from fastpeft.tuners import prompt

N = 3

METHODS = {
    "prompt": lambda task="CAUSAL_LM": peft.PromptTuningConfig(task_type=task,
                                                                num_virtual_tokens=N),
    "ptuning_mlp": lambda task="CAUSAL_LM": peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_hidden_size=20),
    "ptuning_lstm": lambda task="CAUSAL_LM": peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_hidden_size=12,
        encoder_reparameterization_type="LSTM"),
}
FILLED = ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules",
          "encoder_hidden_size")


@pytest.mark.parametrize("method", [*METHODS, "prefix"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_config_filled_like_peft(family, method):
    pc = (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
          if method == "prefix" else METHODS[method]())
    reference, ours = peft_pair(family, pc)
    theirs, mine = reference.peft_config["default"], ours._fastpeft.configs["default"]
    for key in FILLED:
        if hasattr(mine, key):
            assert getattr(mine, key) == getattr(theirs, key), key
    if family == "llama" and method == "prefix":  # GQA: 2 kv heads of width 8
        assert (mine.token_dim, mine.num_attention_heads) == (16, 2)
    assert pc.num_layers is None  # the caller's config is not changed


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_peft(family, method, padded):
    reference, ours = peft_pair(family, METHODS[method]())
    ids = input_ids(batch=3, seq=6)
    mask = left_padded_mask(3, 6) if padded else None
    with torch.no_grad():
        want = outputs(reference, ids, attention_mask=mask)
        got = outputs(ours, ids, attention_mask=mask)
        with fastpeft.disable_adapter(ours):
            base = outputs(ours, ids, attention_mask=mask)
    assert got.shape == (3, N + 6, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert base.shape == (3, 6, 64)
    with torch.no_grad():
        plain = outputs(build(family), ids, attention_mask=mask)
    torch.testing.assert_close(base, plain, atol=0, rtol=0)
    assert (got[:, N:] - base).abs().max() > 1e-3  # the virtual tokens change the outputs


def test_encoder_only_model_matches_peft():
    reference, ours = peft_pair("bert", METHODS["prompt"]("FEATURE_EXTRACTION"))
    ids, mask = input_ids(), left_padded_mask()
    with torch.no_grad():
        want = outputs(reference, ids, attention_mask=mask)
        got = outputs(ours, ids, attention_mask=mask)
    assert got.shape == (2 * 2 + 2 * (N + 7) * 32,)  # classifier logits + hidden states
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_and_gradients_match_peft(method):
    reference, ours = peft_pair("llama", METHODS[method]())
    reference.train(), ours.train()
    ids, mask = input_ids(), left_padded_mask()
    labels = ids.masked_fill(mask == 0, -100)
    want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward(), got.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    theirs = dict(reference.prompt_encoder.default.named_parameters())
    for name, p in ours.prompt_encoder.default.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-5)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"prompt_encoder.default.{n}" for n in theirs)


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_prompt_tuning_init_like_peft(init):
    pc = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                 prompt_tuning_init=init)
    base = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        reference = peft.get_peft_model(base, copy.deepcopy(pc))
    model = build("llama")
    torch.manual_seed(3)
    ours = fastpeft.patch(model, pc)
    want = reference.prompt_encoder.default.embedding.weight
    got = ours.prompt_encoder.default.embedding.weight
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if init == "SAMPLE_VOCAB":  # rows are word embeddings
        words = model.get_input_embeddings().weight
        assert all(any(torch.equal(row, w) for w in words) for row in got)


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm"])
def test_ptuning_init_like_peft(method):
    base = build("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        reference = peft.get_peft_model(base, METHODS[method]())
    model = build("gpt2")
    torch.manual_seed(3)
    ours = fastpeft.patch(model, METHODS[method]())
    want = reference.prompt_encoder.default.state_dict()
    got = ours.prompt_encoder.default.state_dict()
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def _tokenizer_dir(tmp_path):  # a word-level tokenizer, ids 5.. for the words
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "classify", "the", "review", "as", "good", "or", "bad"]
    tok = Tokenizer(models.WordLevel({w: i + 5 for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    return str(tmp_path), fast


@pytest.mark.parametrize("n", [3, 8])
def test_prompt_tuning_text_init_like_peft(tmp_path, n):
    from transformers import AutoTokenizer

    path, _ = _tokenizer_dir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "classify the review as good or bad"
    pc = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                 prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                 tokenizer_name_or_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(build("llama"), copy.deepcopy(pc))
    want = reference.prompt_encoder.default.embedding.weight
    words = build("llama").get_input_embeddings().weight
    ids = [6, 7, 8, 9, 10, 11, 12]
    torch.testing.assert_close(want, words[(ids * 2)[:n]])  # peft repeats / cuts the text
    ours = fastpeft.patch(build("llama"), pc)
    torch.testing.assert_close(ours.prompt_encoder.default.embedding.weight, want, atol=0, rtol=0)
    config = fastpeft.PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                         prompt_tuning_init_text=text,
                                         tokenizer_name_or_path=tokenizer)  # a tokenizer object
    ours = fastpeft.patch(build("llama"), config)
    torch.testing.assert_close(ours.prompt_encoder.default.embedding.weight, want, atol=0, rtol=0)
    assert ours._fastpeft.configs["default"].to_dict()["tokenizer_name_or_path"] == path


def test_position_and_token_type_ids_are_dropped_as_in_peft():
    _, ours = peft_pair("gpt2", METHODS["prompt"]())
    ids = input_ids()
    with torch.no_grad():
        want = outputs(ours, ids)
        with pytest.warns(UserWarning, match="position_ids"):
            got = outputs(ours, ids, position_ids=torch.arange(7).flip(0)[None])
        with pytest.warns(UserWarning, match="token_type_ids"):
            got2 = outputs(ours, ids, token_type_ids=torch.ones_like(ids))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got2, want, atol=0, rtol=0)


def test_positional_arguments_and_inputs_embeds():
    _, ours = peft_pair("llama", METHODS["ptuning_mlp"]())
    ids, mask = input_ids(), left_padded_mask()
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask).logits
        embeds = ours.get_input_embeddings()(ids)
        got2 = ours(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got2, want, atol=0, rtol=0)


def test_unpatch_restores_the_base_model():
    model = build("llama")
    ids = input_ids()
    with torch.no_grad():
        base = outputs(model, ids)
    fastpeft.patch(model, METHODS["ptuning_lstm"]())
    assert hasattr(model, "prompt_encoder")
    fastpeft.unpatch(model)
    assert not hasattr(model, "prompt_encoder")
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, ids), base, atol=0, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="token_dim must be the model's embedding width 32, "
                                         "got 16"):
        fastpeft.patch(build("llama"),
                       fastpeft.PromptTuningConfig(num_virtual_tokens=2, token_dim=16))
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"a": 1})
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        fastpeft.PTuningConfig(num_virtual_tokens=0)
    _, ours = peft_pair("llama", METHODS["prompt"]())
    with pytest.raises(ValueError,
                       match=r"attention_mask must be 2-D \[batch, seq\].*\(2, 1, 7, 7\)"):
        ours(input_ids=input_ids(), attention_mask=torch.ones(2, 1, 7, 7))
    with pytest.raises(ValueError, match="needs input_ids or inputs_embeds"):
        ours(attention_mask=torch.ones(2, 7))
    assert prompt.adapter_parameters(ours, "missing") == []
