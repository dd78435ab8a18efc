"""LoRA layers (with rsLoRA scaling) over nn.Linear / Conv1D, computed by the fused lora_linear
op; parameters named as peft names them (lora_A.<adapter>.weight is [r, in], lora_B [out, r])."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastpeft import ops
from fastpeft.tuners.base import TunerLayer
from fastpeft.tuners.config import LoraConfig


class LoraLinear(TunerLayer):
    adapter_attrs = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        r, alpha = config.rank_and_alpha(key)
        w = self.base_layer.weight
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False,
                                              device=w.device, dtype=w.dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False,
                                              device=w.device, dtype=w.dtype)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = config.scaling(r, alpha)
        self.lora_dropout[adapter_name] = float(config.lora_dropout)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)

    def reset_lora_parameters(self, adapter_name: str, init: bool | str) -> None:
        """peft's inits: True = Kaiming-uniform A (a=sqrt(5)) and zero B; "gaussian" = normal A
        with std 1/r and zero B; False = both random (the adapter is not a no-op)."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:
                return  # nn.Linear's own init for both
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _forget(self, adapter_name: str) -> None:
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            d.pop(adapter_name, None)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    def _merge_one(self, adapter_name: str) -> None:
        self._add_to_base(self.delta_weight(adapter_name))

    def _unmerge_one(self, adapter_name: str) -> None:
        self._add_to_base(-self.delta_weight(adapter_name))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self.disabled or not active:
            return self.base_layer(x, *args, **kwargs)
        first, rest = active[0], active[1:]
        p = self.lora_dropout[first]
        y = ops.lora_linear(x, self.base_weight(), self.base_layer.bias,
                            self.lora_A[first].weight, self.lora_B[first].weight,
                            self.scaling[first], p, self.training)
        for name in rest:
            p = self.lora_dropout[name]
            h = nn.functional.dropout(x, p, self.training) if p else x
            y = y + self.lora_B[name](self.lora_A[name](h)) * self.scaling[name]
        return y
