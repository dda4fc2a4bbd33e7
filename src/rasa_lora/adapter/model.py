"""`RasaModel`: the PEFT tuner that groups target modules, owns the shared rank pools and injects `RasaLayer`s.

Grouping: a module's group is its path with the layer index removed (`model.layers.3.mlp.down_proj` ->
`model.layers.*.mlp.down_proj`); L is the number of targeted modules in the group. All modules of a group
must be linear layers of one shape (the paper's same-dimension assumption); otherwise a `ValueError` names
the modules and the fix before any module is replaced.

The pools are `rasa_shared_A[adapter][group]` (L*k, a) and `rasa_shared_B[adapter][group]` (b, L*k), parameters
of this module, so a checkpoint holds each once (`base_model.rasa_shared_A.<group>`), and they are found by
PEFT's state-dict logic (PEFT >= 0.21) without overrides. Trainability, deletion and dtype casting of the pools
are handled here because PEFT's per-layer logic does not see them. Loading a pool while a layer that uses it
is merged raises, and so does loading tensors of the wrong shape, before anything is copied.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import OrderedDict

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from rasa_lora import settings
from rasa_lora.adapter.config import RasaConfig
from rasa_lora.adapter.layer import Linear, RasaLayer, _conv1d_types, init_eq6
from rasa_lora.ops import dropout

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def group_of(module_path: str, layers_pattern: list[str] | str | None = None) -> str:
    """The group key of a module path: the layer index replaced by `*` (`model.layers.*.mlp.down_proj`)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for pattern in patterns:
        match = re.search(rf"(^|\.){re.escape(pattern)}\.(\d+)(?=\.|$)", module_path)
        if match:
            start, end = match.span(2)
            return module_path[:start] + "*" + module_path[end:]
    match = _LAYER_INDEX.search(module_path)
    if match is None:
        return module_path
    start, end = match.span(1)
    return module_path[:start] + "*" + module_path[end:]


def mark_last_in_block(model: nn.Module) -> None:
    """Set each RaSA layer's `last_in_block`: False where another RaSA layer follows it in its block (the module
    path up to the first layer index, `model.layers.3`), True for the last of each block and outside blocks.

    The order is the modules' registration order, which is their call order in the usual decoder layer (Llama:
    q, k, v, o, then gate, up, down). Only speed depends on it: a layer marked False that runs last in a
    gradient-checkpointed block makes the recomputation run its base GEMM once more (see `rasa_linear`)."""
    last: dict[str, Linear] = {}
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            module.last_in_block = True
            match = _LAYER_INDEX.search(path)
            if match is None:
                continue
            block = path[:match.end()]
            if block in last:
                last[block].last_in_block = False
            last[block] = module


def number_streams(model: nn.Module) -> None:
    """Number the RaSA layers (`rasa_stream`): each draws its dropout masks from its own stream of the device seed."""
    for index, module in enumerate(m for m in model.modules() if isinstance(m, Linear)):
        module.rasa_stream = index


def _advance_dropout_seeds(module: nn.Module, args) -> None:
    """The wrapped model's forward pre-hook: one step of the device seed's counter per forward in training, when
    the layers take their seed from it (`settings.DEVICE_SEED`, torch.compile), so every step, replayed graphs
    included, draws fresh masks; a checkpointed recomputation runs within the same forward's backward and reads the
    same counter."""
    if module.training and (torch.compiler.is_compiling() or settings.DEVICE_SEED()):
        dropout.advance_all()


def pool_key(group: str) -> str:
    """Parameter name of a group's pool (state-dict keys may not contain dots inside a ParameterDict name)."""
    return group.replace(".", "-")


