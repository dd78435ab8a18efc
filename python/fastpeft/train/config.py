"""TrainConfig: the settings of the generic training loop (python/fastpeft/train/loop.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Settings of `Trainer`. One optimizer step consumes `grad_accum` micro-batches of
    `batch_size` examples per process (W processes under torchrun: a global batch of
    batch_size x W x grad_accum); `max_steps` (optimizer steps, when set) wins over `epochs`
    (passes over the whole dataset, shared among the ranks)."""

    output_dir: str = "out"
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: float | None = 1.0
    save_every: int | None = None
    keep_last: int | None = 3
    eval_every: int | None = None
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard per decoder layer + root); needs torchrun
    resume: str | None = None  # "auto" | a checkpoint directory | None
    on_nan: str = "stop"  # stop | skip
    log_every: int = 1
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        choices = {"scheduler": ("linear", "cosine", "constant"), "dtype": ("fp32", "bf16"),
                   "on_nan": ("stop", "skip")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"train.{key}: {getattr(self, key)!r} is not one of {allowed}")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"train.fsdp must be true or false, got {self.fsdp!r}")
        positive = ("batch_size", "grad_accum", "log_every")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("max_steps", "save_every", "eval_every", "keep_last"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ValueError(f"train.{key} must be >= 1 or None, got {value!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError("train.epochs must be > 0 when train.max_steps is not set")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
