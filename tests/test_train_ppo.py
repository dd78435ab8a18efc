"""PPOTrainer (fastpeft.train.ppo) on tiny random Llamas with a character tokenizer (64
tokens: pad, EOS and 62 letters / digits): a rule-based reward rises while the KL stays
bounded, the reference is the base model (adapters disabled), reward_fn specs load with clear
errors, a resumed run reproduces the uninterrupted one, missing_eos_penalty; prompts from a
file with the SmolLM2 tokenizer; and a slow run on SmolLM2 itself."""

import json
import os
import random

import pytest
import torch
from _models import VOCAB, tiny_model
from _train import max_diff, trainable
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft
from fastpeft.train import TrainConfig, read_metrics
from fastpeft.train.config import PPOConfig
from fastpeft.train.ppo import PPOTrainer, adaptive_kl_update, check_scores, load_reward_fn

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PAD, EOS = 0, 1
assert len(CHARS) + 2 == VOCAB


class CharTokenizer:
    """Token 0 = pad, 1 = EOS, 2 + i = CHARS[i]."""

    pad_token_id, eos_token_id = PAD, EOS

    def encode(self, text):
        return [2 + CHARS.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(CHARS[i - 2] if i >= 2 else ("" if skip_special_tokens else f"<{i}>")
                       for i in ids)


def prompts(n=64, seed=0):
    g = random.Random(seed)
    tok = CharTokenizer()
    out = []
    for _ in range(n):
        text = "".join(g.choice(CHARS) for _ in range(g.randint(3, 8)))
        out.append({"input_ids": tok.encode(text), "attention_mask": [1] * len(text),
                    "prompt": text})
    return out


def lowercase(prompts, completions):
    """The rule-based reward: the fraction of lowercase letters in the completion."""
    return [sum(c.islower() for c in s) / max(len(s), 1) for s in completions]


def policy(init_seed=0, head=True, **lora):
    """LoRA on every linear layer of the tiny Llama; with head=True also a trainable copy of
    the LM head (a frozen random head after RMSNorm can hardly move the token distribution)."""
    model = tiny_model("llama")
    torch.manual_seed(init_seed)
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear")
    kw.update(lora)
    if head:
        kw["modules_to_save"] = ["lm_head"]
    return fastpeft.patch(model, fastpeft.LoraConfig(**kw))


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=2, batch_size=8, lr=1e-2, progress=False,
                tensorboard=False, plots=False, scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


def ppo_cfg(**kw):
    base = dict(response_length=6, num_ppo_epochs=2, num_mini_batches=2, temperature=1.0)
    base.update(kw)
    return PPOConfig(**base)


def trainer(tmp_path, model=None, reward_fn=lowercase, data=None, train_kw=None, **ppo_kw):
    return PPOTrainer(model if model is not None else policy(), CharTokenizer(),
                      cfg(tmp_path, **(train_kw or {})), ppo_cfg(**ppo_kw),
                      data if data is not None else prompts(), reward_fn=reward_fn)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these small forwards (SmolLM2's too, on a few tokens) run fastest so, and
    many times slower when the threads of several processes contend for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRL_METRICS = ["objective/kl", "objective/entropy", "objective/non_score_reward",
               "objective/scores", "objective/rlhf_reward", "policy/clipfrac_avg",
               "policy/approxkl_avg", "policy/entropy_avg", "val/ratio", "val/clipfrac_avg",
               "loss/policy_avg", "loss/value_avg", "val/num_eos_tokens"]


def test_ppo_raises_a_rule_based_reward_with_bounded_kl(tmp_path):
    t = trainer(tmp_path, train_kw=dict(max_steps=16, batch_size=32, eval_every=16),
                data=prompts(64), kl_coef=0.05, num_ppo_epochs=4)
    t.eval_dataset = prompts(8, seed=1)
    t.train()
    scores = [h["objective/scores"] for h in t.history]
    kls = [h["objective/kl"] for h in t.history]
    # ~0.4 at the start (26 of the 62 characters); over seeds 0-6 the mean of the last 4
    # iterations is 0.65-0.87, 0.2-0.44 above the first 2, and the KL at most 5.5 nats
    assert sum(scores[-4:]) / 4 > sum(scores[:2]) / 2 + 0.12, scores
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # LoRA starts at zero, the head copy equal
    assert max(kls) < 10.0, kls  # nats per sequence, with kl_coef 0.05
    assert all(0 <= h["policy/clipfrac_avg"] <= 1 and h["val/ratio"] > 0 for h in t.history)
    # TRL's metric names, the eval on greedy completions, the outputs
    logged = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in logged] == list(range(1, 17))
    for name in TRL_METRICS + ["loss", "lr", "grad_norm", "objective/kl_coef"]:
        assert name in logged[-1], name
    assert 0 <= logged[-1]["eval/scores"] <= 1
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "peft_type"] == "LORA"
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "value_head.safetensors"))
    torch.testing.assert_close(head["linear.weight"], t.value_head.linear.weight.detach())


