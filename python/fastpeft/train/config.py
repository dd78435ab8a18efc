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


def _check_choice(block: str, obj, key: str, allowed: tuple) -> None:
    if getattr(obj, key) not in allowed:
        raise ValueError(f"{block}.{key}: {getattr(obj, key)!r} is not one of {allowed}")


def _check_range(block: str, obj, key: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, optional: bool = False) -> None:
    value = getattr(obj, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{block}.{key} must be a number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{block}.{key} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{block}.{key} must be <= {hi}, got {value!r}")


@dataclass
class RewardConfig:
    """The reward-model stage (the `rm:` block): pairwise_reward_loss(chosen, rejected,
    margin, center_coef) on the scores a scalar head reads at the last non-pad token."""

    margin: float | None = None  # a fixed margin; a "margin" field in the data wins per pair
    center_rewards_coefficient: float = 0.0  # TRL's name

    def __post_init__(self):
        _check_range("rm", self, "margin", optional=True)
        _check_range("rm", self, "center_rewards_coefficient", lo=0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DPOConfig:
    """The DPO stage (the `dpo:` block): dpo_loss with the reference = the same base with the
    adapters disabled (or, for full fine-tuning, a frozen copy)."""

    beta: float = 0.1

    def __post_init__(self):
        _check_range("dpo", self, "beta", lo=0.0, lo_open=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PPOConfig:
    """The PPO stage (the `ppo:` block), with TRL's names and defaults where TRL has them.

    reward_fn: "path/to/file.py:function" or "package.module:function", called as
        fn(prompts: list[str], completions: list[str]) -> list[float]; or reward_model: a
        directory written by the reward-model stage. At most one of the two; with neither,
        PPOTrainer needs a reward_fn callable.
    """

    reward_fn: str | None = None
    reward_model: str | None = None
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k3 (the per-token KL penalty in the reward)
    adaptive_kl: bool = False  # Ziegler et al.'s proportional controller towards target_kl
    target_kl: float = 6.0
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    response_length: int = 53
    temperature: float = 0.7
    top_p: float = 1.0
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False

    def __post_init__(self):
        if self.reward_fn is not None and self.reward_model is not None:
            raise ValueError("ppo: set one of ppo.reward_fn (\"file.py:function\") and "
                             f"ppo.reward_model (a reward-model directory), not both; got "
                             f"reward_fn={self.reward_fn!r}, reward_model={self.reward_model!r}")
        _check_choice("ppo", self, "kl_estimator", ("k1", "k3"))
        _check_range("ppo", self, "kl_coef", lo=0.0)
        _check_range("ppo", self, "target_kl", lo=0.0, lo_open=True)
        _check_range("ppo", self, "kl_horizon", lo=1)
        _check_range("ppo", self, "cliprange", lo=0.0, lo_open=True)
        _check_range("ppo", self, "cliprange_value", lo=0.0, lo_open=True)
        _check_range("ppo", self, "vf_coef", lo=0.0)
        _check_range("ppo", self, "gamma", lo=0.0, hi=1.0)
        _check_range("ppo", self, "lam", lo=0.0, hi=1.0)
        _check_range("ppo", self, "num_ppo_epochs", lo=1)
        _check_range("ppo", self, "num_mini_batches", lo=1)
        _check_range("ppo", self, "response_length", lo=1)
        _check_range("ppo", self, "temperature", lo=0.0, lo_open=True)
        _check_range("ppo", self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _check_range("ppo", self, "missing_eos_penalty", optional=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
