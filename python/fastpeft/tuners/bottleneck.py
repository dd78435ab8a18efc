"""Bottleneck adapters (AdapterHub's Houlsby / Pfeiffer) on the output projections, computed by
the fused adapter_bottleneck op: with h = base_layer(x) the layer returns
`h + scaling * up(act(down(h)))`, `down` [bottleneck, out_features] and `up`
[out_features, bottleneck], bottleneck = max(1, int(out_features / reduction_factor)).

Several active adapters are applied in sequence, each to the previous one's output (AdapterHub's
`Stack` composition). The activation makes the adapter nonlinear, so it cannot be merged into
the base weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpeft import ops
from fastpeft.ops.reference import canonical_activation
from fastpeft.tuners.base import TunerLayer, autocast_like
from fastpeft.tuners.config import AdapterConfig


class BottleneckAdapter(TunerLayer):
    adapter_attrs = ("adapter_down", "adapter_up")
    mergeable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: AdapterConfig, key: str) -> None:
        d = self.out_features
        bottleneck = max(1, int(d / config.reduction_factor))
        w = self.base_layer.weight
        self.adapter_down[adapter_name] = nn.Linear(d, bottleneck, device=w.device, dtype=w.dtype)
        self.adapter_up[adapter_name] = nn.Linear(bottleneck, d, device=w.device, dtype=w.dtype)
        self.activation[adapter_name] = canonical_activation(config.activation)
        self.scaling[adapter_name] = float(config.scaling)
        self.reset_adapter_parameters(adapter_name, config.init_std)

    def reset_adapter_parameters(self, adapter_name: str, std: float) -> None:
        """AdapterHub's "bert" init: normal(0, std) weights and zero biases, so the up
        projection's output starts near zero and the adapter near identity."""
        with torch.no_grad():
            for linear in (self.adapter_down[adapter_name], self.adapter_up[adapter_name]):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)

    def _forget(self, adapter_name: str) -> None:
        self.activation.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return h
        for name in self.active_adapters:
            down, up = self.adapter_down[name], self.adapter_up[name]
            h = ops.adapter_bottleneck(
                *autocast_like(h, down.weight, down.bias, up.weight, up.bias),
                self.activation[name], self.scaling[name],
            )
        return h
