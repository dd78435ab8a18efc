"""fastpeft.data packing: best-fit decreasing bins, position_ids reset per sample, and a packed
batch giving the same per-sample logits and loss as the unpacked samples on a tiny random
Llama (sdpa and eager), through transformers' position_ids detection (use_cache=False) or the
explicit 4D mask."""

import random

import pytest
import torch
import torch.nn.functional as F
from _models import VOCAB, tiny_model
from _tokenizer import example, smollm2_tokenizer
from fastpeft.data import (
    Collator,
    best_fit_bins,
    load_sft_dataset,
    pack,
    packed_attention_mask,
)


def test_best_fit_bins_fill_and_keep_every_item():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)]
    bins = best_fit_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    lower = -(-sum(lengths) // 64)
    assert len(bins) <= 11 / 9 * lower + 1  # within best-fit decreasing's guarantee
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert sum(load <= 32 for load in loads) <= 1  # no two bins could have been merged
    assert best_fit_bins([5, 3, 4, 4], 8) == [[0, 1], [2, 3]]  # best fit, not first fit
    with pytest.raises(ValueError, match="more than max_length=8"):
        best_fit_bins([9], 8)


def test_pack_resets_positions_and_masks_sample_starts():
    tok = smollm2_tokenizer()
    examples, _ = load_sft_dataset(example("text.jsonl"), tok, max_length=128)
    packed, stats = load_sft_dataset(example("text.jsonl"), tok, max_length=128, packing=True)
    assert stats.examples == len(packed) < len(examples)
    assert sum(len(r["seq_lens"]) for r in packed) == len(examples)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            assert row["labels"][start] == -100
            ids = row["input_ids"][start : start + n]
            assert row["labels"][start + 1 : start + n] == ids[1:]
            seen.append(ids)
            start += n
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)


def synthetic_examples(n=7, seed=0):
    g = random.Random(seed)
    out = []
    for _ in range(n):
        length = g.randint(3, 12)
        ids = [g.randrange(2, VOCAB) for _ in range(length)]
        prompt = g.randint(0, length - 1)
        out.append(
            {
                "input_ids": ids,
                "labels": [-100] * prompt + ids[prompt:],
                "attention_mask": [1] * length,
            }
        )
    return out


def token_losses(logits, labels):
    """Per-position next-token CE (0 where the shifted label is -100): [T-1]."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("how", ["position_ids", "block_mask"])
def test_packed_batch_matches_unpacked(attn, how):
    model = tiny_model("llama")
    model.config._attn_implementation = attn
    examples = synthetic_examples()
    rows = pack(examples, 24)
    assert len(rows) < len(examples)
    batch = Collator(pad_token_id=0, block_mask=how == "block_mask")(rows)
    assert ("attention_mask" in batch) == (how == "block_mask")
    kwargs = {"use_cache": False} if how == "position_ids" else {}
    with torch.no_grad():
        packed_logits = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch.get("attention_mask"),
            **kwargs,
        ).logits
        total_packed = sum(
            token_losses(packed_logits[r], batch["labels"][r]).sum() for r in range(len(rows))
        )
        total = 0.0
        by_ids = {}
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logits = model(ids).logits[0]
            by_ids.setdefault(tuple(e["input_ids"]), logits)
            total = total + token_losses(logits, torch.tensor(e["labels"])).sum()
    for r, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            ids = tuple(row["input_ids"][start : start + n])
            torch.testing.assert_close(
                packed_logits[r, start : start + n], by_ids[ids], atol=1e-5, rtol=1e-5
            )
            start += n
    torch.testing.assert_close(total_packed, total, atol=1e-4, rtol=1e-5)
    # The model's own loss (mean over trained tokens) agrees too.
    n_trained = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    with torch.no_grad():
        loss = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
            **kwargs,
        ).loss
    torch.testing.assert_close(loss, total / n_trained, atol=1e-5, rtol=1e-5)


def test_default_cache_turns_packing_detection_off():
    """Why the trainers pass use_cache=False (or the 4D mask): with the config's default
    use_cache=True, transformers makes a cache and then does not read sample boundaries from
    position_ids, so packed samples attend to each other."""
    model = tiny_model("llama")
    rows = pack(synthetic_examples(), 24)
    batch = Collator(pad_token_id=0)(rows)
    with torch.no_grad():
        leaky = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
        isolated = model(
            batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    assert not torch.allclose(leaky, isolated, atol=1e-3)


def test_packed_attention_mask_is_block_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = packed_attention_mask(pos)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert packed_attention_mask(pos, torch.bfloat16).dtype == torch.bfloat16


def test_collator_pads_packed_rows_as_their_own_sample():
    rows = pack(synthetic_examples(), 24)
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    t = batch["input_ids"].shape[1]
    assert t % 8 == 0 and "attention_mask" not in batch
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["position_ids"][r].tolist() == row["position_ids"] + list(range(t - n))
        assert (batch["labels"][r, n:] == -100).all()
    with pytest.raises(ValueError, match="padded on the right"):
        Collator(padding_side="left")(rows)


def test_packed_batch_through_fastpeft_fused_loss():
    """The loss a patched model computes with linear_cross_entropy (train mode) on a packed
    batch equals the unpacked mean loss."""
    import fastpeft

    model = tiny_model("llama")
    examples = synthetic_examples()
    with torch.no_grad():
        total = sum(
            token_losses(
                model(torch.tensor([e["input_ids"]])).logits[0], torch.tensor(e["labels"])
            ).sum()
            for e in examples
        )
    n_trained = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules="all-linear")).train()
    batch = Collator()(pack(examples, 24))
    out = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
        use_cache=False,
    )
    assert out.logits is None  # the fused path ran
    torch.testing.assert_close(out.loss.detach(), total / n_trained, atol=1e-5, rtol=1e-5)
