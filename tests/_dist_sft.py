"""Runs under torchrun (tests/test_train_distributed.py): SFT of the tiny LoRA Llama of
tests/_train.py on CPU processes with gloo, one run per "name:batch_size:grad_accum:fsdp[:crash]"
spec given on the command line, each into OUT/<name>/ (with crash: the run stops after that
step, then a second run resumes it with resume="auto"). FSDP runs also use (non-reentrant)
gradient checkpointing. Dropout 0, one thread per process."""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train import config, lora_model, pattern_examples  # noqa: E402

from fastpeft.train import RewardConfig, RewardTrainer, SFTTrainer, distributed  # noqa: E402

N_TRAIN, N_EVAL = 17, 5  # not multiples of the global batch: short last batches, filler rows


class Crash(RuntimeError):
    pass


class CrashingSFT(SFTTrainer):
    crash_at = None

    def on_step_end(self, step, metrics):
        if step == self.crash_at:
            raise Crash(f"step {step}")


class NanOnRank1(SFTTrainer):
    """A NaN loss on rank 1 only, at step 3."""

    def compute_loss(self, batch, num_items):
        loss, metrics = super().compute_loss(batch, num_items)
        if distributed.rank() == 1 and self.step + 1 == 3:
            loss = loss * float("nan")
        return loss, metrics


def run_nan(out: str) -> None:
    """Every rank must stop at step 3 with the same error (not hang in a collective)."""
    from fastpeft.train import NonFiniteLossError

    trainer = NanOnRank1(lora_model(), None, config(out, max_steps=5, batch_size=2),
                         pattern_examples(N_TRAIN, seed=0))
    try:
        trainer.train()
        message = "no error"
    except NonFiniteLossError as e:
        message = str(e)
    with open(os.path.join(out, f"nan{distributed.rank()}.txt"), "w") as f:
        f.write(message)


def run(out: str, batch_size: int, grad_accum: int, fsdp: bool, crash_at: int | None = None,
        resume: str | None = None) -> None:
    cfg = config(out, max_steps=None, epochs=2, batch_size=batch_size, grad_accum=grad_accum,
                 lr=1e-2, warmup_steps=2, eval_every=4, save_every=4, keep_last=2, fsdp=fsdp,
                 gradient_checkpointing=fsdp, resume=resume)
    trainer = CrashingSFT(lora_model(init_seed=0, dropout=0.0), None, cfg,
                          pattern_examples(N_TRAIN, seed=0),
                          eval_dataset=pattern_examples(N_EVAL, seed=1))
    trainer.crash_at = crash_at
    try:
        trainer.train()
    except Crash:
        return
    # every rank leaves a note, to check that the ranks saw the same losses
    with open(os.path.join(out, f"rank{distributed.rank()}.txt"), "w") as f:
        f.write(" ".join(f"{h['step']}:{h['loss']!r}" for h in trainer.history) + "\n")


def run_rm(out: str, batch_size: int, fsdp: bool) -> None:
    """The reward-model stage (its head lives outside the model, and outside FSDP's shards)."""
    from _pairs import lora as pair_lora
    from _pairs import preference_pairs

    cfg = config(out, max_steps=6, batch_size=batch_size, lr=1e-2, eval_every=3, fsdp=fsdp)
    trainer = RewardTrainer(pair_lora(init="gaussian"), None, cfg, RewardConfig(),
                            preference_pairs(N_TRAIN, seed=0),
                            eval_dataset=preference_pairs(N_EVAL, seed=1))
    trainer.train()


def main() -> None:
    out = sys.argv[1]
    distributed.init_distributed()
    for spec in sys.argv[2:]:
        if spec == "nan":
            run_nan(os.path.join(out, "nan"))
            continue
        if spec.startswith("rm"):  # rm:batch_size:fsdp
            name, bs, fsdp = spec.split(":")
            run_rm(os.path.join(out, name), int(bs), fsdp == "1")
            continue
        name, bs, accum, fsdp, *crash = spec.split(":")
        if crash:  # stop after step `crash` (checkpoint at 4), then resume="auto"
            run(os.path.join(out, name), int(bs), int(accum), fsdp == "1", int(crash[0]))
        run(os.path.join(out, name), int(bs), int(accum), fsdp == "1",
            resume="auto" if crash else None)
    distributed.cleanup()


if __name__ == "__main__":
    main()
