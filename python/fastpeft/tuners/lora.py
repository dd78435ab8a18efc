"""LoRA layers (with rsLoRA scaling and DoRA) over nn.Linear / Conv1D, computed by the fused
lora_linear op (lora_linear_multi for a mixed batch); parameters named as peft names them
(lora_A.<adapter>.weight is [r, in], lora_B [out, r], lora_magnitude_vector.<adapter>.weight
[out]). Also the weighted combination of LoRA adapters (peft's add_weighted_adapter)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft import ops
from fastpeft.tuners.base import TunerLayer, autocast_like
from fastpeft.tuners.config import LoraConfig


class DoraMagnitude(nn.Module):
    """DoRA's trained magnitude m [out] of one adapter (peft's DoraLinearLayer keeps it as
    `.weight`, hence the live name `lora_magnitude_vector.<adapter>.weight`)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(TunerLayer):
    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self._dora_norms: dict[str, torch.Tensor] = {}  # ||W + dW||_c of merged DoRA adapters

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
        self.use_dora[adapter_name] = bool(config.use_dora)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        if config.use_dora:
            # peft: m starts as the column-wise norm of W + scaling * B A (= ||W||_c when B = 0)
            with torch.no_grad():
                norm = torch.linalg.norm(self._weight_plus_delta(adapter_name), dim=1)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(w.dtype))

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
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.use_dora,
                  self._dora_norms):
            d.pop(adapter_name, None)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B A as [out, in] in fp32."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    def _weight_plus_delta(self, adapter_name: str) -> torch.Tensor:
        return self.base_weight().float() + self.delta_weight(adapter_name)

    # Merging (peft's DoRA merge: W' = m / ||W0 + dW||_c * (W + dW), with W0 the base weight
    # without the adapters merged before; the norm is kept to unmerge).
    def _merge_one(self, adapter_name: str) -> None:
        with torch.no_grad():
            w = self.base_weight().float()
            delta = self.delta_weight(adapter_name)
            if adapter_name not in self.lora_magnitude_vector:
                self._set_base_weight(w + delta)
                return
            norm = torch.linalg.norm(self._unmerged_base_weight() + delta, dim=1)
            self._dora_norms[adapter_name] = norm
            self._set_base_weight(self._dora_factor(adapter_name) * (w + delta))

    def _unmerge_one(self, adapter_name: str) -> None:
        with torch.no_grad():
            self._set_base_weight(self._unmerged(adapter_name, self.base_weight().float()))
        self._dora_norms.pop(adapter_name, None)

    def _unmerged(self, adapter_name: str, w: torch.Tensor) -> torch.Tensor:
        """w ([out, in], fp32) with merged adapter `adapter_name` taken out."""
        delta = self.delta_weight(adapter_name)
        if adapter_name not in self.lora_magnitude_vector:
            return w - delta
        return w / self._dora_factor(adapter_name) - delta

    def _unmerged_base_weight(self) -> torch.Tensor:
        w = self.base_weight().float()
        for name in reversed(self.merged_adapters):
            w = self._unmerged(name, w)
        return w

    def _dora_factor(self, adapter_name: str) -> torch.Tensor:
        m = self.lora_magnitude_vector[adapter_name].weight.float()
        return (m / self._dora_norms[adapter_name]).view(-1, 1)

    def _set_base_weight(self, w: torch.Tensor) -> None:
        """Write w ([out, in]) into the base layer's weight (transposed for Conv1D)."""
        target = self.base_layer.weight
        with torch.no_grad():
            target.copy_((w.t() if self.fan_in_fan_out else w).to(target.dtype))

    # Forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        ctx = getattr(self, "_fastpeft_ctx", None)
        if ctx is not None and ctx.row_adapter_ids is not None:
            return self._mixed_batch_forward(x, ctx.row_adapter_ids, ctx.adapter_order,
                                             args, kwargs)
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        # Adapters are applied in order on the running result, as peft does (a DoRA adapter's
        # base output is that result); the first plain LoRA one is fused with the base GEMM.
        result = None
        for name in active:
            if name in self.lora_magnitude_vector:
                if result is None:
                    result = self.base_layer(x, *args, **kwargs)
                result = self._dora_forward(name, x, result)
            elif result is None:
                result = ops.lora_linear(
                    *autocast_like(x, self.base_weight(), self.base_layer.bias,
                                   self.lora_A[name].weight, self.lora_B[name].weight),
                    self.scaling[name], self.lora_dropout[name], self.training,
                )
            else:
                result = result + self._lora_branch(name, x)
        return result if result is not None else self.base_layer(x, *args, **kwargs)

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout[name]
        h = F.dropout(x, p, self.training) if p else x
        lora = F.linear(F.linear(h, self.lora_A[name].weight), self.lora_B[name].weight)
        return lora * self.scaling[name]

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """peft's DoRA: result + (m / ||W + s B A||_c - 1) * x W^T + m / ||.||_c * s * x A^T B^T,
        the norm detached; with dropout in training both terms see dropout(x)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        scaling, p = self.scaling[name], self.lora_dropout[name]
        weight = self.base_weight()
        if p and self.training:
            x = F.dropout(x, p, True)
            base = F.linear(x, weight)
        else:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        with torch.no_grad():
            norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1).to(weight.dtype)
        mag_norm_scale = (self.lora_magnitude_vector[name].weight / norm).view(1, -1)
        lora = F.linear(F.linear(x, a), b)
        return result + (mag_norm_scale - 1) * base + mag_norm_scale * lora * scaling

    def _mixed_batch_forward(self, x: torch.Tensor, rows: torch.Tensor, order: list[str],
                             args: tuple, kwargs: dict) -> torch.Tensor:
        """Row i of the batch through adapter order[rows[i]] (-1: the base layer alone), with
        the adapters this layer carries stacked (zero-padded to one rank) for lora_linear_multi."""
        if self.merged_adapters:
            raise ValueError(
                f"adapter_ids (a mixed batch) cannot be used while adapters {self.merged_adapters} "
                "are merged; call fastpeft.unmerge(model) first"
            )
        used = [order[i] for i in sorted(set(rows.tolist())) if i >= 0 and order[i] in self.lora_A]
        dora = [n for n in used if n in self.lora_magnitude_vector]
        if dora:
            raise ValueError(
                f"adapter_ids (a mixed batch) does not support DoRA adapters, got {dora}"
            )
        if not used:
            return self.base_layer(x, *args, **kwargs)
        local = torch.full((len(order) + 1,), -1, dtype=torch.long)  # index -1 (base) -> -1
        for j, name in enumerate(used):
            local[order.index(name)] = j
        ids = local[rows.cpu()]
        if self.training and any(self.lora_dropout[n] for n in used):
            return self._mixed_batch_with_dropout(x, ids, used, args, kwargs)
        r = max(self.r[n] for n in used)
        lora_a = torch.stack([F.pad(self.lora_A[n].weight, (0, 0, 0, r - self.r[n])) for n in used])
        lora_b = torch.stack([F.pad(self.lora_B[n].weight, (0, r - self.r[n])) for n in used])
        return ops.lora_linear_multi(
            *autocast_like(x, self.base_weight(), self.base_layer.bias, lora_a, lora_b),
            [self.scaling[n] for n in used], ids,
        )

    def _mixed_batch_with_dropout(self, x, ids, used, args, kwargs) -> torch.Tensor:
        """Training with LoRA dropout (lora_linear_multi has none): per adapter in torch."""
        result = self.base_layer(x, *args, **kwargs)
        ids = ids.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        for j, name in enumerate(used):
            result = result + (ids == j).to(x.dtype) * self._lora_branch(name, x)
        return result


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "linear",
) -> None:
    """Add LoRA adapter `adapter_name` combining `adapters` with `weights`, as peft's
    LoraModel.add_weighted_adapter does (not made active; see fastpeft.set_adapter).

    Args:
        model: a model patched with LoRA adapters.
        adapters: names of existing adapters to combine.
        weights: one weight per adapter (negative subtracts).
        adapter_name: name of the new adapter.
        combination_type: "linear" (the same r everywhere; A = sum sign*sqrt(|w s|) A_i and
            B = sum sqrt(|w s|) B_i, an approximation) or "cat" (A and B concatenated along
            the rank, r = sum of ranks; exactly sum w_i s_i B_i A_i).

    The new adapter's config is the first adapter's with r = lora_alpha = the combined rank,
    target_modules the union of theirs, and no rank/alpha patterns.
    """
    from fastpeft import patching

    state = patching.state_of(model)
    if state.peft_type != "LORA":
        raise ValueError(
            f"add_weighted_adapter combines LoRA adapters, the model has {state.peft_type}"
        )
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    unknown = [a for a in adapters if a not in state.configs]
    if not adapters or unknown:
        raise ValueError(
            f"adapters must name existing adapters {list(state.configs)}, got {adapters}"
        )
    if len(weights) != len(adapters):
        raise ValueError(
            f"weights must have one entry per adapter ({len(adapters)}), got {len(weights)}"
        )
    if adapter_name in state.configs:
        raise ValueError(f"adapter_name {adapter_name!r} already exists; delete_adapter it first")
    if combination_type not in ("linear", "cat"):
        raise ValueError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    _check_modules_to_save(model, adapters)
    if len(adapters) == 1:
        combination_type = "linear"
    configs = [state.configs[a] for a in adapters]
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}")
    new_rank = ranks[0] if combination_type == "linear" else sum(ranks)
    config = configs[0].replace(r=new_rank, lora_alpha=new_rank, alpha_pattern={}, rank_pattern={},
                                target_modules=_union_of_targets(model, configs))
    patching.add_adapter(model, config, adapter_name)
    for layer in model.modules():
        if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
            _combine_into(layer, adapters, weights, adapter_name, combination_type)


def _check_modules_to_save(model: nn.Module, adapters: list[str]) -> None:
    from fastpeft.tuners.base import ModulesToSave

    for m in model.modules():
        if isinstance(m, ModulesToSave) and sum(a in m.modules_to_save for a in adapters) > 1:
            raise ValueError(
                "add_weighted_adapter cannot combine adapters that train the same module in "
                f"modules_to_save; adapters {adapters} do"
            )


def _union_of_targets(model: nn.Module, configs: list[LoraConfig]) -> list[str] | str:
    """peft's rule: regexes are or-ed, name lists united; "all-linear" counts as the list of
    the linear modules it resolved to (peft rewrites it so on injection)."""
    from fastpeft.tuners.targets import find_targets

    targets = [find_targets(model, c.target_modules) if c.target_modules == "all-linear"
               else c.target_modules for c in configs]
    if len({type(t) for t in targets}) > 1:
        raise ValueError(
            "adapters to combine must all give target_modules as a regex or all as a list, got "
            f"{[c.target_modules for c in configs]}"
        )
    if isinstance(targets[0], str):
        return targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def _combine_into(layer: LoraLinear, adapters: list[str], weights: list[float], new: str,
                  combination_type: str) -> None:
    target_a, target_b = layer.lora_A[new].weight, layer.lora_B[new].weight
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    with torch.no_grad():
        target_a.zero_()
        target_b.zero_()
        if not present:
            return
        if combination_type == "cat":
            a = torch.cat([layer.lora_A[n].weight * (w * layer.scaling[n]) for n, w in present], 0)
            b = torch.cat([layer.lora_B[n].weight for n, _ in present], 1)
            target_a[: a.shape[0]] = a
            target_b[:, : b.shape[1]] = b
            return
        ranks = {layer.r[n] for n, _ in present}
        if ranks != {layer.r[new]}:
            raise ValueError(
                f"combination_type 'linear' needs one rank in every layer; a layer has ranks "
                f"{sorted(ranks)} for {[n for n, _ in present]} and {layer.r[new]} for {new!r}"
            )
        a = torch.zeros_like(target_a, dtype=torch.float32)
        b = torch.zeros_like(target_b, dtype=torch.float32)
        for n, w in present:
            ws = w * layer.scaling[n]
            root = math.sqrt(abs(ws))
            a += (root if ws >= 0 else -root) * layer.lora_A[n].weight.float()
            b += root * layer.lora_B[n].weight.float()
        target_a.copy_(a)
        target_b.copy_(b)