def test_reference_is_the_base_model(tmp_path):
    # zero-init LoRA (B = 0): at iteration 0 the policy is the base and the KL is 0
    t = trainer(tmp_path, model=policy(head=False), train_kw=dict(lr=5e-2, max_steps=2))
    t.setup()
    t.model.train()
    batch = t.next_batch()
    rollout, stats = t.make_experience(batch)
    mask = rollout["mask"]
    assert mask[:, 0].all()
    torch.testing.assert_close(rollout["ref_logprobs"][mask], rollout["logprobs"][mask],
                               rtol=0, atol=1e-6)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    # after training the policy moved, the reference did not: it is the untouched base model
    t.train()
    base = tiny_model("llama")
    with torch.no_grad():
        _, expected = t._forward(base, rollout, slice(None), t.ppo.temperature)
        ref = t._reference_logprobs(rollout, slice(None))
        _, now = t._forward(t.model, rollout, slice(None), t.ppo.temperature)
    torch.testing.assert_close(ref[mask], expected[mask], rtol=0, atol=1e-5)
    assert (now - ref)[mask].abs().max() > 1e-3


def test_full_fine_tuning_uses_a_frozen_copy_as_reference(tmp_path):
    t = trainer(tmp_path, model=tiny_model("llama").train(), train_kw=dict(lr=1e-3))
    assert t.ref_model is not None and not any(p.requires_grad
                                               for p in t.ref_model.parameters())
    t.train()
    assert t.history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert t.history[-1]["objective/kl"] != 0.0
    assert max_diff(trainable(t.ref_model.requires_grad_(True)),
                    trainable(tiny_model("llama"))) == 0.0
    assert os.path.isfile(tmp_path / "model" / "config.json")
    assert os.path.isfile(tmp_path / "value_head.safetensors")


def test_bf16_autocast_and_gradient_checkpointing(tmp_path):
    t = trainer(tmp_path, train_kw=dict(dtype="bf16", gradient_checkpointing=True, max_steps=1))
    last = t.train()
    for k in TRL_METRICS + ["loss", "grad_norm"]:
        assert torch.isfinite(torch.tensor(float(last[k]))), (k, last[k])
    assert last["grad_norm"] > 0


@pytest.mark.parametrize("method", ["ia3", "adapter", "prefix", "prompt", "p_tuning"])
def test_other_peft_methods(tmp_path, method):
    config = {"ia3": lambda: fastpeft.IA3Config(),
              "adapter": lambda: fastpeft.AdapterConfig(kind="houlsby"),
              "prefix": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4),
              "prompt": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=4),
              "p_tuning": lambda: fastpeft.PTuningConfig(num_virtual_tokens=4,
                                                         encoder_hidden_size=32)}[method]()
    t = trainer(tmp_path, model=fastpeft.patch(tiny_model("llama"), config),
                train_kw=dict(max_steps=2), num_ppo_epochs=1)
    t.train()
    for h in t.history:
        for k in TRL_METRICS:
            assert torch.isfinite(torch.tensor(float(h[k]))), (k, h[k])
    # the first update starts from the rollout's own log-probs
    assert t.history[0]["val/ratio"] == pytest.approx(1.0, abs=0.02)
    if method in ("ia3", "adapter"):  # identity at init: the policy is the base
        assert abs(t.history[0]["objective/kl"]) < 1e-4


