"""What every adapter-carrying layer shares: the wrapped base layer, the adapters by name, which
of them are active, merged or disabled; and the wrapper that trains a copy of a whole module
(peft's modules_to_save)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn


def autocast_like(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """(x, *tensors) as torch.autocast would hand them to F.linear: under autocast for x's
    device, every tensor in the autocast dtype (the fused ops take one dtype); else as given."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None else t.to(dtype) for t in (x, *tensors))


class TunerLayer(nn.Module):
    """A base nn.Linear (or transformers Conv1D) with adapters of one method, kept by name in
    the nn.ModuleDict / nn.ParameterDict attributes listed in `adapter_attrs` (peft's attribute
    names, so state-dict keys match peft's: `<path>.lora_A.<adapter>.weight`)."""

    adapter_attrs: tuple[str, ...] = ()
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # The base layer's weight as [out, in] (a view for Conv1D), and its bias.
    def base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapters(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_attrs:
            names += [n for n in getattr(self, attr) if n not in names]
        return names

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield item
            else:
                yield from item.parameters()

    def update_layer(self, adapter_name: str, config, key: str) -> None:
        """Add adapter `adapter_name` as `config` says for the module at path `key`."""
        raise NotImplementedError

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [n for n in adapter_names if n in self.adapters]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self._forget(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def _forget(self, adapter_name: str) -> None:
        """Drop the per-adapter settings that are not parameters (scalings, dropout, ...)."""

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters (default: the active ones) into the base weight."""
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} adapters cannot be merged into the base weights")
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.adapters:
                continue
            self._merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _merge_one(self, adapter_name: str) -> None:
        raise NotImplementedError

    def _unmerge_one(self, adapter_name: str) -> None:
        raise NotImplementedError

    def _add_to_base(self, delta: torch.Tensor, bias_delta: torch.Tensor | None = None) -> None:
        """base weight += delta ([out, in], transposed for Conv1D), computed in fp32."""
        w = self.base_layer.weight
        with torch.no_grad():
            d = delta.t() if self.fan_in_fan_out else delta
            w.copy_((w.float() + d.float()).to(w.dtype))
            if bias_delta is not None:
                b = self.base_layer.bias
                b.copy_((b.float() + bias_delta.float()).to(b.dtype))

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}"


class ModulesToSave(nn.Module):
    """A whole module trained as a copy per adapter (peft's ModulesToSaveWrapper); the original
    stays untouched for the disabled / base path and for unpatch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_names: list[str]) -> None:
        present = [n for n in adapter_names if n in self.modules_to_save]
        self.active_adapter = present[0] if present else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    @property
    def weight(self) -> torch.Tensor:
        return self.current().weight

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
