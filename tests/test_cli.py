"""The `fastpeft` command and its YAML configs (fastpeft.run_config): every config error names
the file and the dotted key (with the closest valid key for an unknown one); the examples
load; `fastpeft sft` trains a tiny Llama end to end; `fastpeft merge` gives the patched
model's logits; a malformed data row exits with status 2 naming its file and line."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from _tokenizer import example, save_tiny_llama, smollm2_tokenizer
from transformers import AutoModelForCausalLM

import fastpeft
from fastpeft import cli
from fastpeft.run_config import ConfigError, load_run_config, parse_override
from fastpeft.train import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {"sft": "sft.yaml", "rm": "rm.yaml", "ppo": "ppo.yaml", "dpo": "dpo.yaml"}


def write_yaml(tmp_path, data, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def base(**blocks) -> dict:
    d = {"model": "smollm2-135m", "data": {"train": "train.jsonl"}}
    d.update(blocks)
    return d


def config_error(tmp_path, data, command="sft", overrides=()) -> str:
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_run_config(path, command, list(overrides))
    assert "Traceback" not in str(e.value)
    return str(e.value)


# ---- loading and validation -----------------------------------------------------------------


def test_a_config_loads_with_the_dataclass_defaults(tmp_path):
    path = write_yaml(tmp_path, base(train={"max_steps": 3}, peft={"r": 4}))
    run = load_run_config(path, "sft")
    assert run.model == "smollm2-135m" and run.method == "lora"
    assert isinstance(run.peft, fastpeft.LoraConfig) and run.peft.r == 4
    assert run.peft.lora_alpha == fastpeft.LoraConfig().lora_alpha
    assert run.train.max_steps == 3 and run.train.lr == 2e-4 and run.stage is None
    assert run.data.train == "train.jsonl" and run.data.packing is False


@pytest.mark.parametrize("command, data, key, suggestion", [
    ("sft", {**base(), "trian": {}}, "trian", "train"),
    ("sft", {**base(), "modle": "x"}, "modle", "model"),
    ("sft", base(train={"learning_rate": 1e-4}), "train.learning_rate", "train.lr"),
    ("sft", base(train={"gradient_accumulation_steps": 2}), "train.gradient_accumulation_steps",
     "train.grad_accum"),
    ("sft", base(train={"warmup": 3}), "train.warmup", "train.warmup_steps"),
    ("sft", base(train={"shceduler": "cosine"}), "train.shceduler", "train.scheduler"),
    ("sft", base(data={"train": "t.jsonl", "max_seq_length": 64}), "data.max_seq_length",
     "data.max_length"),
    ("sft", base(data={"train": "t.jsonl", "skip_invalids": True}), "data.skip_invalids",
     "data.skip_invalid"),
    ("sft", base(peft={"lora_alpah": 16}), "peft.lora_alpah", "peft.lora_alpha"),
    ("sft", base(method="ia3", peft={"target_module": ["k_proj"]}), "peft.target_module",
     "peft.target_modules"),
    ("rm", base(rm={"margn": 0.5}), "rm.margn", "rm.margin"),
    ("dpo", base(dpo={"betta": 0.2}), "dpo.betta", "dpo.beta"),
    ("ppo", base(ppo={"reward_fn": "f.py:f", "kl_coeff": 0.1}), "ppo.kl_coeff", "ppo.kl_coef"),
])
def test_an_unknown_key_names_the_file_the_full_key_and_the_closest_valid_one(
        tmp_path, command, data, key, suggestion):
    msg = config_error(tmp_path, data, command)
    assert "run.yaml" in msg
    assert f"unknown key '{key}'; did you mean '{suggestion}'?" in msg


def test_an_unknown_key_set_by_an_override_names_the_override(tmp_path):
    msg = config_error(tmp_path, base(), overrides=["train.learning_rate=1e-4"])
    assert msg == ("override 'train.learning_rate=1e-4': unknown key 'train.learning_rate'; "
                   "did you mean 'train.lr'?")


@pytest.mark.parametrize("data, key, expected, shown", [
    (base(train={"lr": "fast"}), "train.lr", "a number", "'fast'"),
    (base(train={"batch_size": True}), "train.batch_size", "an int", "True"),
    (base(train={"batch_size": 2.5}), "train.batch_size", "an int", "2.5"),
    (base(train={"max_steps": "10"}), "train.max_steps", "an int or null", "'10'"),
    (base(train={"gradient_checkpointing": "yes"}), "train.gradient_checkpointing", "a bool",
     "'yes'"),
    (base(train={"adam_betas": [0.9]}), "train.adam_betas", "a list of 2 numbers", "[0.9]"),
    (base(peft={"target_modules": 3}), "peft.target_modules",
     "a list of strings or a string or null", "3"),
    (base(data={"train": "t.jsonl", "packing": 1}), "data.packing", "a bool", "1"),
    ({"model": "m", "data": {"train": 5}}, "data.train", "a string", "5"),
    (base(train=[1, 2]), "train", "block", "[1, 2]"),
])
def test_a_wrong_type_names_the_key_the_expected_type_and_the_value(tmp_path, data, key,
                                                                     expected, shown):
    msg = config_error(tmp_path, data)
    assert "run.yaml" in msg and key in msg and expected in msg and shown in msg


def test_numbers_ints_for_floats_and_yaml_1e_strings(tmp_path):
    # PyYAML reads 1e-4 (no dot) as the string "1e-4": it becomes a float for float keys.
    path = write_yaml(tmp_path, "model: m\ndata: {train: t.jsonl}\n"
                                "train: {lr: 1e-4, adam_eps: 1e-6, epochs: 2, max_grad_norm: 1}\n"
                                "peft: {lora_alpha: 16, lora_dropout: 0}\n")
    run = load_run_config(path, "sft")
    assert run.train.lr == 1e-4 and isinstance(run.train.lr, float)
    assert run.train.adam_eps == 1e-6 and run.train.epochs == 2.0
    assert isinstance(run.train.epochs, float) and isinstance(run.train.max_grad_norm, float)
    assert run.peft.lora_alpha == 16 and isinstance(run.peft.lora_alpha, int)  # int | float
    assert run.peft.lora_dropout == 0.0
    assert "run.yaml" in config_error(tmp_path, "model: m\ndata: {train: t}\ntrain: {lr: 1e-x}\n")


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    assert parse_override("train.lr=1e-4") == ("train.lr", "1e-4")  # then made a float
    assert parse_override("train.max_steps=5") == ("train.max_steps", 5)
    assert parse_override("train.resume=null") == ("train.resume", None)
    assert parse_override("train.resume=") == ("train.resume", None)
    assert parse_override("train.progress=false") == ("train.progress", False)
    assert parse_override("peft.target_modules=[q_proj, v_proj]") == (
        "peft.target_modules", ["q_proj", "v_proj"])
    assert parse_override("model=a/b=c") == ("model", "a/b=c")
    for bad in ("train.lr", "=3", "train..lr=3", "train.=3"):
        with pytest.raises(ConfigError, match="expected dotted.key=value"):
            parse_override(bad)

    path = write_yaml(tmp_path, base(train={"lr": 0.1, "max_steps": 9}))
    run = load_run_config(path, "dpo", [
        "train.lr=1e-4", "train.max_steps=5", "train.resume=auto", "model=other/model",
        "peft.target_modules=[q_proj, v_proj]", "train.adam_betas=[0.8, 0.9]", "dpo.beta=0.5",
        "data.eval=eval.jsonl", "peft.rank_pattern.q_proj=4"])
    assert run.train.lr == 1e-4 and run.train.max_steps == 5 and run.train.resume == "auto"
    assert run.model == "other/model" and run.peft.target_modules == ["q_proj", "v_proj"]
    assert run.train.adam_betas == (0.8, 0.9) and run.stage.beta == 0.5
    assert run.data.eval == "eval.jsonl" and run.peft.rank_pattern == {"q_proj": 4}

    msg = config_error(tmp_path, base(), overrides=["train.max_steps=2.5"])
    assert msg.startswith("override 'train.max_steps=2.5': train.max_steps: expected an int")
    msg = config_error(tmp_path, base(), overrides=["model.name=x"])
    assert "override 'model.name=x'" in msg and "'model' is not a block" in msg


def test_a_bad_method_and_method_full(tmp_path):
    msg = config_error(tmp_path, base(method="lorra"))
    assert "run.yaml" in msg and "method: 'lorra' is not one of" in msg
    assert "did you mean 'lora'?" in msg
    assert "did you mean 'lora'?" in config_error(tmp_path, base(method="LoRA"))
    msg = config_error(tmp_path, base(method="full", peft={"r": 4}))
    assert "method 'full'" in msg and "peft" in msg
    run = load_run_config(write_yaml(tmp_path, base(method="full")), "sft")
    assert run.method == "full" and run.peft is None
    for method, cls in [("ia3", fastpeft.IA3Config), ("adapter", fastpeft.AdapterConfig),
                        ("prompt", fastpeft.PromptTuningConfig),
                        ("prefix", fastpeft.PrefixTuningConfig),
                        ("ptuning", fastpeft.PTuningConfig)]:
        peft = {"num_virtual_tokens": 4} if method in ("prompt", "prefix", "ptuning") else {}
        run = load_run_config(write_yaml(tmp_path, base(method=method, peft=peft)), "sft")
        assert type(run.peft) is cls


def test_a_stage_block_of_another_command_is_an_error(tmp_path):
    for command, block in [("sft", "ppo"), ("sft", "rm"), ("rm", "dpo"), ("dpo", "ppo"),
                           ("ppo", "rm")]:
        stage = {"ppo": {"reward_fn": "f.py:f"}, "rm": {}, "dpo": {"beta": 0.2}}
        data = base(**{block: stage[block]})
        if command == "ppo":
            data["ppo"] = stage["ppo"]
        msg = config_error(tmp_path, data, command)
        assert "run.yaml" in msg and f"'{block}:' block belongs to `fastpeft {block}`" in msg
        assert f"not to `fastpeft {command}`" in msg
    msg = config_error(tmp_path, base(data={"train": "t", "packing": True, "max_length": 8}),
                       "dpo")
    assert "data.packing is for `fastpeft sft` only" in msg


def test_missing_model_or_data_train(tmp_path):
    msg = config_error(tmp_path, {"data": {"train": "t.jsonl"}})
    assert "run.yaml" in msg and "missing key 'model'" in msg
    msg = config_error(tmp_path, {"model": "m", "data": {"eval": "e.jsonl"}})
    assert "run.yaml" in msg and "missing key 'data.train'" in msg
    msg = config_error(tmp_path, {"model": "m"})
    assert "missing key 'data.train'" in msg
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(str(tmp_path / "nope.yaml"), "sft")
    msg = config_error(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in msg
    msg = config_error(tmp_path, "model: [unclosed\n")
    assert "not valid YAML" in msg


def test_the_config_classes_own_checks_name_the_file_and_key(tmp_path):
    msg = config_error(tmp_path, base(train={"scheduler": "cosin"}))
    assert "run.yaml: train.scheduler: 'cosin' is not one of" in msg
    msg = config_error(tmp_path, base(peft={"r": 0}))
    assert "run.yaml: peft.r must be a positive int, got 0" in msg
    msg = config_error(tmp_path, base(data={"train": "t", "format": "alpacca"}))
    assert "data.format: 'alpacca' is not one of" in msg
    msg = config_error(tmp_path, base(data={"train": "t", "packing": True}))
    assert "data.packing needs data.max_length" in msg
    msg = config_error(tmp_path, base(ppo={"kl_coef": 0.1}), "ppo")
    assert "run.yaml: ppo: set" in msg and "ppo.reward_fn" in msg and "ppo.reward_model" in msg
    msg = config_error(tmp_path, base(ppo={"reward_fn": "f.py:f", "reward_model": "out/rm"}),
                       "ppo")
    assert "run.yaml: ppo: set" in msg and "ppo.reward_fn" in msg and "ppo.reward_model" in msg
    msg = config_error(tmp_path, base(ppo={"reward_fn": "f.py:f", "kl_estimator": "k2"}), "ppo")
    assert "ppo.kl_estimator: 'k2' is not one of" in msg
    msg = config_error(tmp_path, base(dpo={"beta": 0}), "dpo")
    assert "dpo.beta must be > 0.0" in msg
    msg = config_error(tmp_path, base(method="prefix"))
    assert "peft.num_virtual_tokens must be a positive int" in msg


def test_the_resolved_config_reads_back_the_same(tmp_path):
    path = write_yaml(tmp_path, base(train={"lr": 1e-3, "adam_betas": [0.8, 0.9]},
                                     peft={"target_modules": ["q_proj"]},
                                     ppo={"reward_fn": "f.py:f", "kl_coef": 0.1}))
    run = load_run_config(path, "ppo")
    again = load_run_config(write_yaml(tmp_path, run.to_yaml(), "resolved.yaml"), "ppo")
    assert again.to_dict() == run.to_dict()
    assert again.peft == run.peft and again.train == run.train and again.stage == run.stage


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_the_examples_load_and_their_files_exist(command, monkeypatch):
    monkeypatch.chdir(REPO)  # the examples' paths are relative to the repository root
    run = load_run_config(os.path.join("examples", EXAMPLES[command]), command)
    assert run.model == "smollm2-135m" and run.method == "lora"
    for path in (run.data.train, run.data.eval):
        assert path is None or os.path.isfile(path), path
    assert run.train.output_dir == f"out/{command}"
    assert (run.stage is None) == (command == "sft")
    if command == "ppo":
        import importlib.util

        file, _, name = run.stage.reward_fn.partition(":")
        spec = importlib.util.spec_from_file_location("reward_fns", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        scores = getattr(module, name)(["Hi"] * 3, [
            "Sure, I am glad to help: the capital of France is Paris.", "", "no " * 40])
        assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
        assert scores[0] > scores[1] > scores[2]


# ---- the command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer's vocabulary, saved as a model
    directory (save_pretrained) with the tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def tiny_run(tmp_path, tiny_dir, train_file=None, **train) -> str:
    return write_yaml(tmp_path, {
        "model": tiny_dir, "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": train_file or example("alpaca.jsonl"), "max_length": 96},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "batch_size": 2,
                  "lr": 1e-2, "progress": False, "tensorboard": False, "plots": False, **train},
    }, "tiny.yaml")


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("sft")
    path = tiny_run(tmp, tiny_dir)
    assert cli.main(["sft", "--config", path, "train.seed=3"]) == 0
    return tmp / "out", path


def test_sft_end_to_end_writes_metrics_adapter_and_the_resolved_config(sft_out):
    out, path = sft_out
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in records)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    text = (out / "run_config.yaml").read_text()
    assert text.startswith("# fastpeft sft") and "tiny.yaml" in text
    resolved = load_run_config(str(out / "run_config.yaml"), "sft")
    assert resolved.train.seed == 3  # the override
    assert resolved.to_dict() == load_run_config(path, "sft", ["train.seed=3"]).to_dict()


def test_torchrun_m_fastpeft_sft_on_two_processes_matches_one(tmp_path, tiny_dir):
    """`torchrun --nproc_per_node=2 -m fastpeft sft --config ...` (2 gloo processes, batch 2
    each) gives the loss curve of one process with batch 4; only rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "python"),
                                          os.environ.get("PYTHONPATH", "")])}
    two = tiny_run(tmp_path, tiny_dir, max_steps=4, batch_size=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastpeft", "sft", "--config", two, "peft.lora_dropout=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    one = tiny_run(one_dir, tiny_dir, max_steps=4, batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["sft", "--config", one, "peft.lora_dropout=0"]) == 0
    finally:
        torch.set_num_threads(threads)
    a = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    b = read_metrics(str(one_dir / "out" / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-5
    assert [x["tokens"] for x in a] == [y["tokens"] for y in b]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())["train"][
        "batch_size"] == 2


def test_merge_gives_the_patched_models_logits(sft_out, tiny_dir, tmp_path, capsys):
    out, _ = sft_out
    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(out), "--output", str(merged_dir)]) == 0
    assert "LORA adapter" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.tensor([smollm2_tokenizer()("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits
        patched = fastpeft.load_adapter(base, str(out / "adapter")).eval()
        want = patched(ids).logits
        got = merged(ids).logits
    assert (want - base_logits).abs().max() > 1e-4  # the adapter changes the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (merged_dir / "tokenizer.json").is_file()
    assert not any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in merged.state_dict())


def test_merge_refuses_what_cannot_merge(tmp_path, capsys):
    for peft_type, extra in [("PREFIX_TUNING", {"num_virtual_tokens": 4}),
                             ("BOTTLENECK_ADAPTER", {})]:
        adapter = tmp_path / peft_type
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": peft_type, "base_model_name_or_path": "x", **extra}))
        assert cli.main(["merge", "--adapter", str(adapter), "--output",
                         str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"{peft_type} adapters cannot be merged" in err and str(adapter) in err
    assert cli.main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_malformed_row_exits_2_naming_file_and_line(tmp_path, tiny_dir, capsys):
    lines = open(example("alpaca.jsonl")).read().splitlines()[:6]
    lines[2] = '{"instruction": "Add.", "input": "1 and 2"}'  # no output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    path = tiny_run(tmp_path, tiny_dir, str(bad))
    assert cli.main(["sft", "--config", path]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3" in err and "output" in err and "Traceback" not in err
    # with data.skip_invalid the row is skipped and the run goes on
    assert cli.main(["sft", "--config", path, "data.skip_invalid=true",
                     "train.max_steps=1"]) == 0


def test_full_fine_tuning_from_the_command(tmp_path, tiny_dir):
    path = tiny_run(tmp_path, tiny_dir, max_steps=1)
    assert cli.main(["sft", "--config", path, "method=full", "peft=null"]) == 0
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_the_pair_stages_from_the_command(tmp_path, tiny_dir, command):
    path = tiny_run(tmp_path, tiny_dir, example("preference.jsonl"), max_steps=2)
    extra = ["rm.center_rewards_coefficient=0.01"] if command == "rm" else ["dpo.beta=0.2"]
    assert cli.main([command, "--config", path, "data.max_length=48",
                     f"data.eval={example('ranked.jsonl')}", *extra]) == 0
    out = tmp_path / "out"
    records = read_metrics(str(out / "metrics.jsonl"))
    assert sorted({r["step"] for r in records}) == [1, 2]
    assert "eval_loss" in records[-1]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    resolved = load_run_config(str(out / "run_config.yaml"), command)
    assert resolved.stage.to_dict() == load_run_config(path, command, extra).stage.to_dict()
    if command == "rm":  # a reward model that PPO can load (ppo.reward_model: output_dir)
        from fastpeft.train.reward import load_reward_model

        reward = load_reward_model(str(out))
        scores = reward(["Question: What is 1 plus 1?\nAnswer:"] * 2, [" 2.", " 3."])
        assert len(scores) == 2


def test_ppo_from_the_command_with_the_example_reward_fn(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # ppo.reward_fn: examples/reward_fns.py:polite_and_concise
    out = tmp_path / "out"
    assert cli.main(["ppo", "--config", "examples/ppo.yaml", f"model={tiny_dir}",
                     f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
                     "ppo.response_length=6", "ppo.num_ppo_epochs=1", "train.progress=false",
                     "train.plots=false", "train.tensorboard=false"]) == 0
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all("objective/scores" in r and "objective/kl" in r for r in records)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert load_run_config(str(out / "run_config.yaml"), "ppo").stage.response_length == 6


def test_python_m_fastpeft_reports_a_config_error_without_a_traceback(tmp_path):
    path = write_yaml(tmp_path, base(train={"learning_rate": 1e-4}))
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "sft", "--config", path],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}: unknown key 'train.learning_rate'; did you mean 'train.lr'?" in proc.stderr


@pytest.mark.slow
def test_the_sft_example_runs_on_smollm2(tmp_path):
    """`fastpeft sft --config examples/sft.yaml` on the embedded SmolLM2-135M, two steps."""
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    proc = subprocess.run(
        [sys.executable, "-m", "fastpeft", "sft", "--config", "examples/sft.yaml",
         "train.max_steps=2", f"train.output_dir={tmp_path}", "train.progress=false"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert sorted({r["step"] for r in records}) == [1, 2] and len(losses) == 2
    assert "eval_loss" in records[-1]  # data.eval is evaluated at the end
    assert all(0 < loss < 10 for loss in losses)  # a trained model, not a random one
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (tmp_path / "run_config.yaml").is_file()


def test_docs_cli_md_names_every_key():
    from fastpeft.run_config import key_reference

    text = open(os.path.join(REPO, "docs", "cli.md")).read()
    missing = []
    for block, rows in key_reference().items():
        for key, _, _ in rows:
            name = f"`{block}.{key}`" if not block.startswith("peft") else f"`{key}`"
            if name not in text:
                missing.append(name)
    assert not missing, f"docs/cli.md does not describe {missing}"
