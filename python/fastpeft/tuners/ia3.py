"""IA3 layers over nn.Linear / Conv1D, computed by the fused ia3_linear op; the learned vector is
named and shaped as peft has it: `<path>.ia3_l.<adapter>`, [1, in] on feed-forward layers
(`(x * l) W^T + b`) and [out, 1] elsewhere (`(x W^T + b) * l`)."""

from __future__ import annotations

import re

import torch
from torch import nn

from fastpeft import ops
from fastpeft.tuners.base import TunerLayer, autocast_like
from fastpeft.tuners.config import IA3Config

# peft divides by l + 1e-8 when it unmerges (IA3's unmerge is only approximate).
UNMERGE_EPS = 1e-8


def is_feedforward(key: str, feedforward_modules: str | list[str] | None) -> bool:
    """peft's rule (IA3Model._check_target_module_feedforward): a str is a regex matched against
    the whole path; a list matches any path that ends with one of its names (no "." needed)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, key) is not None
    return any(key.endswith(name) for name in feedforward_modules)


class IA3Linear(TunerLayer):
    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: bool | None = None  # fixed by the first adapter, as in peft

    def update_layer(self, adapter_name: str, config: IA3Config, key: str) -> None:
        if self.is_feedforward is None:
            self.is_feedforward = is_feedforward(key, config.feedforward_modules)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        w = self.base_layer.weight
        # peft draws randn in fp32 and then moves it to the base layer's device and dtype.
        l = torch.randn(shape).to(device=w.device, dtype=w.dtype)
        if config.init_ia3_weights:
            l.fill_(1.0)
        self.ia3_l[adapter_name] = nn.Parameter(l)

    def _scale(self, names: list[str]) -> torch.Tensor:
        """The product of the adapters' vectors, flat (peft multiplies active adapters)."""
        scale = self.ia3_l[names[0]].reshape(-1)
        for name in names[1:]:
            scale = scale * self.ia3_l[name].reshape(-1)
        return scale

    def _scale_base(self, adapter_name: str, inverse: bool) -> None:
        """W (as [out, in]) times l along in (feed-forward) or out, and the bias times l when
        l scales the output; inverse divides by l + 1e-8 as peft's unmerge does."""
        l = self.ia3_l[adapter_name].detach().reshape(-1).float()
        if inverse:
            l = l + UNMERGE_EPS
        w = self.base_weight()
        bias = self.base_layer.bias
        with torch.no_grad():
            factor = l.view(1, -1) if self.is_feedforward else l.view(-1, 1)
            w.copy_((w.float() / factor if inverse else w.float() * factor).to(w.dtype))
            if not self.is_feedforward and bias is not None:
                bias.copy_((bias.float() / l if inverse else bias.float() * l).to(bias.dtype))

    def _merge_one(self, adapter_name: str) -> None:
        self._scale_base(adapter_name, inverse=False)

    def _unmerge_one(self, adapter_name: str) -> None:
        self._scale_base(adapter_name, inverse=True)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self.disabled or not active:
            return self.base_layer(x, *args, **kwargs)
        scale = self._scale(active)
        x, weight, bias, scale = autocast_like(x, self.base_weight(), self.base_layer.bias, scale)
        return ops.ia3_linear(x, weight, bias, scale.to(x.dtype), self.is_feedforward)
