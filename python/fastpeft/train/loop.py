"""The generic training loop: AdamW, linear / cosine schedule with warmup, gradient
accumulation, clipping, fp32 or bf16 autocast, gradient checkpointing, eval_every, atomic
checkpoints with exact resume, NaN / inf handling, metrics.jsonl + TensorBoard + tqdm + plots.

Stages subclass `Trainer` and override `compute_loss` (and optionally `num_items`,
`eval_loss`, `evaluate`, `save_extra`, `on_train_end`).

Data order: micro-batches of `batch_size` examples are drawn from a permutation of the dataset
seeded by (seed, epoch) with its own generator, so the data position (epoch, batch index) is all
a checkpoint needs to continue the same order. One optimizer step consumes `grad_accum`
micro-batches; each micro-batch loss is normalised by the labelled items of the whole step
(`num_items`), so batch_size=1 x grad_accum=2 gives the same update as 2 x 1.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

from fastpeft.train import checkpoint as ckpt
from fastpeft.train.config import TrainConfig
from fastpeft.train.metrics import MetricsLogger, plot_metrics

IGNORE_INDEX = -100


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of a step was NaN or inf and train.on_nan is "stop"."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int, kind: str):
    """The multiplier of the base lr after `s` scheduler steps (s = 0 for the first step), as
    transformers' get_linear / get_cosine_schedule_with_warmup."""

    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return f


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, train_dataset,
                 eval_dataset=None, collator=None):
        self.model = model
        self.config = config
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collator = collator
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.resumed_from: str | None = None
        self.optimizer = None
        self.scheduler = None
        self.logger: MetricsLogger | None = None
        self.history: list[dict] = []
        self._perm_cache: tuple[int, list[int]] | None = None
        self._ready = False

    # ---- hooks for the stages -------------------------------------------------------------

    def compute_loss(self, batch: dict, num_items: int) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch, normalised so that the micro-batch losses of one step
        sum to the step's loss (num_items = the labelled items of the whole step); and extra
        metrics of this micro-batch (averaged over the step's micro-batches in the logs)."""
        raise NotImplementedError

    def num_items(self, batch: dict) -> int:
        """What a step's loss is averaged over: next-token labels != -100 by default."""
        labels = batch.get("labels")
        if labels is None:
            return len(next(iter(batch.values())))
        return int((labels[..., 1:] != IGNORE_INDEX).sum())

    def num_tokens(self, batch: dict) -> int:
        mask = batch.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2:
            return int(mask.sum())
        ids = batch.get("input_ids")
        return int(ids.numel()) if torch.is_tensor(ids) else 0

    def eval_loss(self, batch: dict) -> tuple[float, int]:
        """(sum of the per-item losses, number of items) of one eval batch."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Metrics on eval_dataset (eval_loss by default); the model is back in train mode
        afterwards."""
        if self.eval_dataset is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad(), self.autocast():
                for start in range(0, len(self.eval_dataset), self.config.batch_size):
                    rows = [self.eval_dataset[i] for i in
                            range(start, min(start + self.config.batch_size,
                                             len(self.eval_dataset)))]
                    loss_sum, n = self.eval_loss(_to(self.collate(rows), self.device))
                    total += float(loss_sum)
                    count += int(n)
        finally:
            self.model.train(was_training)
        return {"eval_loss": total / max(count, 1)}

    def save_extra(self, directory: str) -> None:
        """Extra files of a checkpoint (the stages write the adapter in peft format)."""

    def on_step_end(self, step: int, metrics: dict) -> None:
        """Called after every optimizer step (and its logging / eval / checkpoint)."""

    def on_train_end(self) -> None:
        """Called once the last step is done (the stages write the final model)."""

    # ---- set-up ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def collate(self, rows: list[dict]) -> dict:
        if self.collator is None:
            from fastpeft.data import Collator

            self.collator = Collator()
        return self.collator(rows)

    def autocast(self):
        if self.config.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.train_dataset) // self.config.batch_size)

    @property
    def total_micro_batches(self) -> int | None:
        if self.config.max_steps is not None:
            return None
        return max(1, round(self.config.epochs * self.batches_per_epoch))

    @property
    def total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        return -(-self.total_micro_batches // self.config.grad_accum)

    def setup(self) -> None:
        """Seeds, gradient checkpointing, optimizer, scheduler, logger; then resumes when
        train.resume says so."""
        cfg = self.config
        if len(self.train_dataset) == 0:
            raise ValueError("the training dataset is empty")
        seed_everything(cfg.seed)
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif hasattr(self.model, "gradient_checkpointing_enable"):
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise ValueError("train.gradient_checkpointing: the model has no "
                                 "gradient_checkpointing_enable()")
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters")
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           eps=cfg.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, self.total_steps, cfg.scheduler))
        os.makedirs(cfg.output_dir, exist_ok=True)
        ckpt.remove_leftovers(cfg.output_dir)
        self.logger = MetricsLogger(cfg.output_dir, tensorboard=cfg.tensorboard)
        path = None
        if cfg.resume == "auto":
            path = ckpt.latest_checkpoint(cfg.output_dir)
        elif cfg.resume:
            path = cfg.resume
        if path is not None:
            self.load_checkpoint(path)
        elif os.path.exists(self.logger.path):
            self.logger.truncate_after(0)  # a fresh run in a used directory
        self._ready = True

    # ---- data -----------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.train_dataset),
                                                      generator=g).tolist())
        return self._perm_cache[1]

    def next_batch(self) -> dict:
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        bs = self.config.batch_size
        idx = self._permutation(self.epoch)[self.batch_index * bs:(self.batch_index + 1) * bs]
        self.batch_index += 1
        return self.collate([self.train_dataset[i] for i in idx])

    def _micro_batches_this_step(self) -> int:
        total = self.total_micro_batches
        if total is None:
            return self.config.grad_accum
        consumed = self.epoch * self.batches_per_epoch + self.batch_index
        return max(1, min(self.config.grad_accum, total - consumed))

    # ---- training -------------------------------------------------------------------------

    def train(self) -> dict:
        """Run to total_steps; returns the metrics of the last step (with eval metrics)."""
        if not self._ready:
            self.setup()
        cfg = self.config
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress,
                   desc="train", dynamic_ncols=True)
        self.model.train()
        last: dict = {}
        try:
            while self.step < self.total_steps:
                last = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}",
                                tok_s=f"{last.get('tokens_per_s', 0.0):.0f}")
            if self.eval_dataset is not None and "eval_loss" not in last:
                ev = self.evaluate()
                if ev:
                    self.logger.log(self.step, ev)
                    last = {**last, **ev}
            self.on_train_end()
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        if cfg.plots:
            plot_metrics(cfg.output_dir)
        return last

    def train_step(self) -> dict:
        cfg = self.config
        step = self.step + 1
        start = time.perf_counter()
        batches = [_to(self.next_batch(), self.device)
                   for _ in range(self._micro_batches_this_step())]
        num_items = sum(self.num_items(b) for b in batches)
        tokens = sum(self.num_tokens(b) for b in batches)
        lr = self.scheduler.get_last_lr()[0]
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        extra: dict[str, float] = {}
        finite = True
        for b in batches:
            with self.autocast():
                loss, metrics = self.compute_loss(b, max(num_items, 1))
            if not torch.isfinite(loss.detach()).all():
                if cfg.on_nan == "stop":
                    raise NonFiniteLossError(
                        f"step {step}: the loss is {loss.detach().item()} (train.on_nan=stop; "
                        f"set train.on_nan=skip to skip such updates)")
                finite = False
                continue
            loss.backward()
            loss_total += loss.detach().float()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(batches)
        grad_norm = None
        if finite:
            params = [p for _, p in self.trainable_parameters()]
            if cfg.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                ) if grads else torch.zeros(())
            if not torch.isfinite(grad_norm):
                if cfg.on_nan == "stop":
                    raise NonFiniteLossError(f"step {step}: the gradient norm is "
                                             f"{grad_norm.item()} (train.on_nan=stop)")
                finite = False
        if finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step = step
        self.tokens_seen += tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        metrics = {"loss": loss_total.item() if finite else float("nan"), "lr": lr,
                   "epoch": self.epoch + self.batch_index / self.batches_per_epoch,
                   "tokens": tokens, "tokens_per_s": tokens / elapsed, **extra}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        if cfg.eval_every and step % cfg.eval_every == 0:
            metrics.update(self.evaluate())
        if step % cfg.log_every == 0 or step == self.total_steps or "eval_loss" in metrics:
            self.logger.log(step, metrics)
        self.history.append({"step": step, **metrics})
        if cfg.save_every and (step % cfg.save_every == 0 or step == self.total_steps):
            self.save_checkpoint()
        self.on_step_end(step, metrics)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.config.seed,
            "skipped_steps": self.skipped_steps,
            "tokens_seen": self.tokens_seen,
            "trainable": {n: p.detach().to("cpu", copy=True)
                          for n, p in self.trainable_parameters()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> str:
        """checkpoint-<step> in output_dir, atomically; then only the newest keep_last stay."""
        if self.logger is not None and self.logger._writer is not None:
            self.logger._writer.flush()
        path = ckpt.write_checkpoint(self.config.output_dir, self.step, self.state_dict(),
                                     extra=self.save_extra)
        ckpt.prune_checkpoints(self.config.output_dir, self.config.keep_last)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore trainable weights, optimizer, scheduler, RNG states and data position."""
        state = ckpt.read_checkpoint(path)
        if state["seed"] != self.config.seed:
            raise ValueError(f"{path}: saved with seed {state['seed']}, but train.seed is "
                             f"{self.config.seed}; the data order would differ")
        params = dict(self.trainable_parameters())
        saved = state["trainable"]
        if set(saved) != set(params):
            missing = sorted(set(params) - set(saved))[:5]
            unexpected = sorted(set(saved) - set(params))[:5]
            raise ValueError(f"{path}: trainable parameters differ from the model's "
                             f"(missing {missing}, unexpected {unexpected})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_index = state["batch_index"]
        self.skipped_steps = state["skipped_steps"]
        self.tokens_seen = state["tokens_seen"]
        self.resumed_from = path
        if self.logger is not None:
            self.logger.truncate_after(self.step)
