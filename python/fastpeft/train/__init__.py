"""Training: the generic loop (Trainer, TrainConfig, atomic checkpoints, logs) and the stages
built on it (SFTTrainer, RewardTrainer, PPOTrainer, DPOTrainer)."""

from fastpeft.train.checkpoint import latest_checkpoint, list_checkpoints
from fastpeft.train.config import TrainConfig
from fastpeft.train.config import DPOConfig, PPOConfig, RewardConfig  # noqa: I001
from fastpeft.train.dpo import DPOTrainer
from fastpeft.train.loop import NonFiniteLossError, Trainer
from fastpeft.train.metrics import plot_metrics, read_metrics
from fastpeft.train.ppo import PPOTrainer
from fastpeft.train.reward import RewardModel, RewardTrainer, load_reward_model
from fastpeft.train.sft import SFTTrainer

__all__ = ["NonFiniteLossError", "SFTTrainer", "TrainConfig", "Trainer", "latest_checkpoint",
           "list_checkpoints", "plot_metrics", "read_metrics"]
__all__ += ["DPOConfig", "DPOTrainer", "RewardConfig", "RewardModel", "RewardTrainer",
            "load_reward_model"]
__all__ += ["PPOConfig", "PPOTrainer"]
