"""fastpeft's functional ops (fused kernels registered as torch.ops.fastpeft.*)."""

from fastpeft.ops import reference
from fastpeft.ops._backend import get_backend, set_backend, use_backend
from fastpeft.ops.adapter_bottleneck import adapter_bottleneck
from fastpeft.ops.dpo_loss import dpo_loss
from fastpeft.ops.gae import gae
from fastpeft.ops.ia3_linear import ia3_linear
from fastpeft.ops.linear_cross_entropy import linear_cross_entropy
from fastpeft.ops.linear_token_logprobs import linear_token_logprobs
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.lora_linear_multi import lora_linear_multi
from fastpeft.ops.masked_whiten import masked_whiten
from fastpeft.ops.pairwise_reward_loss import pairwise_reward_loss
from fastpeft.ops.ppo_policy_loss import ppo_policy_loss
from fastpeft.ops.ppo_value_loss import ppo_value_loss
from fastpeft.ops.prefix_attention import prefix_attention
from fastpeft.ops.token_logprobs import token_logprobs

__all__ = [
    "adapter_bottleneck",
    "dpo_loss",
    "gae",
    "get_backend",
    "ia3_linear",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "lora_linear",
    "lora_linear_multi",
    "masked_whiten",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "prefix_attention",
    "reference",
    "set_backend",
    "token_logprobs",
    "use_backend",
]
