"""The generic training loop (fastpeft.train) on a LoRA-patched tiny Llama: gradient
accumulation, exact resume, atomic checkpoints, keep_last, NaN handling, logs and plots,
schedules, and a run killed with SIGKILL after a checkpoint."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from _train import config, lora_model, max_diff, random_examples, trainable

from fastpeft.train import NonFiniteLossError, SFTTrainer, TrainConfig, list_checkpoints
from fastpeft.train.checkpoint import MARKER, latest_checkpoint
from fastpeft.train.loop import lr_lambda


def run(tmp_path, model=None, data=None, **kw):
    model = model if model is not None else lora_model()
    trainer = SFTTrainer(model, None, config(tmp_path, **kw), data or random_examples())
    trainer.train()
    return trainer


def test_grad_accum_2x1_equals_1x2(tmp_path):
    a = run(tmp_path / "a", batch_size=1, grad_accum=2, max_steps=5, warmup_steps=2)
    b = run(tmp_path / "b", batch_size=2, grad_accum=1, max_steps=5, warmup_steps=2)
    la = [h["loss"] for h in a.history]
    lb = [h["loss"] for h in b.history]
    assert la == pytest.approx(lb, abs=1e-6)
    assert max_diff(trainable(a.model), trainable(b.model)) < 1e-6
    assert [h["tokens"] for h in a.history] == [h["tokens"] for h in b.history]


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, scheduler):
    kw = dict(max_steps=6, save_every=3, keep_last=None, warmup_steps=2, scheduler=scheduler,
              batch_size=3, grad_accum=2, weight_decay=0.1)
    full = run(tmp_path / "full", model=lora_model(dropout=0.1), **kw)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "full"))] == [3, 6]
    # a different LoRA init: everything trainable must come from the checkpoint
    resumed = run(tmp_path / "resumed", model=lora_model(init_seed=7, dropout=0.1),
                  resume=str(tmp_path / "full" / "checkpoint-3"), **kw)
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-6)
    for h_full, h_res in zip(full.history[3:], resumed.history):
        assert h_res["loss"] == pytest.approx(h_full["loss"], abs=1e-6)
        assert h_res["lr"] == pytest.approx(h_full["lr"], abs=1e-12)
    assert max_diff(trainable(full.model), trainable(resumed.model)) < 1e-6


def test_resume_auto_skips_half_written_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=4, save_every=2, keep_last=None)
    # a crash while writing checkpoint-8: no marker; and a leftover temporary directory
    os.makedirs(out / "checkpoint-8")
    (out / "checkpoint-8" / "trainer_state.pt").write_bytes(b"truncated")
    os.makedirs(out / ".tmp-checkpoint-10-1")
    # a complete-looking directory without the state is not complete either
    os.makedirs(out / "checkpoint-9")
    (out / "checkpoint-9" / MARKER).write_text("9\n")
    assert latest_checkpoint(str(out)).endswith("checkpoint-4")
    trainer = SFTTrainer(lora_model(), None, config(out, max_steps=6, resume="auto",
                                                    save_every=2, keep_last=None),
                         random_examples())
    trainer.setup()
    assert trainer.resumed_from.endswith("checkpoint-4") and trainer.step == 4
    assert not os.path.exists(out / ".tmp-checkpoint-10-1")  # leftovers are cleaned up
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        SFTTrainer(lora_model(), None, config(out, resume=str(out / "checkpoint-8")),
                   random_examples()).setup()


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    trainer = run(tmp_path, max_steps=2, resume="auto")
    assert trainer.resumed_from is None and trainer.step == 2


def test_keep_last(tmp_path):
    run(tmp_path, max_steps=7, save_every=2, keep_last=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [6, 7]
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if n.startswith(".tmp")]
    assert os.path.isfile(tmp_path / "checkpoint-7" / "adapter" / "adapter_model.safetensors")


def nan_hook(model, at_call: int):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == at_call else output

    return model.model.norm.register_forward_hook(hook)


def test_nan_loss_stops_naming_the_step(tmp_path):
    model = lora_model()
    nan_hook(model, at_call=3)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan"):
        run(tmp_path, model=model, max_steps=6)


def test_nan_loss_skip_counts_and_skips_the_update(tmp_path):
    model = lora_model()
    nan_hook(model, at_call=3)
    snapshots = []

    class Recorder(SFTTrainer):
        def on_step_end(self, step, metrics):
            snapshots.append(trainable(self.model))

    trainer = Recorder(model, None, config(tmp_path, max_steps=5, on_nan="skip",
                                           tensorboard=False), random_examples())
    trainer.train()
    assert trainer.skipped_steps == 1 and trainer.step == 5
    assert max_diff(snapshots[1], snapshots[2]) == 0.0  # step 3 changed nothing
    assert max_diff(snapshots[2], snapshots[3]) > 0.0
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert records[2]["loss"] == "nan" and records[2]["skipped_steps"] == 1
    assert all(isinstance(r["loss"], float) for i, r in enumerate(records) if i != 2)


def test_metrics_tensorboard_and_plots(tmp_path):
    trainer = SFTTrainer(lora_model(), None,
                         config(tmp_path, max_steps=6, log_every=2, eval_every=3,
                                tensorboard=True, plots=True),
                         random_examples(), eval_dataset=random_examples(5, seed=1))
    trainer.train()
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    for r in records:
        assert isinstance(r["step"], int)
        if r["step"] % 2 == 0:
            assert {"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= r.keys()
    assert "eval_loss" in records[1] and "eval_loss" in records[3]
    assert [r["loss"] for r in records if r["step"] != 3] == pytest.approx(
        [h["loss"] for h in trainer.history if h["step"] in (2, 4, 6)])
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    for name in ("loss", "lr", "eval_loss", "grad_norm"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run(tmp_path, max_steps=5, save_every=3, keep_last=None)
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-5")  # as if killed after step 5 before saving
    run(tmp_path, max_steps=5, save_every=3, keep_last=None, resume="auto")
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]


def test_lr_schedules():
    f = lr_lambda(2, 10, "linear")
    assert [f(s) for s in range(4)] == [0.0, 0.5, 1.0, pytest.approx(7 / 8)]
    assert f(10) == 0.0
    g = lr_lambda(0, 10, "cosine")
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)


def test_epochs_and_bad_config(tmp_path):
    trainer = run(tmp_path, max_steps=None, epochs=2, batch_size=5, grad_accum=2)
    # 16 examples / 5 = 4 micro-batches per epoch, 8 in all, 4 steps of 2
    assert trainer.step == 4 and trainer.epoch == 1 and trainer.batch_index == 4
    with pytest.raises(ValueError, match="train.scheduler"):
        TrainConfig(scheduler="step")
    with pytest.raises(ValueError, match="train.on_nan"):
        TrainConfig(on_nan="ignore")


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    # with LoRA dropout: the recompute must draw the same masks
    plain = run(tmp_path / "plain", model=lora_model(dropout=0.2), max_steps=3)
    ckpt = run(tmp_path / "ckpt", model=lora_model(dropout=0.2), max_steps=3,
               gradient_checkpointing=True)
    assert ckpt.model.model.gradient_checkpointing
    assert [h["loss"] for h in ckpt.history] == pytest.approx(
        [h["loss"] for h in plain.history], abs=1e-6)
    assert max_diff(trainable(plain.model), trainable(ckpt.model)) < 1e-6


def test_bf16_autocast_full_fine_tuning(tmp_path):
    from _models import tiny_model

    model = tiny_model("llama")
    trainer = run(tmp_path, model=model, max_steps=3, dtype="bf16",
                  gradient_checkpointing=True, lr=1e-3)
    losses = [h["loss"] for h in trainer.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert os.path.isfile(tmp_path / "model" / "config.json")


def test_bf16_autocast_with_lora(tmp_path):
    """The fused ops take part in autocast through the tuner layers (tuners.base.autocast_like)."""
    trainer = run(tmp_path, model=lora_model(dropout=0.1), max_steps=3, dtype="bf16",
                  gradient_checkpointing=True, lr=1e-3)
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


_KILLED_RUN = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from _train import config, lora_model, random_examples
from fastpeft.train import SFTTrainer

class Killed(SFTTrainer):
    def on_step_end(self, step, metrics):
        if step == 4:  # after checkpoint-3, in the middle of the next interval
            os.kill(os.getpid(), signal.SIGKILL)

Killed(lora_model(dropout=0.1), None, config({out!r}, max_steps=6, save_every=3,
       keep_last=None), random_examples()).train()
"""


def test_sigkill_after_a_checkpoint_then_resume(tmp_path):
    full = run(tmp_path / "full", model=lora_model(dropout=0.1), max_steps=6, save_every=3,
               keep_last=None)
    out = str(tmp_path / "killed")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [tests, *sys.path, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(tests=tests, out=out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(out)] == [3]
    resumed = run(out, model=lora_model(init_seed=5, dropout=0.1), max_steps=6,
                  save_every=3, keep_last=None, resume="auto")
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-6)
    assert max_diff(trainable(full.model), trainable(resumed.model)) < 1e-6