REWARDS = '''
def length(prompts, completions):
    return [float(len(c)) for c in completions]

def wrong_count(prompts, completions):
    return [1.0]

def not_floats(prompts, completions):
    return ["high"] * len(completions)

def with_nan(prompts, completions):
    return [float("nan")] * len(completions)

VALUE = 3
'''


def test_reward_fn_spec_loading_and_errors(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    fn = load_reward_fn(f"{path}:length")
    assert fn(["p"], ["abc"]) == [3.0]
    assert load_reward_fn("json:dumps").__name__ == "dumps"  # "module:function"
    with pytest.raises(ValueError, match="file.py:function"):
        load_reward_fn("no_colon")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_fn(f"{tmp_path}/missing.py:length")
    with pytest.raises(AttributeError, match=r"no 'lenght'.*'length'"):
        load_reward_fn(f"{path}:lenght")
    with pytest.raises(TypeError, match="'VALUE'.*not a function"):
        load_reward_fn(f"{path}:VALUE")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        load_reward_fn("no_such_module_xyz:f")
    # the trainer loads ppo.reward_fn, and checks what the function returns
    t = PPOTrainer(policy(), CharTokenizer(), cfg(tmp_path / "a"),
                   ppo_cfg(reward_fn=f"{path}:length"), prompts(8))
    t.setup()
    rollout, stats = t.make_experience(t.next_batch())
    # pad (0) and EOS (1) decode to nothing; tokens after EOS are padding
    assert stats["objective/raw_scores"] == pytest.approx(
        float((rollout["responses"] >= 2).sum(1).float().mean()))
    for name, error, match in [("wrong_count", ValueError, "returned 1 scores for 8"),
                               ("not_floats", TypeError, "score 0 is 'high'"),
                               ("with_nan", ValueError, "score 0 is nan")]:
        t = PPOTrainer(policy(), CharTokenizer(), cfg(tmp_path / name),
                       ppo_cfg(reward_fn=f"{path}:{name}"), prompts(8))
        with pytest.raises(error, match=f"{name}.*{match}"):
            t.train()
    with pytest.raises(ValueError, match="returned 2 scores for 3"):
        check_scores(torch.zeros(2), 3, "f")
    # a source of scores is required, and only one
    with pytest.raises(ValueError, match="PPO needs scores"):
        PPOTrainer(policy(), CharTokenizer(), cfg(tmp_path), ppo_cfg(), prompts(8))
    with pytest.raises(ValueError, match="one source of scores"):
        PPOTrainer(policy(), CharTokenizer(), cfg(tmp_path), ppo_cfg(reward_fn=f"{path}:length"),
                   prompts(8), reward_fn=lowercase)
    with pytest.raises(ValueError, match="not both"):
        PPOConfig(reward_fn=f"{path}:length", reward_model=str(tmp_path))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be a multiple .* = 4\)"):
        trainer(tmp_path, train_kw=dict(batch_size=6, grad_accum=2))
    data = prompts(8)
    data[3] = {"input_ids": list(range(2, 40))}  # no attention_mask: ones are filled in
    with pytest.raises(ValueError, match="train prompt 3 has 38 tokens, more than max_length=16"):
        PPOTrainer(policy(), CharTokenizer(), cfg(tmp_path), ppo_cfg(), data,
                   max_length=16, reward_fn=lowercase)
    data[3] = {"input_ids": [], "attention_mask": []}
    with pytest.raises(ValueError, match="train prompt 3: no input_ids"):
        trainer(tmp_path, data=data)
    # bare input_ids: an all-ones attention_mask is filled in (the batches are left padded)
    # and the prompt texts the reward function gets are decoded from the ids
    got = []

    def reward(prompts, completions):
        got.extend(prompts)
        return lowercase(prompts, completions)

    data = prompts(8)
    t = trainer(tmp_path, data=[{"input_ids": e["input_ids"]} for e in data], reward_fn=reward,
                train_kw=dict(max_steps=1))
    assert all(e["attention_mask"] == [1] * len(e["input_ids"]) for e in t.train_dataset)
    t.train()
    assert sorted(got) == sorted(e["prompt"] for e in data)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    kw = dict(max_steps=4, save_every=2, keep_last=None, warmup_steps=1, scheduler="linear")
    ppo_kw = dict(adaptive_kl=True, target_kl=0.1, kl_horizon=50, kl_coef=0.1)
    full = trainer(tmp_path / "full", train_kw=kw, **ppo_kw)
    full.train()
    assert full.kl_coef != 0.1  # the controller moved it
    # a different LoRA init and value head: everything trainable comes from the checkpoint
    resumed = trainer(tmp_path / "resumed", model=policy(init_seed=7),
                      train_kw=dict(kw, resume=str(tmp_path / "full" / "checkpoint-2")),
                      **ppo_kw)
    with torch.no_grad():
        resumed.value_head.linear.weight.add_(1.0)
    resumed.train()
    assert [h["step"] for h in resumed.history] == [3, 4]
    for h_full, h_res in zip(full.history[2:], resumed.history):
        for k, v in h_full.items():
            if k not in ("tokens_per_s",):
                assert h_res[k] == pytest.approx(v, abs=1e-6, rel=1e-6), k
    assert resumed.kl_coef == pytest.approx(full.kl_coef, abs=1e-12)
    assert max_diff({n: p.detach() for n, p in full.trainable_parameters()},
                    {n: p.detach() for n, p in resumed.trainable_parameters()}) < 1e-6


