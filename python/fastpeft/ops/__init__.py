"""fastpeft's functional ops (fused kernels registered as torch.ops.fastpeft.*)."""

from fastpeft.ops import reference
from fastpeft.ops._backend import get_backend, set_backend, use_backend
from fastpeft.ops.adapter_bottleneck import adapter_bottleneck
from fastpeft.ops.dpo_loss import dpo_loss
from fastpeft.ops.ia3_linear import ia3_linear
from fastpeft.ops.lora_linear import lora_linear
from fastpeft.ops.lora_linear_multi import lora_linear_multi
from fastpeft.ops.pairwise_reward_loss import pairwise_reward_loss
from fastpeft.ops.prefix_attention import prefix_attention
from fastpeft.ops.token_logprobs import token_logprobs

__all__ = [
    "adapter_bottleneck",
    "dpo_loss",
    "get_backend",
    "ia3_linear",
    "lora_linear",
    "lora_linear_multi",
    "pairwise_reward_loss",
    "prefix_attention",
    "reference",
    "set_backend",
    "token_logprobs",
    "use_backend",
]
