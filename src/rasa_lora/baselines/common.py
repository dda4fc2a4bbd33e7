"""What MoRA and PriLoRA layers and tuners share: a frozen linear layer plus a per-layer update dW that can be
merged, several named adapters, and a tuner without shared state.

A layer subclass defines `get_delta_weight(name)` (dW in the base weight's layout) and `adapter_output(name, x)`
(dW x without building dW); `merge` adds dW to the base weight, `unmerge` subtracts the dW it added (kept from the
merge, so unmerging is exact even after the adapter changed), `forward` adds every active adapter's output.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from rasa_lora.adapter.registration import ensure_peft_type_member


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register a method with PEFT (an enum member is created first, see `rasa_lora.adapter.registration`)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type_member(name)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


class DeltaLayer(BaseTunerLayer):
    """Merging, unmerging and the forward pass of a layer whose adapters each add a dense update dW."""

    def _init_delta_layer(self, base_layer: nn.Module) -> None:
        from peft.tuners.tuners_utils import _get_in_out_features

        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_deltas: dict[str, torch.Tensor] = {}
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def adapter_factory(self) -> dict:
        """Device and dtype of new adapter tensors: the base weight's (PEFT then casts them to float32 unless
        `autocast_adapter_dtype=False`, which keeps them in the base model's dtype)."""
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return {"device": weight.device, "dtype": dtype}

    def has_adapter(self, name: str) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def delta_weight_float(self, name: str) -> torch.Tensor:
        """dW in (out, in) layout, float32 at least; subclasses define it."""
        raise NotImplementedError

    def get_delta_weight(self, name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return transpose(self.delta_weight_float(name), self.fan_in_fan_out).to(weight.device, weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if not self.has_adapter(name):
                continue
            delta = transpose(self.delta_weight_float(name).detach(), self.fan_in_fan_out).to(base.weight.device)
            merged = base.weight.data.to(delta.dtype) + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaN or inf in the merged weights of adapter {name!r}; the adapter is broken, the "
                                 "base weights were left unchanged.")
            base.weight.data = merged.to(base.weight.dtype)
            self._merged_deltas[name] = delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            delta = self._merged_deltas.pop(self.merged_adapters.pop())
            base.weight.data = (base.weight.data.to(delta.dtype) - delta).to(base.weight.dtype)

    def delta_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The layer's forward (each `Linear` calls it: `nn.Module` comes first in their bases)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if self.has_adapter(name):
                result = result + self.adapter_output(name, x).to(result.dtype)
        return result


class DeltaTuner(BaseTuner):
    """A tuner whose layers are `DeltaLayer`s built by `layer_cls(base, adapter_name, config, **extra)`."""

    target_module_mapping: dict = {}
    layer_cls: type

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def layer_kwargs(self, config, adapter_name: str, current_key: str) -> dict:
        """Per-module arguments of `update_layer` beyond the config (PriLoRA: the module's rank)."""
        return {}

    def _create_and_replace(self, config, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        kwargs = self.layer_kwargs(config, adapter_name, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        from transformers.pytorch_utils import Conv1D

        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(f"{type(self).__name__[:-5]} adapts nn.Linear and transformers' Conv1D only; "
                             f"{current_key} is a {type(base).__name__}. Leave it out of target_modules.")
        config.fan_in_fan_out = isinstance(base, Conv1D)
        new_module = self.layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