def test_adaptive_kl_controller():
    assert adaptive_kl_update(0.1, 12.0, 8, 6.0, 80) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_update(0.1, 0.0, 8, 6.0, 80) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_update(0.1, 6.6, 8, 6.0, 80) == pytest.approx(0.1 * (1 + 0.1 * 0.1))


def test_missing_eos_penalty_and_eos_handling(tmp_path):
    seen = []

    def zero(prompts, completions):
        seen.extend(completions)
        return [0.0] * len(completions)

    # near-uniform sampling over 64 tokens: P(EOS within 24 tokens) ~ 0.3, so both cases occur
    t = trainer(tmp_path, reward_fn=zero, missing_eos_penalty=2.5, response_length=24,
                train_kw=dict(batch_size=32))
    t.setup()
    rollout, stats = t.make_experience(t.next_batch())
    has_eos = rollout["has_eos"]
    assert 0 < int(has_eos.sum()) < 32, has_eos
    torch.testing.assert_close(rollout["scores"].cpu(), -2.5 * (~has_eos).float().cpu())
    assert stats["objective/raw_scores"] == 0.0
    assert stats["val/num_eos_tokens"] == int(has_eos.sum())
    responses, mask, last = rollout["responses"], rollout["mask"], rollout["last"]
    for i in range(32):
        n = int(mask[i].sum())
        assert n == int(last[i]) + 1
        if has_eos[i]:
            # EOS is the last response token (trained, and where the score goes), then padding
            assert int(responses[i, last[i]]) == EOS and (responses[i, n:] == PAD).all()
            assert len(seen[i]) == int((responses[i, :n - 1] >= 2).sum()) and "<" not in seen[i]
        else:
            assert n == responses.shape[1] and len(seen[i]) == int((responses[i] >= 2).sum())


