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

Distributed (torchrun, see train/distributed.py): batch_size is per process. Global micro-batch b
is perm[b*B*W:(b+1)*B*W] (B = batch_size, W = world size) and rank r takes the r-th of W
contiguous near-equal parts; num_items is summed over ranks before compute_loss and the trainable
gradients are summed over ranks once per optimizer step (`sync_gradients`), so W processes x B
give the update of 1 process x W*B. With train.fsdp the model is sharded with FSDP2
(fully_shard), whose reduce-scatter sums the gradients instead. Only rank 0 writes logs, plots,
checkpoints and the final model.
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
from fastpeft.train import distributed
from fastpeft.train.config import TrainConfig
from fastpeft.train.metrics import MetricsLogger, NullLogger, plot_metrics

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
        self._fsdp = False
        # True when the last next_batch() had no rows for this rank (the last, short global
        # micro-batch of an epoch) and returned a stand-in row whose loss counts 0.
        self.batch_is_filler = False

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
                for batch, filler in self.eval_batches():
                    loss_sum, n = self.eval_loss(batch)
                    if not filler:
                        total += float(loss_sum)
                        count += int(n)
        finally:
            self.model.train(was_training)
        total = distributed.all_reduce_sum(total)
        count = distributed.all_reduce_sum(count)
        return {"eval_loss": total / max(count, 1)}

    def eval_batches(self):
        """(batch on the device, is_filler) for this rank's share of eval_dataset (a contiguous
        near-equal part per rank), in batches of batch_size. Every rank yields the same number
        of batches (FSDP's forward is a collective): a rank with fewer gets stand-in batches
        marked is_filler, whose results must be ignored. Sums over them are reduced with
        distributed.all_reduce_sum."""
        n, world, r = len(self.eval_dataset), distributed.world_size(), distributed.rank()
        lo, hi = r * n // world, (r + 1) * n // world
        bs = self.config.batch_size
        count = -(-((n + world - 1) // world) // bs)  # the most batches any rank has
        for i in range(count):
            idx = list(range(lo + i * bs, min(lo + (i + 1) * bs, hi)))
            filler = not idx
            yield _to(self.collate([self.eval_dataset[j] for j in (idx or [0])]),
                      self.device), filler

    def save_extra(self, directory: str) -> None:
        """Extra files of a checkpoint (the stages write the adapter in peft format)."""

    def on_step_end(self, step: int, metrics: dict) -> None:
        """Called after every optimizer step (and its logging / eval / checkpoint)."""

    def on_train_end(self) -> None:
        """Called once the last step is done, on rank 0 only, with the trainable parameters
        gathered under FSDP (the stages write the final model)."""

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

    def heads(self) -> dict[str, nn.Module]:
        """Trainable modules a stage keeps beside the model (the reward model's score head,
        PPO's value head), by name. Their parameters join trainable_parameters() as
        "<name>.<param>" (optimised, clipped, synced, checkpointed); under FSDP they are
        attached to the model under that name and sharded as their own units."""
        return {}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        for prefix, head in self.heads().items():
            if self.model._modules.get(prefix) is head:  # attached (FSDP): listed above
                continue
            params += [(f"{prefix}.{n}", p) for n, p in head.named_parameters()
                       if p.requires_grad]
        return params

    @property
    def global_batch_size(self) -> int:
        """Examples per global micro-batch: batch_size (per process) x world size."""
        return self.config.batch_size * distributed.world_size()

    @property
    def batches_per_epoch(self) -> int:
        """Global micro-batches per pass over the dataset."""
        return -(-len(self.train_dataset) // self.global_batch_size)

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
        if cfg.fsdp:
            self._setup_fsdp_process_group()
        else:
            distributed.init_distributed()
        # Per-rank global RNG (dropout masks, sampling): seed + rank; the data order does not
        # use it. Rank 0 draws what a single process would.
        seed_everything(cfg.seed + distributed.rank())
        # Identical trainable weights on every rank (as DDP does), before any sharding.
        distributed.broadcast_([p.data for _, p in self.trainable_parameters()])
        if cfg.fsdp:
            self._apply_fsdp()
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
        if distributed.is_main():
            os.makedirs(cfg.output_dir, exist_ok=True)
            ckpt.remove_leftovers(cfg.output_dir)
            self.logger = MetricsLogger(cfg.output_dir, tensorboard=cfg.tensorboard)
        else:
            self.logger = NullLogger(cfg.output_dir)
        distributed.barrier()
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
        """This rank's part of the next global micro-batch, collated (on the CPU). When the
        part is empty (only the last global micro-batch of an epoch can be short), a stand-in
        row is returned and `batch_is_filler` is set: the loop runs it (keeping the ranks in
        step for FSDP's collectives) with its loss multiplied by 0."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        gbs, world, r = self.global_batch_size, distributed.world_size(), distributed.rank()
        rows = self._permutation(self.epoch)[self.batch_index * gbs:(self.batch_index + 1) * gbs]
        idx = rows[r * len(rows) // world:(r + 1) * len(rows) // world]
        self.batch_is_filler = not idx
        self.batch_index += 1
        return self.collate([self.train_dataset[i] for i in (idx or rows[-1:])])

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

        bar = tqdm(total=self.total_steps, initial=self.step,
                   disable=not cfg.progress or not distributed.is_main(), desc="train",
                   dynamic_ncols=True)
        self.model.train()
        last: dict = {}
        try:
            while self.step < self.total_steps:
                last = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}",
                                tok_s=f"{last.get('tokens_per_s', 0.0):.0f}")
            if self.eval_dataset is not None and not any(k.startswith("eval") for k in last):
                ev = self.evaluate()
                if ev:
                    self.logger.log(self.step, ev)
                    last = {**last, **ev}
            with self.full_trainable_parameters():
                if distributed.is_main():
                    self.on_train_end()
            distributed.barrier()
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        if cfg.plots and distributed.is_main():
            plot_metrics(cfg.output_dir)
        return last

    def train_step(self) -> dict:
        cfg = self.config
        step = self.step + 1
        start = time.perf_counter()
        batches = []  # (batch on the device, is_filler)
        for _ in range(self._micro_batches_this_step()):
            batch = self.next_batch()
            batches.append((_to(batch, self.device), self.batch_is_filler))
        real = [b for b, filler in batches if not filler]
        # summed over ranks: every rank normalises by the labelled items of the global step
        num_items = int(distributed.all_reduce_sum(sum(self.num_items(b) for b in real)))
        tokens = sum(self.num_tokens(b) for b in real)
        lr = self.scheduler.get_last_lr()[0]
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        extra: dict[str, float] = {}
        bad = None  # the first non-finite loss of this rank
        for b, filler in batches:
            with self.autocast():
                loss, metrics = self.compute_loss(b, max(num_items, 1))
            if filler:
                loss, metrics = loss * 0.0, {}
            if not torch.isfinite(loss.detach()).all():
                if bad is None:
                    bad = loss.detach().float().item()
                if self._fsdp:  # keep FSDP's backward collectives in step; the update is dropped
                    torch.nan_to_num(loss, 0.0, 0.0, 0.0).mul(0.0).backward()
                continue
            loss.backward()
            loss_total += loss.detach().float()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v)
        loss_value, tokens, extra, bad, n_batches = self._reduce_step_stats(
            loss_total.item(), tokens, extra, bad, len(real))
        extra = {k: v / max(n_batches, 1) for k, v in extra.items()}
        if bad is not None and cfg.on_nan == "stop":
            raise NonFiniteLossError(
                f"step {step}: the loss is {bad} (train.on_nan=stop; "
                f"set train.on_nan=skip to skip such updates)")
        finite = bad is None
        grad_norm = None
        if finite:
            self.sync_gradients()
            grad_norm = self.clip_and_norm_gradients()
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
        metrics = {"loss": loss_value if finite else float("nan"), "lr": lr,
                   "epoch": self.epoch + self.batch_index / self.batches_per_epoch,
                   "tokens": tokens, "tokens_per_s": tokens / elapsed, **extra}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return self.finish_step(step, metrics)

    def finish_step(self, step: int, metrics: dict) -> dict:
        """After an optimizer step (the stages that write their own train_step call it too):
        skipped_steps, eval_every, logging, history, save_every, on_step_end."""
        cfg = self.config
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        if cfg.eval_every and step % cfg.eval_every == 0:
            metrics.update(self.evaluate())
        evaluated = any(k.startswith("eval") for k in metrics)
        if step % cfg.log_every == 0 or step == self.total_steps or evaluated:
            self.logger.log(step, metrics)
        self.history.append({"step": step, **metrics})
        if cfg.save_every and (step % cfg.save_every == 0 or step == self.total_steps):
            self.save_checkpoint()
        self.on_step_end(step, metrics)
        return metrics

    def _reduce_step_stats(self, loss: float, tokens: int, extra: dict, bad, n_batches: int):
        """Sums over ranks of a step's loss, tokens, metric sums and micro-batch count, and the
        first non-finite loss of any rank (so every rank takes the same decision)."""
        if not distributed.is_distributed():
            return loss, tokens, extra, bad, n_batches
        gathered = distributed.all_gather_object((loss, tokens, extra, bad, n_batches))
        loss = sum(g[0] for g in gathered)
        tokens = sum(g[1] for g in gathered)
        summed: dict[str, float] = {}
        for g in gathered:
            for k, v in g[2].items():
                summed[k] = summed.get(k, 0.0) + v
        bad = next((g[3] for g in gathered if g[3] is not None), None)
        return loss, tokens, summed, bad, sum(g[4] for g in gathered)

    def sync_gradients(self) -> None:
        """Sum the trainable parameters' gradients over ranks: one flat all-reduce (fp32) per
        optimizer step, after accumulation. A no-op in one process; under FSDP only the
        parameters outside the sharded model (a stage's reward / value head) are summed here,
        FSDP's reduce-scatter sums the others in backward. Every rank must call it; a parameter
        without a gradient on every rank keeps grad None (so AdamW skips it, as in one
        process)."""
        if not distributed.is_distributed():
            return
        params = [p for _, p in self.trainable_parameters()]
        if self._fsdp:
            from torch.distributed.tensor import DTensor

            params = [p for p in params if not isinstance(p, DTensor)]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        has = distributed.all_reduce_sum(has) > 0
        params = [p for p, h in zip(params, has.tolist()) if h]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        flat = distributed.all_reduce_sum(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def clip_and_norm_gradients(self) -> torch.Tensor:
        """Clip to train.max_grad_norm (when set); returns the total gradient norm (a plain
        tensor also for FSDP's DTensor gradients). Under FSDP the sharded gradients and those
        of a head outside the model (plain tensors) are normed apart and combined, as
        torch's foreach norm takes one kind at a time."""
        params = [p for _, p in self.trainable_parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        groups: dict[bool, list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault(hasattr(p.grad, "full_tensor"), []).append(p)
        parts = []
        for sharded, group in groups.items():
            part = torch.nn.utils.get_total_norm([p.grad for p in group])
            parts.append(part.full_tensor() if sharded else part)
        norm = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(
            torch.stack([x.float().to(parts[0].device) for x in parts]))
        if self.config.max_grad_norm is not None:
            for group in groups.values():
                torch.nn.utils.clip_grads_with_norm_(group, self.config.max_grad_norm,
                                                     norm.to(group[0].grad.device))
        return norm

    # ---- FSDP2 ----------------------------------------------------------------------------

    def _setup_fsdp_process_group(self) -> None:
        if not distributed.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                       if k not in os.environ]
            if missing:
                raise ValueError(f"train.fsdp: true needs a torchrun launch (torchrun "
                                 f"--nproc_per_node=N ...); {missing} not set in the "
                                 f"environment")
            distributed.init_distributed(force=True)

    def _apply_fsdp(self) -> None:
        """FSDP2: fully_shard every decoder layer (the classes in the model's
        _no_split_modules), then the root; gradients are summed (divide factor 1), as the
        loss is already normalised by the global num_items."""
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(self.model, "_no_split_modules", None) or [])
        layers = [m for m in self.model.modules() if type(m).__name__ in names]
        if not layers:
            raise ValueError(f"train.fsdp: found no decoder layers to shard in "
                             f"{type(self.model).__name__} (looked for _no_split_modules "
                             f"{sorted(names)})")
        heads = list(self.heads().items())
        for prefix, head in heads:  # so the model's state dict (and FSDP's) names them
            if hasattr(self.model, prefix):
                raise ValueError(f"train.fsdp: the model already has an attribute {prefix!r}")
            self.model.add_module(prefix, head)
        mods = ([fully_shard(m) for m in layers] + [fully_shard(h) for _, h in heads]
                + [fully_shard(self.model)])
        for m in mods:
            m.set_gradient_divide_factor(1.0)
            # plain SUM collectives (a factor != world size would use NCCL's PreMulSum, which
            # gloo lacks; with factor 1 the extra scaling is a no-op)
            m.set_force_sum_reduction_for_comms(True)
        self._fsdp = True

    @contextlib.contextmanager
    def full_trainable_parameters(self):
        """Under FSDP: while inside, rank 0's model holds its trainable parameters as full
        (gathered) CPU tensors, so save_adapter / save_pretrained work unchanged; the other
        ranks only take part in the gathering. Every rank must enter. A no-op without FSDP."""
        if not self._fsdp:
            yield
            return
        swapped = []
        for name, p in self.trainable_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if distributed.is_main():
                owner_name, _, attr = name.rpartition(".")
                owner = self.model.get_submodule(owner_name)
                swapped.append((owner, attr, owner._parameters[attr]))
                owner._parameters[attr] = nn.Parameter(full.detach().cpu(),
                                                       requires_grad=p.requires_grad)
            del full
        try:
            yield
        finally:
            for owner, attr, original in swapped:
                owner._parameters[attr] = original

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The checkpoint state. Every rank must call it (it gathers the per-rank RNG states,
        and under FSDP the full trainable tensors and optimizer state); only rank 0's result
        is complete and written."""
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_sd, optim_sd = get_state_dict(
                self.model, self.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                         ignore_frozen_params=True))
            names = {n for n, _ in self.trainable_parameters()}
            trainable = {n: v for n, v in model_sd.items() if n in names}
        else:
            trainable = {n: p.detach().to("cpu", copy=True)
                         for n, p in self.trainable_parameters()}
            optim_sd = self.optimizer.state_dict()
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.config.seed,
            "skipped_steps": self.skipped_steps,
            "tokens_seen": self.tokens_seen,
            "trainable": trainable,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "rng_per_rank": distributed.all_gather_object(ckpt.rng_state()),
            "world_size": distributed.world_size(),
            "global_batch_size": self.global_batch_size,
            "fsdp": self._fsdp,
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> str:
        """checkpoint-<step> in output_dir, atomically; then only the newest keep_last stay.
        Every rank must call it; rank 0 writes, then all wait for it."""
        state = self.state_dict()
        path = os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        with self.full_trainable_parameters():
            if distributed.is_main():
                if self.logger is not None and self.logger._writer is not None:
                    self.logger._writer.flush()
                path = ckpt.write_checkpoint(self.config.output_dir, self.step, state,
                                             extra=self.save_extra)
                ckpt.prune_checkpoints(self.config.output_dir, self.config.keep_last)
        distributed.barrier()
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore trainable weights, optimizer, scheduler, RNG states and data position (on
        every rank, from the same directory)."""
        state = ckpt.read_checkpoint(path)
        if state["seed"] != self.config.seed:
            raise ValueError(f"{path}: saved with seed {state['seed']}, but train.seed is "
                             f"{self.config.seed}; the data order would differ")
        saved_gbs = state.get("global_batch_size", self.global_batch_size)
        if saved_gbs != self.global_batch_size:
            raise ValueError(
                f"{path}: saved with a global micro-batch of {saved_gbs} examples, but "
                f"train.batch_size x world size is {self.config.batch_size} x "
                f"{distributed.world_size()} = {self.global_batch_size}; the data position "
                f"would differ")
        if state.get("fsdp", False) != self._fsdp:
            raise ValueError(f"{path}: saved with train.fsdp={state.get('fsdp', False)}, but "
                             f"train.fsdp is {self._fsdp}; the optimizer states differ in form")
        params = dict(self.trainable_parameters())
        saved = state["trainable"]
        if set(saved) != set(params):
            missing = sorted(set(params) - set(saved))[:5]
            unexpected = sorted(set(saved) - set(params))[:5]
            raise ValueError(f"{path}: trainable parameters differ from the model's "
                             f"(missing {missing}, unexpected {unexpected})")
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=saved,
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n].to(p.device, p.dtype))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == distributed.world_size():
            ckpt.set_rng_state(per_rank[distributed.rank()])
        else:  # another world size: rank 0 takes rank 0's state, the others fresh seeds
            ckpt.set_rng_state(state["rng"])
            if distributed.rank():
                seed_everything(self.config.seed + distributed.rank()
                                + 1_000_003 * state["step"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_index = state["batch_index"]
        self.skipped_steps = state["skipped_steps"]
        self.tokens_seen = state["tokens_seen"]
        self.resumed_from = path
        if self.logger is not None:
            self.logger.truncate_after(self.step)
