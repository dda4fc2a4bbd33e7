r"""RaSA on a stack of experts stored as one 3-D parameter (`RasaConfig.target_parameters`), as PEFT's LoRA does it.

Since transformers 5, a mixture-of-experts block keeps its experts as fused tensors, not as `nn.Linear`s: Mixtral's
`mlp.experts` holds `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), experts first, each slice in the
(out, in) layout (`is_transposed=True` models store (E, in, out)). PEFT's LoRA adapts such a tensor with
`target_parameters` and a `ParamWrapper` that adds dW to the parameter during the forward (a parametrization);
this module does the same for RaSA, so every experts implementation (eager loop, grouped_mm) runs unchanged.

Grouping: expert e of layer i is a layer of RaSA's eq. 5 whose group is expert e of the same projection in every
layer, so each expert index has its own pool of L*k ranks:

    dW_{i,e} = [B~_{i,e}  B_S^e] diag(D_{i,e}) [A~_{i,e} ; A_S^e]        e = 0 .. E-1

    rasa_A[name]: (E, r-k, a)     rasa_B[name]: (E, b, r-k)     rasa_D[name]: (E, r-k+L*k)
    pool (tuner): rasa_shared_A[name][key]: (E, L*k, a)    rasa_shared_B[name][key]: (E, b, L*k)

with a = in_features and b = out_features of one expert (for the fused `gate_up_proj`, b = 2I: gate and up share
one update, as with PEFT's LoRA). This is the grouping the authors' code gives per-expert linears (its group key is
the module path after `layers.<i>.`, i.e. `block_sparse_moe.experts.<e>.w1`), it keeps each expert's effective rank
at r-k+L*k (35 at r=4, k=1 on Mixtral-8x7B) where one pool over all experts would give r-k+L*E*k (259), and it is
the better grouping measured on a tiny Mixtral (docs/moe.md).

Limits: no dropout on the experts' input (dW cannot be factored out of the expert's matmul, PEFT's LoRA refuses it
too; the attention projections keep theirs), no mixed adapter batches, and dW of every expert is formed at each
forward (E*b*a values, as PEFT's LoRA does).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from rasa_lora.adapter.layer import RasaLayer


class _AddDelta(nn.Module):
    """Parametrization W -> W + dW with a precomputed dW (kept in the autograd graph)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta


@contextlib.contextmanager
def _added(module: nn.Module, name: str, delta: torch.Tensor):
    """Within the block, `module.<name>` reads as the parameter plus `delta` (computed once: `parametrize.cached`)."""
    param = getattr(module, name)
    requires_grad = param.requires_grad
    parametrize.register_parametrization(module, name, _AddDelta(delta), unsafe=True)
    module.parametrizations[name].original.requires_grad_(requires_grad)
    try:
        with parametrize.cached():
            yield
    finally:
        _remove_last(module, name)


def _remove_last(module: nn.Module, name: str) -> None:
    """Remove this wrapper's parametrization of `module.<name>`, the last one registered on it."""
    chain = module.parametrizations[name]
    if len(chain) == 1:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    else:
        del chain[len(chain) - 1]


class ParamWrapper(nn.Module, RasaLayer):
    """RaSA on a 3-D expert parameter `parameter_name` of `base_layer` (the name PEFT's injection looks for when two
    parameters of one module are targeted: the second wrapper nests inside the first)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, group: str, pools, num_layers: int,
                 parameter_name: str) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        RasaLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, group, pools, num_layers)

    # --- the adapted tensor --------------------------------------------------------------------------------
    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def _base_tensor(self) -> torch.Tensor:
        return self.get_param()

    @property
    def is_transposed(self) -> bool:
        """Whether the experts store (E, in, out) rather than (E, out, in) (transformers' `is_transposed`)."""
        return bool(getattr(self.get_base_layer(), "is_transposed", False))

    def _base_in_out(self) -> tuple[int, int]:
        shape = tuple(getattr(self.get_param(), "ds_shape", self.get_param().shape))
        if len(shape) != 3:
            raise ValueError(f"target_parameters: {self.parameter_name} has shape {shape}; RaSA adapts 3-D expert "
                             "stacks (E, out, in) only. Target 2-D weights through their module (target_modules).")
        self.num_experts = shape[0]
        return (shape[2], shape[1]) if not self.is_transposed else (shape[1], shape[2])

    def _lead_shape(self) -> tuple[int, ...]:
        return (self.num_experts,)

    def _oriented(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.transpose(-2, -1) if self.is_transposed else delta

    def update_layer(self, adapter_name: str, config, group: str, pools, num_layers: int) -> None:
        if config.rasa_dropout > 0:
            warnings.warn(f"rasa_dropout={config.rasa_dropout} does not apply to the expert parameter "
                          f"{self.parameter_name!r} (dW cannot be factored out of the experts' matmul); the "
                          "targeted modules keep it.", stacklevel=2)
        super().update_layer(adapter_name, config, group, pools, num_layers)
        self.rasa_dropout[adapter_name] = 0.0

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("RaSA on expert parameters (target_parameters) does not support mixed adapter batches.")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged_adapters:
            self.check_pool_unchanged_while_merged()
            return self.base_layer(*args, **kwargs)
        active = [name for name in self.active_adapters if name in self.rasa_D]
        if not active:
            return self.base_layer(*args, **kwargs)
        delta = self.get_delta_weight(active[0])
        for name in active[1:]:
            delta = delta + self.get_delta_weight(name)
        with _added(self.get_base_layer(), self.parameter_name, delta):
            return self.base_layer(*args, **kwargs)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """PEFT's unload hook: merge this wrapper and the wrappers nested in it, return the plain experts module."""
        if merge:
            layer = self
            while isinstance(layer, ParamWrapper):
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                layer = layer.base_layer
        return self.get_base_layer()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, in={self.in_features}, " \
               f"out={self.out_features}"

    def __repr__(self) -> str:
        return "rasa." + super().__repr__()
