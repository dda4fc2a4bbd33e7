r"""The RaSA layer: a frozen linear layer plus the rank-sharing update of paper eq. 5.

For layer i of a group of L layers (all modules with the same path once the layer index is removed),
with input size a and output size b, r ranks per layer of which k go to the shared pool:

    dW_i = [B~_i  B_S] diag(D_i) [A~_i ; A_S]
         = B~_i diag(D_i[:r-k]) A~_i  +  B_S diag(D_i[r-k:]) A_S

    B~_i: (b, r-k)   A~_i: (r-k, a)   private to layer i      (`rasa_B`, `rasa_A`)
    B_S:  (b, L*k)   A_S:  (L*k, a)   shared by the group     (owned by the tuner, `rasa_shared_B/A`)
    D_i:  (r-k+L*k,)                  private, trainable      (`rasa_D`)

    y = x W^T + c + dW_i dropout(x)

Initialisation (eq. 6): Kaiming-uniform A~_i and A_S, zero B~_i and B_S, and D_i equal to alpha/(2(r-k))
on the private ranks and alpha/(2Lk) on the shared ones. There is no further alpha/r factor.

With k = r there is no private rank and with k = 0 no pool: the empty factors are not registered (nor saved), and
`factors()` / `private_factors()` / `shared_factors()` give them as zero-element tensors.

The pool lives on the tuner (a registered parameter there, saved once); this layer keeps an unregistered
reference to the tuner's containers and looks the tensors up on every call, so FSDP and `.to()` see one
parameter. Merging adds dW_i to the base weight and records the exact factors it used, so unmerging
subtracts exactly what was added even if another layer's merge or an optimiser touched the pool since;
a merged layer refuses to run once its pool has changed (its merged weight would be stale).

Two variants reuse this class: `experts.ParamWrapper` applies eq. 5 to each expert of a 3-D expert stack (every
factor gains a leading expert dimension), and a bitsandbytes 4-bit base (`rasa_lora.quant`) is merged dense and, on
the fused path, dequantized per call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from rasa_lora import quant, settings
from rasa_lora.ops import dropout as _dropout
from rasa_lora.ops import dropout_mask, dropout_scale, fused_backend_enabled, mask_seed, rasa_linear

_SNAPSHOT_KEYS = ("A_p", "B_p", "D", "A_s", "B_s")


def init_eq6(init_weights: bool, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
             D: torch.Tensor | None = None, num_private: int = 0, alpha: float = 0.0) -> None:
    """Paper eq. 6, in place, for a layer's private factors and D or a group's pool (each may carry a leading expert
    dimension): A Kaiming-uniform, B zero
    (normal, std 0.02, with init_weights=False: tests only), D alpha/(2(r-k)) on its first `num_private` entries and
    alpha/(2Lk) on the others. No further alpha/r factor."""
    with torch.no_grad():
        if A is not None and A.numel():
            kaiming_init(A)
        if B is not None:
            nn.init.zeros_(B) if init_weights else nn.init.normal_(B, std=0.02)
        if D is not None:
            num_shared = D.shape[-1] - num_private
            if num_private:
                D[..., :num_private] = alpha / (2 * num_private)
            if num_shared:
                D[..., num_private:] = alpha / (2 * num_shared)


class RasaLayer(BaseTunerLayer):
    """Mixin holding RaSA's per-layer state; `Linear` below is the module that replaces `nn.Linear`/`Conv1D`."""

    adapter_layer_names = ("rasa_A", "rasa_B", "rasa_D")
    other_param_names = ("r", "rasa_k", "rasa_alpha", "rasa_dropout", "rasa_group", "rasa_num_layers")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.rasa_k: dict[str, int] = {}
        self.rasa_alpha: dict[str, float] = {}
        self.rasa_group: dict[str, str] = {}
        self.rasa_num_layers: dict[str, int] = {}
        self.rasa_dropout: dict[str, float] = {}  # the input dropout's p: one mask for every path (`ops.dropout`)
        self.rasa_A = nn.ParameterDict({})
        self.rasa_B = nn.ParameterDict({})
        self.rasa_D = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # adapter -> the factors (and pool versions) used at merge time; see `merge`/`unmerge`.
        self._merge_records: dict[str, dict] = {}
        # Unregistered references to the tuner's pool containers (registering them here would save the pool
        # once per layer and break FSDP2's per-layer sharding).
        object.__setattr__(self, "_rasa_pools", None)
        self.in_features, self.out_features = self._base_in_out()
        self.kwargs = kwargs

    def _base_in_out(self) -> tuple[int, int]:
        """(in_features, out_features) of the adapted weight."""
        return _get_in_out_features(self.get_base_layer())

    def _base_tensor(self) -> torch.Tensor:
        """The adapted base tensor (the layer's weight; an expert stack's parameter in `experts.ParamWrapper`)."""
        return self.get_base_layer().weight

    def _base_dtype(self) -> torch.dtype:
        """The dtype dW takes in `get_delta_weight` (a 4-bit base: the dtype it dequantizes to)."""
        return self._base_tensor().dtype

    def _base_device(self) -> torch.device:
        return self._base_tensor().device

    def _lead_shape(self) -> tuple[int, ...]:
        """Leading dimensions of every factor: () here, (num_experts,) for a stack of experts."""
        return ()

    def _oriented(self, delta: torch.Tensor) -> torch.Tensor:
        """dW from the (b, a) layout to the base tensor's ((a, b) for `Conv1D`)."""
        return transpose(delta, self.fan_in_fan_out)

    def update_layer(self, adapter_name: str, config, group: str, pools, num_layers: int) -> None:
        """Create adapter `adapter_name` on this layer; `pools` is the tuner's `RasaPools`."""
        r, k = config.r, config.rasa_k
        num_private = r - k
        object.__setattr__(self, "_rasa_pools", pools)
        self.r[adapter_name] = r
        self.rasa_k[adapter_name] = k
        self.rasa_alpha[adapter_name] = config.rasa_alpha
        self.rasa_group[adapter_name] = group
        self.rasa_num_layers[adapter_name] = num_layers
        self.rasa_dropout[adapter_name] = float(config.rasa_dropout)
        factory = {"device": self._base_device(), "dtype": torch.float32}
        for container in (self.rasa_A, self.rasa_B):
            if adapter_name in container:
                del container[adapter_name]
        lead = self._lead_shape()
        if num_private:  # k = r leaves no private rank: no zero-element parameters are registered (or saved)
            self.rasa_A[adapter_name] = nn.Parameter(torch.empty(*lead, num_private, self.in_features, **factory))
            self.rasa_B[adapter_name] = nn.Parameter(torch.empty(*lead, self.out_features, num_private, **factory))
        self.rasa_D[adapter_name] = nn.Parameter(torch.empty(*lead, num_private + num_layers * k, **factory))
        self.reset_rasa_parameters(adapter_name, config.init_weights)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_rasa_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Eq. 6 for this layer's private factors and D (the tuner applies it to the pool)."""
        num_private = self.r[adapter_name] - self.rasa_k[adapter_name]
        init_eq6(init_weights, self.rasa_A.get(adapter_name), self.rasa_B.get(adapter_name),
                 self.rasa_D[adapter_name], num_private, self.rasa_alpha[adapter_name])

    # --- the pool --------------------------------------------------------------------------------------
    def _empty(self, adapter_name: str, rows: int, cols: int) -> torch.Tensor:
        """A zero-element factor (no rank of that kind), on D's device and dtype; never a registered parameter."""
        D = self.rasa_D[adapter_name]
        return D.new_zeros(*D.shape[:-1], rows, cols)

    def private_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A~_i, B~_i); empty (0 ranks) tensors when k = r, where no private factor is registered."""
        A_p = self.rasa_A._parameters.get(adapter_name)
        if A_p is None:
            return self._empty(adapter_name, 0, self.in_features), self._empty(adapter_name, self.out_features, 0)
        return A_p, self.rasa_B[adapter_name]

    def has_pool(self, adapter_name: str) -> bool:
        """Whether the adapter shares ranks here (k > 0); with k = 0 the tuner registers no pool."""
        return self.rasa_k[adapter_name] > 0

    def shared_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_S, B_S) of this layer's group for the adapter; empty (0 ranks) tensors when k = 0."""
        if not self.rasa_k[adapter_name]:
            return self._empty(adapter_name, 0, self.in_features), self._empty(adapter_name, self.out_features, 0)
        return self._rasa_pools.get(adapter_name, self.rasa_group[adapter_name])

    def factors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """All five factors of eq. 5 (`A_p`, `B_p`, `D`, `A_s`, `B_s`), zero-element ones included."""
        A_p, B_p = self.private_factors(adapter_name)
        A_s, B_s = self.shared_factors(adapter_name)
        return {"A_p": A_p, "B_p": B_p, "D": self.rasa_D[adapter_name], "A_s": A_s, "B_s": B_s}

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The registered parameters this layer uses for the adapter: its own and its group's pool (if any)."""
        params = [c[adapter_name] for c in (self.rasa_A, self.rasa_B, self.rasa_D) if adapter_name in c]
        if self.has_pool(adapter_name):
            params.extend(self.shared_factors(adapter_name))
        return params

    # --- merging -----------------------------------------------------------------------------------------
    @staticmethod
    def _delta_from(factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """dW = B_p diag(D_p) A_p + B_s diag(D_s) A_s, in float32 at least, shape (b, a) (a stack of experts:
        (E, b, a), one dW per expert)."""
        num_private = factors["A_p"].shape[-2]
        dtype = torch.promote_types(factors["A_p"].dtype, torch.float32)
        A_p, B_p, D, A_s, B_s = (factors[key].to(dtype) for key in _SNAPSHOT_KEYS)
        device = A_p.device
        D = D.unsqueeze(-2)  # (..., 1, r-k+Lk): scales the columns of B
        delta = (B_p * D[..., :num_private]) @ A_p
        return delta + (B_s.to(device) * D[..., num_private:]) @ A_s.to(device)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """dW_i of eq. 5 in the base weight's layout and dtype ((b, a); (a, b) for `Conv1D`)."""
        delta = self._delta_from(self.factors(adapter_name)).to(self._base_device())
        return self._oriented(delta).to(self._base_dtype())

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """RaSA is additive (W + dW_i), so PEFT's `convert_to_lora` / `save_as_lora` accept it: they factor dW_i by
        SVD, exact at rank >= r-k+L*k, an approximation below. `rasa-lora export-lora` gives the exact factors."""
        return True

    def _pool_fingerprint(self, adapter_name: str) -> tuple:
        if not self.has_pool(adapter_name):
            return ()
        A_s, B_s = self.shared_factors(adapter_name)
        return (A_s._version, A_s.data_ptr(), B_s._version, B_s.data_ptr())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add dW_i of the given (default: active) adapters to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.rasa_D:
                continue
            snapshot = {key: value.detach().clone() for key, value in self.factors(name).items()}
            delta = self._oriented(self._delta_from(snapshot))
            weight = self._base_tensor()
            merged = self._dense_base(delta.dtype) + delta.to(weight.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaN or inf found in the weights of adapter {name!r} while merging {self.rasa_group[name]}; "
                    "the adapter is broken, the base weights were left unchanged."
                )
            self._store_merged(merged)
            self._merge_records[name] = {"factors": snapshot, "pool": self._pool_fingerprint(name)}
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract exactly the dW_i that `merge` added (from the recorded factors), newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            record = self._merge_records.pop(name)
            delta = self._oriented(self._delta_from(record["factors"]))
            self._store_merged(self._dense_base(delta.dtype) - delta.to(self._base_tensor().device), unmerging=True)

    def _dense_base(self, dtype: torch.dtype) -> torch.Tensor:
        """The base tensor as a dense tensor of `dtype` (a copy or a view)."""
        return self._base_tensor().data.to(dtype)

    def _store_merged(self, merged: torch.Tensor, unmerging: bool = False) -> None:
        """Write a merged (or unmerged) base tensor back, in the base tensor's dtype."""
        weight = self._base_tensor()
        weight.data = merged.to(weight.dtype)

    def check_pool_unchanged_while_merged(self) -> None:
        for name in self.merged_adapters:
            if name in self.rasa_D and self._pool_fingerprint(name) != self._merge_records[name]["pool"]:
                raise RuntimeError(
                    f"The shared pool of adapter {name!r}, group {self.rasa_group[name]!r}, changed while this layer "
                    "was merged, so the merged weight holds a stale update. Call `unmerge_adapter()` (it restores the "
                    "base weights exactly) before training, loading or editing a merged adapter, then merge again."
                )


class Linear(nn.Module, RasaLayer):
    """RaSA on an `nn.Linear` or a transformers `Conv1D` (`fan_in_fan_out=True`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, group: str, pools, num_layers: int,
                 is_target_conv_1d_layer: bool = False) -> None:
        super().__init__()
        RasaLayer.__init__(self, base_layer)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        # Whether this projection may be the last to save tensors in a gradient-checkpointed block: the tuner sets
        # False on the ones followed by another adapted projection of their block (`rasa_linear`'s
        # `last_in_block`: one autograd node instead of two, less host time).
        self.last_in_block = True
        # The layer's stream of dropout masks under the device seed (`_device_seed`): its index among the model's
        # RaSA layers, set by the tuner.
        self.rasa_stream = 0
        self.update_layer(adapter_name, config, group, pools, num_layers)

    # --- a 4-bit base (rasa_lora.quant): merged layers become dense, unmerging restores the 4-bit layer --------
    def _base_dtype(self) -> torch.dtype:
        base = self.get_base_layer()
        return quant.original_dtype(base) if quant.is_4bit(base) else base.weight.dtype

    def _dense_base(self, dtype: torch.dtype) -> torch.Tensor:
        base = self.get_base_layer()
        return quant.dequantized_weight(base).to(dtype) if quant.is_4bit(base) else super()._dense_base(dtype)

    def _store_merged(self, merged: torch.Tensor, unmerging: bool = False) -> None:
        base = self.get_base_layer()
        if quant.is_4bit(base):  # dequant(W) + dW, dense, in the dtype W had before quantization
            self.__dict__["_quantized_base"] = base  # unregistered: not saved, not trained
            self.base_layer = quant.dense_linear(base, merged.to(quant.original_dtype(base)))
        elif unmerging and not self.merged_adapters and "_quantized_base" in self.__dict__:
            self.base_layer = self.__dict__.pop("_quantized_base")  # exactly the 4-bit layer merged into
        else:
            super()._store_merged(merged, unmerging)

    def _fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The fused path's output, or None where it does not apply (then the reference path runs). Written for
        host time: it runs twice per projection and step under gradient checkpointing, so it reads the
        containers' dicts directly instead of going through `nn.Module.__getattr__` and PEFT's properties."""
        active = self._active_adapter
        if not isinstance(active, str):
            if len(active) != 1:
                return None
            active = active[0]
        modules = self._modules
        D = modules["rasa_D"]._parameters.get(active)
        if D is None or not fused_backend_enabled():
            return None
        # a 4-bit base joins the fused path, its weight dequantized for the call, only when asked to
        # (rasa_lora.quant.set_fused_on_quantized; the default is bitsandbytes' matmul on the reference path)
        quantized = type(base) not in _fusable_types()
        if quantized and not (quant.fused_on_quantized() and quant.is_4bit(base)):
            return None
        weight, bias = base.weight, base.bias
        if (not quantized and weight.requires_grad) or (bias is not None and bias.requires_grad) \
                or not x.dtype.is_floating_point:
            return None
        if self.fan_in_fan_out:
            weight = weight.t()
        p = self.rasa_dropout[active] if self.training else 0.0
        A_p = modules["rasa_A"]._parameters.get(active)
        B_p = modules["rasa_B"]._parameters.get(active) if A_p is not None else None
        if A_p is None:
            A_p, B_p = self.private_factors(active)
        A_s, B_s = self.shared_factors(active)
        if A_s.device != x.device:
            A_s, B_s = A_s.to(x.device), B_s.to(x.device)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if quantized:  # in bitsandbytes' compute dtype (autocast's under autocast), output in the input's dtype
            dtype = torch.get_autocast_dtype(device_type) if autocast else (base.compute_dtype or x.dtype)
            bias = None if bias is None else bias.to(dtype)

            def run(weight: torch.Tensor) -> torch.Tensor:
                args = (weight, bias, A_p, B_p, D, A_s, B_s)
                with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
                    return rasa_linear(x.to(dtype), *args, dropout_p=p, last_in_block=self.last_in_block)

            out = quant.call_with_transient_weight(base, dtype, run)
            return out if autocast else out.to(x.dtype)
        args = (weight, bias, A_p, B_p, D, A_s, B_s)
        seed = self._device_seed(x, p) if torch.compiler.is_compiling() or settings.DEVICE_SEED() else None
        if not autocast:  # the common case, without a context manager's cost
            return rasa_linear(x, *args, dropout_p=p, seed=seed, last_in_block=self.last_in_block)
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return rasa_linear(x, *args, dropout_p=p, seed=seed, last_in_block=self.last_in_block)

    def _device_seed(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """The call's mask seed computed on x's device from the device seed state and this layer's stream number
        (`ops.dropout.call_seed_tensor`): what a compiled or captured graph replays with fresh masks, the counter
        advancing once per forward of the model."""
        if p <= 0:
            return torch.zeros(1, dtype=torch.int64, device=x.device)
        return _dropout.call_seed_tensor(_dropout.device_state(x.device), self.rasa_stream)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged_adapters:
            self.check_pool_unchanged_while_merged()
            return self.base_layer(x, *args, **kwargs)
        out = self._fused_forward(x, self.get_base_layer())
        if out is not None:
            return out
        return self._reference_forward(x, *args, **kwargs)

    def _reference_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Plain PyTorch eq. 5 (computed in the adapter's dtype, as PEFT's LoRA does)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.rasa_D:
                result = result + self._update(x, name).to(result.dtype)
        return result

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """dropout(x) dW_i^T of adapter `name`, in the adapter's dtype; the mask and its seed are the fused path's
        (`rasa_lora.ops.dropout_mask`, `mask_seed`), so both paths train with the same noise."""
        A_p, B_p = self.private_factors(name)
        D = self.rasa_D[name]
        A_s, B_s = self.shared_factors(name)
        num_private = A_p.shape[0]
        p = self.rasa_dropout[name] if self.training else 0.0
        seed = self._device_seed(x, p) if torch.compiler.is_compiling() or settings.DEVICE_SEED() else mask_seed(p)
        dropped = self._cast_input_dtype(x, A_p.dtype)
        if p > 0:
            dropped = dropped * dropout_mask(dropped, p, seed) * dropout_scale(p)
        update = ((dropped @ A_p.t()) * D[:num_private]) @ B_p.t()
        return update + ((dropped @ A_s.to(x.device).t()) * D[num_private:]) @ B_s.to(x.device).t()

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
        """Sample j uses adapter `adapter_names[j]` ("__base__": none), as PEFT's LoRA does with `adapter_names`."""
        if len(adapter_names) != len(x):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively (one name, or '__base__', per sample).")
        if self.merged_adapters:  # PEFT's wording (its tests match it)
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.rasa_D:
                continue
            rows = [j for j, item in enumerate(adapter_names) if item == name]
            result[rows] = result[rows] + self._update(x[rows], name).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "rasa." + super().__repr__()


def kaiming_init(tensor: torch.Tensor) -> None:
    """Kaiming-uniform init (LoRA's A) of a (rows, a) factor, or of each (rows, a) slice of an (E, rows, a) stack
    (so the bound depends on a, as for a single matrix, not on rows * a)."""
    for matrix in (tensor,) if tensor.dim() == 2 else tensor.view(-1, *tensor.shape[-2:]):
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


@functools.cache
def _conv1d_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (Conv1D,)


@functools.cache
def _fusable_types() -> tuple[type, ...]:
    return (nn.Linear, *_conv1d_types())