class RasaPools:
    """A view of the tuner's shared factors, `shared_A[adapter][pool_key]` and `shared_B[...]`, that layers hold
    (a plain object, not a module: the tuner's containers stay the only registered owners)."""

    def __init__(self, shared_A: nn.ModuleDict, shared_B: nn.ModuleDict) -> None:
        self.shared_A, self.shared_B = shared_A, shared_B
        self._keys: dict[str, str] = {}

    def get(self, adapter_name: str, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._keys.get(group)
        if key is None:
            key = pool_key(group)
            if not torch.compiler.is_compiling():  # a cache filled while tracing would be guarded on: a recompile
                self._keys[group] = key
        return self.shared_A[adapter_name][key], self.shared_B[adapter_name][key]


class RasaModel(BaseTuner):
    """Creates RaSA adapters on a transformers (or any torch) model; use it through `peft.get_peft_model`."""

    prefix: str = "rasa_"
    tuner_layer_cls = RasaLayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = True

    def _ensure_containers(self) -> None:
        """Create the pool containers on first use (BaseTuner.__init__ injects before a subclass could)."""
        if "rasa_shared_A" not in self._modules:
            self.rasa_shared_A = nn.ModuleDict({})
            self.rasa_shared_B = nn.ModuleDict({})
        self.__dict__.setdefault("_rasa_plan", {})

    @property
    def pools(self) -> RasaPools:
        """The one `RasaPools` every layer of this tuner holds (made on first use, kept outside `_modules`)."""
        pools = self.__dict__.get("_rasa_pools_view")
        if pools is None or pools.shared_A is not self.rasa_shared_A or pools.shared_B is not self.rasa_shared_B:
            pools = self.__dict__["_rasa_pools_view"] = RasaPools(self.rasa_shared_A, self.rasa_shared_B)
        return pools

    # --- configuration and planning ----------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: RasaConfig, model_config: dict) -> RasaConfig:
        if peft_config.target_modules is None:
            if getattr(peft_config, "default_targets", "all-linear") == "lora":
                from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS

                model_type = model_config.get("model_type")
                if model_type not in LORA_TARGETS:
                    raise ValueError(
                        f"target_modules is unset and default_targets='lora', but PEFT has no LoRA target list for "
                        f"model type {model_type!r}; set target_modules (e.g. ['q_proj', 'v_proj'])."
                    )
                peft_config.target_modules = set(LORA_TARGETS[model_type])
            else:
                peft_config.target_modules = "all-linear"
        return peft_config

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint keys -> model keys (PEFT's mapping), after converting a checkpoint of the authors' fork and
        dropping zero-element RaSA tensors (older rasa-lora saved them for k = 0 and k = r; none are registered)."""
        from rasa_lora.adapter import authors

        if authors.is_authors_state_dict(state_dict):
            groups = {module.rasa_group[adapter_name] for module in model.modules()
                      if isinstance(module, RasaLayer) and adapter_name in module.rasa_group}
            state_dict = authors.convert_state_dict(state_dict, sorted(groups))
        else:
            state_dict = {key: value for key, value in state_dict.items()
                          if not (cls.prefix in key and hasattr(value, "numel") and value.numel() == 0)}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _plan_groups(self, model: nn.Module, config: RasaConfig) -> dict[str, list[str]]:
        """Map each group to its targeted module paths (model order); validate types and shapes."""
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        tuner_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        groups: dict[str, list[tuple[str, nn.Module]]] = OrderedDict()
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in tuner_prefixes):
                continue
            result = self._check_target_module_exists(config, key) if config.target_modules else None
            if not result or type(result).__name__ == "_ExcludedModule":
                continue
            groups.setdefault(group_of(key, config.layers_pattern), []).append((key, module))
        if not groups and not config.target_parameters:
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no module of the model; pass names that exist, "
                "e.g. ['q_proj', 'v_proj'] for Llama, or 'all-linear'."
            )
        for group, members in groups.items():
            _check_group(group, members)
        plan = {group: [key for key, _ in members] for group, members in groups.items()}
        for group, members in _plan_parameters(model, config).items():
            _check_parameter_group(group, members)
            plan[group] = [key for key, _ in members]
            self.__dict__.setdefault("_rasa_param_groups", set()).add(group)
        return plan

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        plan = self._plan_groups(model, config)  # raises before anything is replaced
        self._ensure_containers()
        self._rasa_plan[adapter_name] = {
            key: (group, len(keys)) for group, keys in plan.items() for key in keys
        }
        # Adding an adapter must not change the trainability of the pools already there (PEFT restores that of the
        # model's parameters, which do not include the tuner's pools).
        existing = [(param, param.requires_grad) for name in self.rasa_shared_A if name != adapter_name
                    for container in (self.rasa_shared_A[name], self.rasa_shared_B[name])
                    for param in container.values()]
        self._create_pools(model, adapter_name, config, plan)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        except Exception:
            self._drop_pools(adapter_name)
            raise
        for param, requires_grad in existing:
            param.requires_grad_(requires_grad)
        self._sync_pool_requires_grad([adapter_name])
        mark_last_in_block(model)
        number_streams(model)
        if "_rasa_seed_hook" not in self.__dict__:  # on the wrapped model: a plain PeftModel calls it, not the tuner
            self.__dict__["_rasa_seed_hook"] = model.register_forward_pre_hook(_advance_dropout_seeds)

    def _create_pools(self, model: nn.Module, adapter_name: str, config: RasaConfig, plan: dict) -> None:
        modules = dict(model.named_modules())
        shared_A, shared_B = nn.ParameterDict({}), nn.ParameterDict({})
        param_groups = self.__dict__.get("_rasa_param_groups", set())
        for group, keys in plan.items():
            if group in param_groups:  # a stack of experts: one pool per expert index, (E, L*k, a) and (E, b, L*k)
                param = model.get_parameter(_strip_base_layer(keys[0]))
                lead, (in_features, out_features) = param.shape[:1], _param_in_out(model, keys[0])
            else:
                lead, (in_features, out_features) = (), _in_out(_base_layer(modules[keys[0]]))
                param = _base_layer(modules[keys[0]]).weight
            device = param.device
            width = len(keys) * config.rasa_k
            if not width:  # k = 0: no pool (no zero-element parameters registered or saved)
                continue
            A = torch.empty(*lead, width, in_features, dtype=torch.float32, device=device)
            B = torch.empty(*lead, out_features, width, dtype=torch.float32, device=device)
            init_eq6(config.init_weights, A, B)
            shared_A[pool_key(group)] = nn.Parameter(A)
            shared_B[pool_key(group)] = nn.Parameter(B)
        self.rasa_shared_A[adapter_name] = shared_A
        self.rasa_shared_B[adapter_name] = shared_B

    def _drop_pools(self, adapter_name: str) -> None:
        for container in (self.rasa_shared_A, self.rasa_shared_B):
            if adapter_name in container:
                del container[adapter_name]
        self._rasa_plan.pop(adapter_name, None)

    def _create_and_replace(self, config: RasaConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        group, num_layers = self._rasa_plan[adapter_name][current_key]
        parameter_name = optional_kwargs.get("parameter_name")
        if parameter_name is not None:
            self._create_and_replace_parameter(config, adapter_name, target, target_name, parent, group, num_layers,
                                               parameter_name)
            return
        if isinstance(target, RasaLayer):
            target.update_layer(adapter_name, config, group, self.pools, num_layers)
            return
        base = _base_layer(target)
        is_conv1d = isinstance(base, _conv1d_types())
        if is_conv1d != bool(config.fan_in_fan_out):
            config.fan_in_fan_out = is_conv1d  # Conv1D stores (in, out); nn.Linear stores (out, in)
        new_module = Linear(target, adapter_name, config, group, self.pools, num_layers,
                            is_target_conv_1d_layer=is_conv1d)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _create_and_replace_parameter(self, config: RasaConfig, adapter_name: str, target: nn.Module,
                                      target_name: str, parent: nn.Module, group: str, num_layers: int,
                                      parameter_name: str) -> None:
        from rasa_lora.adapter.experts import ParamWrapper

        if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
            target.update_layer(adapter_name, config, group, self.pools, num_layers)
            return
        new_module = ParamWrapper(target, adapter_name, config, group, self.pools, num_layers, parameter_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's replacement copies `weight`/`bias` between the modules; an expert stack has neither (its
        `ParamWrapper` creates the adapter on the parameter's device already)."""
        from rasa_lora.adapter.experts import ParamWrapper

        if isinstance(new_module, ParamWrapper) or isinstance(child, ParamWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # --- trainability, deletion, dtype ------------------------------------------------------------------
    def _sync_pool_requires_grad(self, adapter_names=None) -> None:
        """Make each pool as trainable as the layers that use it: a pool requires grad exactly when a parameter of
        that adapter on one of its group's layers does. PEFT sets `requires_grad` layer by layer (`set_adapter`,
        `set_requires_grad`, `load_adapter(..., is_trainable=...)`, `disable_adapter()`, ...) and never sees the pools,
        so every such entry point of the tuner ends here. `adapter_names` limits it to those adapters."""
        names = None if adapter_names is None else (
            {adapter_names} if isinstance(adapter_names, str) else set(adapter_names))
        if "rasa_shared_A" not in self._modules:
            return
        trainable: dict[tuple[str, str], bool] = {}
        for module in self.model.modules():
            if not isinstance(module, RasaLayer):
                continue
            for name in module.rasa_D:
                if names is not None and name not in names:
                    continue
                key = (name, pool_key(module.rasa_group[name]))
                own = any(c[name].requires_grad for c in (module.rasa_A, module.rasa_B, module.rasa_D) if name in c)
                trainable[key] = trainable.get(key, False) or own
        for name, params in self.rasa_shared_A.items():
            if names is not None and name not in names:
                continue
            for container in (params, self.rasa_shared_B[name]):
                for key, param in container.items():
                    param.requires_grad_(trainable.get((name, key), False))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_pool_requires_grad()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_pool_requires_grad()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._sync_pool_requires_grad(adapter_names)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_pool_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_pools(adapter_name)
        self._sync_pool_requires_grad()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if adapter_name not in self.rasa_shared_A:
            return
        for container in (self.rasa_shared_A[adapter_name], self.rasa_shared_B[adapter_name]):
            for key, param in list(container.items()):
                if autocast_adapter_dtype and param.dtype in (torch.float16, torch.bfloat16):
                    container[key] = nn.Parameter(param.detach().float(), requires_grad=param.requires_grad)
        if not autocast_adapter_dtype:
            self._cast_to_base_dtype(adapter_name)

    def _cast_to_base_dtype(self, adapter_name: str) -> None:
        """Keep the adapter in the base model's dtype (what `autocast_adapter_dtype=False` asks for)."""
        for module in self.model.modules():
            if isinstance(module, RasaLayer) and adapter_name in module.rasa_D:
                dtype = module._base_dtype()
                for container in (module.rasa_A, module.rasa_B, module.rasa_D):
                    if adapter_name not in container:
                        continue
                    param = container[adapter_name]
                    container[adapter_name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
                for container in (self.rasa_shared_A[adapter_name], self.rasa_shared_B[adapter_name]):
                    key = pool_key(module.rasa_group[adapter_name])
                    if key in container and container[key].dtype != dtype:
                        container[key] = nn.Parameter(container[key].detach().to(dtype),
                                                      requires_grad=container[key].requires_grad)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed adapter batches (`model(..., adapter_names=[...])`, one adapter name or "__base__" per sample), as
        PEFT's LoRA offers them: the names reach every RaSA layer (and `modules_to_save` wrapper) through a
        pre-forward hook. Inference only; with beam search each name is repeated `num_beams` times."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call `model.eval()`.")
        known = {name for m in self.model.modules() if isinstance(m, RasaLayer) for name in m.rasa_D}
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}; "
                             f"the adapters are {sorted(known)} (or '__base__' for the base model).")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in self.model.modules()
                   if isinstance(module, (RasaLayer, AuxiliaryTrainingWrapper))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- merging guards ----------------------------------------------------------------------------------
    def merged_layers(self, adapter_name: str | None = None) -> list[str]:
        return [
            name for name, module in self.model.named_modules()
            if isinstance(module, RasaLayer) and module.merged
            and (adapter_name is None or adapter_name in module.merged_adapters)
        ]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        _check_incoming_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _check_incoming_state(tuner: RasaModel, state_dict: dict, prefix: str) -> None:
    """Refuse, before anything is copied, RaSA tensors of the wrong shape or pools of merged adapters."""
    own = {prefix + name: param for name, param in tuner.named_parameters()}
    mismatched, merged_pools = [], set()
    for key, value in state_dict.items():
        if not key.startswith(prefix) or ".rasa_" not in "." + key[len(prefix):]:
            continue
        param = own.get(key)
        if param is not None and hasattr(value, "shape") and tuple(value.shape) != tuple(param.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(param.shape)}")
        if ".rasa_shared_" in key:
            adapter = key[len(prefix):].split(".")[1]
            if tuner.merged_layers(adapter):
                merged_pools.add(adapter)
    if mismatched:
        shown = "\n  ".join(mismatched[:5]) + ("\n  ..." if len(mismatched) > 5 else "")
        raise ValueError(
            f"This RaSA adapter does not fit the model ({len(mismatched)} tensors differ in shape):\n  {shown}\n"
            "It was trained on a base model of another architecture or size; load it onto the base it was made for."
        )
    if merged_pools:
        raise RuntimeError(
            f"Cannot load the shared pools of adapter(s) {sorted(merged_pools)} while layers are merged with them "
            "(the merged weights would silently keep the old update). Call `unmerge_adapter()` first."
        )


def _strip_base_layer(key: str) -> str:
    """A parameter's path without the `.base_layer` parts adapter wrappers insert."""
    return re.sub(r"\.base_layer(?=\.)", "", key)


def _plan_parameters(model: nn.Module, config: RasaConfig) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Group the parameters named by `config.target_parameters` (PEFT's matching: the full path, or its end after a
    dot), keyed as `_plan_groups` keys modules; existing RaSA wrappers are looked through."""
    targets = list(config.target_parameters or [])
    groups: dict[str, list[tuple[str, torch.Tensor]]] = OrderedDict()
    if not targets:
        return groups
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = _strip_base_layer(f"{module_name}.{param_name}" if module_name else param_name)
            if ".rasa_" in f".{key}" or key in seen:
                continue
            if key in targets or any(key.endswith("." + target) for target in targets):
                seen.add(key)
                groups.setdefault(group_of(key, config.layers_pattern), []).append((key, param))
    if not groups:
        raise ValueError(f"target_parameters={targets} matched no parameter of the model; name them as "
                         "'mlp.experts.gate_up_proj' (Mixtral in transformers >= 5) or by their full path.")
    return groups


def _param_in_out(model: nn.Module, key: str) -> tuple[int, int]:
    """(in, out) of one expert of the stack at `key` ((E, out, in), or (E, in, out) when `is_transposed`)."""
    module_name, _, param_name = _strip_base_layer(key).rpartition(".")
    owner = model.get_submodule(module_name)
    while hasattr(owner, "base_layer"):
        owner = owner.base_layer
    shape = getattr(owner, param_name).shape
    return (shape[1], shape[2]) if getattr(owner, "is_transposed", False) else (shape[2], shape[1])


def _check_parameter_group(group: str, members: list[tuple[str, torch.Tensor]]) -> None:
    shapes = OrderedDict()
    for key, param in members:
        shapes.setdefault(tuple(getattr(param, "ds_shape", param.shape)), []).append(key)
    odd = [f"{key} {tuple(param.shape)}" for key, param in members if param.dim() != 3]
    if odd:
        raise ValueError(f"target_parameters: RaSA adapts 3-D expert stacks (E, out, in); these are not: "
                         f"{', '.join(odd[:3])}. Target 2-D weights through their module (target_modules).")
    if len(shapes) > 1:
        listed = "; ".join(f"{shape}: {', '.join(keys[:3])}" for shape, keys in shapes.items())
        raise ValueError(f"The expert parameters of group {group!r} differ in shape ({listed}), but RaSA shares ranks "
                         "only between stacks of one shape. Exclude the odd layers with `layers_to_transform`.")


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _in_out(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, _conv1d_types()):
        in_features, out_features = layer.weight.shape
        return in_features, out_features
    return layer.in_features, layer.out_features


def _check_group(group: str, members: list[tuple[str, nn.Module]]) -> None:
    supported = (nn.Linear,) + _conv1d_types()
    unsupported = [(key, type(_base_layer(m)).__name__) for key, m in members
                   if not isinstance(_base_layer(m), supported)]
    if unsupported:
        listed = ", ".join(f"{key} ({kind})" for key, kind in unsupported[:5])
        raise ValueError(
            f"RaSA supports nn.Linear and transformers' Conv1D only; these targeted modules are not: {listed}. "
            "Exclude them with `target_modules` (or `exclude_modules`)."
        )
    shapes = OrderedDict()
    for key, module in members:
        shapes.setdefault(_in_out(_base_layer(module)), []).append(key)
    if len(shapes) > 1:
        listed = "; ".join(f"(in={a}, out={b}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for (a, b), keys in shapes.items())
        raise ValueError(
            f"The layers of group {group!r} differ in shape ({listed}), but RaSA shares ranks only between layers of "
            "one shape. Exclude the odd layers with `layers_to_transform` or `target_modules`."
        )
