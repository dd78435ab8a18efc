"""Runs under torchrun (tests/test_train_ppo.py): 3 PPO iterations of the tiny LoRA Llama with
the character tokenizer on 2 CPU processes (gloo), batch_size 2 per process, 5 prompts: the
second iteration's global batch has one prompt, so rank 0 gets a filler row. Each rank writes
its trainable parameters and kl_coef to OUT/rank<r>.pt."""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train_ppo import lowercase, prompts, trainer  # noqa: E402

from fastpeft.train import distributed  # noqa: E402


def main(out: str) -> None:
    t = trainer(out, data=prompts(5), train_kw=dict(max_steps=3, batch_size=2),
                num_mini_batches=2, adaptive_kl=True, target_kl=0.1, kl_horizon=20,
                reward_fn=lowercase)
    t.train()
    torch.save({"trainable": {n: p.detach().clone() for n, p in t.trainable_parameters()},
                "kl_coef": t.kl_coef, "history": t.history},
               os.path.join(out, f"rank{distributed.rank()}.pt"))
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
