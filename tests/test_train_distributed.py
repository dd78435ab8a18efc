"""Distributed training on the CPU: tests/_dist_sft.py is launched with torchrun (2 gloo
processes) for data parallel (batch_size 2), data parallel with grad_accum 2 (batch_size 1) and
FSDP2 with gradient checkpointing (batch_size 2); each must match one process with the same
global batch (batch_size 4, resp. 2 x grad_accum 2), run here in the test process: the loss
curve, the eval losses and the final adapter within 1e-5. 17 train / 5 eval examples: the last
global micro-batch of an epoch is short and one rank gets a filler row, and one rank has one
eval batch fewer (a filler batch keeps FSDP's collectives in step). Only rank 0 writes logs and
checkpoints. The reward-model stage (its head outside the model) runs the same way."""

import os
import subprocess
import sys

import pytest
import torch
from _dist_sft import run, run_rm
from safetensors.torch import load_file

from fastpeft.train import TrainConfig, read_metrics
from fastpeft.train.checkpoint import list_checkpoints, read_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """OUT/<name>/ of the 2-process runs (one torchrun launch) and of the 1-process ones."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "python"), HERE,
                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "_dist_sft.py"), str(out), "ddp:2:1:0", "accum:1:2:0",
           "fsdp:2:1:1", "ddp_resumed:2:1:0:6", "fsdp_resumed:2:1:1:6", "nan",
           "rm:2:0", "rm_fsdp:2:1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(str(out / "one"), 4, 1, False)
        run(str(out / "one_accum"), 2, 2, False)
        run_rm(str(out / "rm_one"), 4, False)
    finally:
        torch.set_num_threads(threads)
    return out


def curve(path, key="loss"):
    return [(r["step"], r[key]) for r in read_metrics(str(path / "metrics.jsonl")) if key in r]


def adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("two, one", [("ddp", "one"), ("accum", "one_accum"), ("fsdp", "one")])
def test_two_processes_match_one_with_the_same_global_batch(runs, two, one):
    a, b = runs / two, runs / one
    for key in ("loss", "eval_loss", "grad_norm", "tokens"):
        ca, cb = curve(a, key), curve(b, key)
        assert [s for s, _ in ca] == [s for s, _ in cb] and ca, key
        diff = max(abs(x - y) for (_, x), (_, y) in zip(ca, cb))
        assert diff <= (0 if key == "tokens" else TOL), (key, diff)
    # 2 epochs of ceil(17 / 4) = 5 global micro-batches, resp. ceil(17 / 2) = 9 of 2 rows
    assert curve(a)[-1][0] == (9 if two == "accum" else 10)
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and wa
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL
    # checkpoints: full trainable tensors (gathered under FSDP), the same as one process's
    (step_a, ck_a), (step_b, ck_b) = list_checkpoints(str(a))[-1], list_checkpoints(str(b))[-1]
    assert step_a == step_b
    sa, sb = read_checkpoint(ck_a), read_checkpoint(ck_b)
    assert sa["world_size"] == 2 and sa["fsdp"] == (two == "fsdp")
    assert len(sa["rng_per_rank"]) == 2
    assert max(float((sa["trainable"][k] - sb["trainable"][k]).abs().max())
               for k in sb["trainable"]) <= TOL


@pytest.mark.parametrize("two", ["rm", "rm_fsdp"])
def test_a_reward_model_on_two_processes_matches_one(runs, two):
    """A stage on the loop (the reward model, whose head is outside the model and outside
    FSDP's shards) gets data parallelism too."""
    a, b = runs / two, runs / "rm_one"
    for key in ("loss", "accuracy", "rewards/margin", "eval_loss", "eval_accuracy"):
        ca, cb = curve(a, key), curve(b, key)
        assert [s for s, _ in ca] == [s for s, _ in cb] and ca, key
        diff = max(abs(x - y) for (_, x), (_, y) in zip(ca, cb))
        assert diff <= TOL, (key, diff)
    ha = load_file(str(a / "reward_head.safetensors"))
    hb = load_file(str(b / "reward_head.safetensors"))
    assert max(float((ha[k] - hb[k]).abs().max()) for k in hb) <= TOL
    assert set(hb) == {"linear.weight"}  # a pairwise loss cannot train a bias
    wa, wb = adapter(a), adapter(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= TOL


@pytest.mark.parametrize("two", ["ddp", "accum", "fsdp"])
def test_only_rank_0_writes_and_the_ranks_agree(runs, two):
    out = runs / two
    one = runs / ("one_accum" if two == "accum" else "one")
    steps = [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))]
    # one writer: the records of one process (a second writer would double them)
    assert steps == [r["step"] for r in read_metrics(str(one / "metrics.jsonl"))]
    assert [s for s, _ in list_checkpoints(str(out))] == ([8, 9] if two == "accum" else [8, 10])
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    r0, r1 = (out / "rank0.txt").read_text(), (out / "rank1.txt").read_text()
    assert r0 == r1  # the logged loss is reduced over the ranks


def test_fsdp_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch):
    from _train import config, lora_model, pattern_examples

    from fastpeft.train import SFTTrainer

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    trainer = SFTTrainer(lora_model(), None, config(tmp_path, fsdp=True), pattern_examples())
    with pytest.raises(ValueError, match=r"train.fsdp: true needs a torchrun launch"):
        trainer.train()
    with pytest.raises(ValueError, match=r"train.fsdp must be true or false, got 'yes'"):
        TrainConfig(fsdp="yes")


@pytest.mark.parametrize("two", ["ddp", "fsdp"])
def test_a_resumed_two_process_run_reproduces_the_uninterrupted_one(runs, two):
    """Stopped after step 6 (checkpoint-4), resumed by every rank from checkpoint-4."""
    a, b = runs / (two + "_resumed"), runs / two
    for r in (0, 1):  # each rank's resumed run trained steps 5..10 only
        steps = [int(x.split(":")[0]) for x in (a / f"rank{r}.txt").read_text().split()]
        assert steps == list(range(5, 11))
    for key in ("loss", "eval_loss"):
        ca, cb = curve(a, key), curve(b, key)
        assert [s for s, _ in ca] == [s for s, _ in cb]
        assert [v for _, v in ca] == pytest.approx([v for _, v in cb], abs=1e-6)
    wa, wb = adapter(a), adapter(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_a_nan_loss_on_one_rank_stops_every_rank(runs):
    for r in (0, 1):
        message = (runs / "nan" / f"nan{r}.txt").read_text()
        assert message.startswith("step 3: the loss is nan"), message
    assert [s for s, _ in curve(runs / "nan")] == [1, 2]