def test_prompts_from_a_file_with_the_smollm2_tokenizer(tmp_path):
    from _tokenizer import example, smollm2_tokenizer

    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)).eval()
    model = fastpeft.patch(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    got = []

    def reward(prompts, completions):
        got.append((prompts, completions))
        return [float(len(c)) / 40 for c in completions]

    t = PPOTrainer(model, tok, cfg(tmp_path, max_steps=1, batch_size=4),
                   ppo_cfg(response_length=4, num_ppo_epochs=1), example("messages.jsonl"),
                   max_length=48, reward_fn=reward)
    assert t.data_stats["train"].examples == 30
    assert all(len(e["input_ids"]) <= 48 for e in t.train_dataset)
    last = t.train()
    prompts_seen, completions = got[0]
    assert len(prompts_seen) == 4 and all("<|im_start|>assistant" in p for p in prompts_seen)
    assert all(isinstance(c, str) for c in completions)
    assert all(torch.isfinite(torch.tensor(last[k])) for k in TRL_METRICS)


def test_scores_from_a_reward_model_directory(tmp_path):
    """ppo.reward_model: a (fully fine-tuned, so it reloads without a hub base) tiny reward
    model written by RewardTrainer scores the completions through load_reward_model."""
    from _tokenizer import example, smollm2_tokenizer

    from fastpeft.train import RewardConfig, RewardTrainer, load_reward_model

    tok = smollm2_tokenizer()

    def tiny(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
            eos_token_id=None, pad_token_id=None))

    rm_dir = tmp_path / "rm"
    RewardTrainer(tiny(1), tok, cfg(rm_dir, max_steps=1, batch_size=2), RewardConfig(),
                  example("preference.jsonl"), max_length=48).train()
    got = []

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, prompts, completions):
            got.append((prompts, completions))
            return self.fn(prompts, completions)

    policy_model = fastpeft.patch(tiny(0), fastpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    t = PPOTrainer(policy_model, tok, cfg(tmp_path / "ppo", max_steps=1, batch_size=2),
                   ppo_cfg(reward_model=str(rm_dir), response_length=4, num_ppo_epochs=1,
                           num_mini_batches=1), example("messages.jsonl"), max_length=48)
    assert t.reward_name == f"reward model {str(rm_dir)!r}"
    t.reward_fn = Spy(t.reward_fn)
    last = t.train()
    (prompts_seen, completions), = got
    expected = load_reward_model(str(rm_dir))(prompts_seen, completions)
    assert last["objective/raw_scores"] == pytest.approx(sum(expected) / 2, abs=1e-5)


def test_two_processes_under_torchrun(tmp_path):
    """Data parallel PPO (tests/_dist_ppo.py): each rank generates for its share of the
    prompts, the gradients are summed over ranks at every mini-batch update, so both ranks
    hold the same weights and kl_coef; only rank 0 writes the logs."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(here, "..", "python"), here,
                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(here, "_dist_ppo.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert max_diff(r0["trainable"], r1["trainable"]) == 0.0
    assert r0["kl_coef"] == r1["kl_coef"] != 0.05
    assert r0["history"][1]["objective/scores"] == r1["history"][1]["objective/scores"]
    logged = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[0]["tokens"] > logged[1]["tokens"]  # 4 prompts, then 1 (rank 0: filler)
    for r in logged:
        for k in TRL_METRICS:
            assert torch.isfinite(torch.tensor(float(r[k]))), (k, r[k])


@pytest.mark.slow
def test_ppo_on_smollm2(smollm2, tmp_path):
    base, tok = smollm2
    # raw prompts (prompt_completion rows, no chat template): short sequences keep it fast
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "completion": " ok"})
                              for p in ("Name a colour:", "Count to three:")))
    model = fastpeft.patch(base, fastpeft.LoraConfig(r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "v_proj"]))
    try:
        t = PPOTrainer(model, tok, cfg(tmp_path / "out", max_steps=2, batch_size=2, lr=1e-3),
                       ppo_cfg(response_length=4, num_ppo_epochs=1, num_mini_batches=1,
                               missing_eos_penalty=1.0),
                       str(path), reward_fn=lambda p, c: [float(len(x)) / 20 for x in c])
        t.train()
        first, second = t.history
        assert first["objective/kl"] == 0.0  # zero-init LoRA: the policy is the reference
        assert second["objective/kl"] != 0.0  # one update later it is not
        for h in t.history:
            assert all(torch.isfinite(torch.tensor(float(h[k]))) for k in TRL_METRICS)
        assert os.path.isfile(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    finally:
        model.zero_grad(set_to_none=True)
        fastpeft.unpatch(model)
