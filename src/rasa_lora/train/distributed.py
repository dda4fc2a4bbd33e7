"""Training on many processes through `accelerate`: DDP, FSDP1/FSDP2 and DeepSpeed ZeRO with RaSA's shared pools.

RaSA's pool is one parameter used by every layer of its group (it lives on the tuner, `base_model.rasa_shared_A`;
layers look it up on each call). Each engine must see that parameter correctly; this module does what each needs,
so the training loop calls, in order:

    accelerator = make_accelerator()                       # also forms a gloo group on CPU-only machines
    engine = detect_engine(accelerator)
    use_reentrant = checkpointing_kwargs(engine, config.use_reentrant)["use_reentrant"]   # before checkpointing
    model, optimizer, scheduler = prepare_training(accelerator, model, optimizer, scheduler, use_reentrant)
    for i, batch in enumerate(local := local_micro_batches(step_batches, accelerator)):
        with micro_batch_sync(accelerator, model, last=i == len(local) - 1):
            accelerator.backward(model(**batch, num_items_in_batch=loss_divisor(step_tokens, accelerator)).loss)
    save_adapter(model, accelerator, output_dir)          # on every rank; the main process writes

| engine | what rasa-lora does before `accelerator.prepare`                            | checkpointing     |
| ------ | --------------------------------------------------------------------------- | ----------------- |
| ddp    | reentrant checkpointing gets DDP `static_graph=True`                         | as asked          |
| fsdp2  | per-decoder-layer units by default; pools stay in the root unit (checked)   | as asked          |
| fsdp1  | `use_orig_params=True` (trainable and frozen parameters share flat units)   | non-reentrant     |
| zero2  | nothing (ZeRO stages 0-2 replicate parameters)                              | non-reentrant     |
| zero3  | each RasaLayer registers its pools and private factors as external params   | non-reentrant     |

Why: DDP's reducer marks a parameter ready once per backward, but reentrant checkpointing runs one backward per
layer, so the pool (used by every layer) is marked several times ("mark a variable ready only once") unless the
graph is declared static (both measured here); non-reentrant checkpointing runs one backward and needs nothing.
ZeRO-1/2 reduce a gradient through a per-parameter hook and refuse a second reduction in one step, which the
per-layer backwards of reentrant checkpointing would cause for the pool; ZeRO and FSDP1 therefore get
non-reentrant checkpointing (a choice from their design, not run here). FSDP2 rejects a parameter seen by two
units and reshards a layer's unit after its forward; the pool therefore must belong to a unit that encloses every
layer using it (the root), which `check_pool_placement` verifies. ZeRO-3 gathers only a module's own parameters at
its forward, hence the external-parameter registration (the pool is gathered at each layer's forward: cheap, it
has L*k rows). Saving gathers the sharded adapter tensors (DTensor, ZeRO-3) on every rank, and the main process
writes the PEFT files; the pool is saved once, exactly as by one process. Training checkpoints: `checkpoint.py`
(FSDP2 gathered to whole tensors, DeepSpeed's own partitioned checkpoint); not under FSDP1.

accelerate runs FSDP and DeepSpeed only on accelerators: on a CPU it silently falls back to DDP. So that the same
`fsdp2.yaml` also runs FSDP2 on CPUs (gloo), a CPU run launched with FSDP2 is sharded here with accelerate's own
wrapping function (`fsdp2_prepare_model`), and the optimizer is moved onto the sharded parameters.

Verified here (CPU, gloo, 2 processes, tests/distributed/): DDP and FSDP2 with both checkpointing modes and two
accumulated micro-batches give the gradients, clipping norm and parameters after one step of one process (relative
error <= 1e-6 in fp32), and the saved adapter loads in one process with the same logits.
ZeRO-3 likewise with `deepspeed.initialize` on DeepSpeed's CPU accelerator (tests/distributed/test_zero3_cpu.py,
when deepspeed is installed). Checkpoint, resume in fresh processes and continue under FSDP2, ZeRO-2 and ZeRO-3:
bitwise the uninterrupted run (tests/distributed/test_resume.py, test_launch_resume.py). On two GPUs
(benchmarks/multi_gpu.py): DDP, FSDP2 and ZeRO-3 through `accelerate launch` match one GPU (docs/distributed.md).
Not verified: FSDP1, ZeRO-2 on GPUs, resume on GPUs, many nodes.
"""

from __future__ import annotations

import contextlib
import enum
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from rasa_lora.models import adapter_save_options
from rasa_lora.settings import env_flag


class Engine(str, enum.Enum):
    """How the model is distributed; `zero2` stands for DeepSpeed ZeRO stages 0, 1 and 2."""

    SINGLE = "single"
    DDP = "ddp"
    FSDP1 = "fsdp1"
    FSDP2 = "fsdp2"
    ZERO2 = "zero2"
    ZERO3 = "zero3"


def _type_name(state: Any) -> str:
    kind = state.distributed_type
    return str(getattr(kind, "value", kind)).upper()


def detect_engine(accelerator: Any) -> Engine:
    """The engine of an `accelerate.Accelerator` (or its `AcceleratorState`).

    On a CPU, accelerate reports DDP (`MULTI_CPU`) even when FSDP was asked for; an FSDP2 request (the
    `ACCELERATE_USE_FSDP`/`FSDP_VERSION` variables `accelerate launch` sets) is then honoured as FSDP2.
    """
    state = getattr(accelerator, "state", accelerator)
    kind = _type_name(state)
    if kind == "DEEPSPEED":
        return Engine.ZERO3 if int(state.deepspeed_plugin.zero_stage) == 3 else Engine.ZERO2
    if kind == "FSDP":
        return Engine.FSDP2 if int(state.fsdp_plugin.fsdp_version) == 2 else Engine.FSDP1
    if kind == "NO" or int(getattr(state, "num_processes", 1)) <= 1:
        return Engine.SINGLE
    if kind == "MULTI_CPU":
        if env_flag("ACCELERATE_USE_DEEPSPEED", False):
            raise ValueError(
                "DeepSpeed was requested but accelerate runs it only on GPUs (this run is on CPUs); "
                "use configs/distributed/fsdp2.yaml or ddp.yaml on CPUs."
            )
        if env_flag("ACCELERATE_USE_FSDP", False):
            if os.environ.get("FSDP_VERSION", "1") != "2":
                raise ValueError(
                    f"FSDP_VERSION={os.environ.get('FSDP_VERSION', '1')!r} on CPUs: accelerate has no CPU FSDP1 path "
                    "and rasa-lora shards CPUs with FSDP2 only; set `fsdp_version: 2` (configs/distributed/fsdp2.yaml)."
                )
            return Engine.FSDP2
    return Engine.DDP


def checkpointing_kwargs(engine: Engine, use_reentrant: bool | None = None) -> dict[str, bool]:
    """`gradient_checkpointing_kwargs` for the engine: the request where it works, else non-reentrant (warned)."""
    if use_reentrant is None:
        return {"use_reentrant": False}  # the authors' choice, and what every engine supports
    if use_reentrant and engine in (Engine.FSDP1, Engine.ZERO2, Engine.ZERO3):
        warnings.warn(
            f"use_reentrant=True is not supported with {engine.value}: the shared pool's gradient would be reduced "
            "once per checkpointed layer; using non-reentrant checkpointing instead.",
            stacklevel=2,
        )
        return {"use_reentrant": False}
    return {"use_reentrant": bool(use_reentrant)}


def make_accelerator(**kwargs: Any) -> Any:
    """An `accelerate.Accelerator` that also forms a process group on CPU-only machines.

    accelerate starts one process per `num_processes` from any config, but without `cpu=True` processes on a
    machine without GPUs each run alone (measured: a MULTI_GPU config on this CPU machine gave 2 independent
    single-process runs). With `cpu` set from the hardware, one config file serves GPUs (NCCL) and CPUs (gloo).
    """
    from accelerate import Accelerator

    kwargs.setdefault("cpu", not torch.cuda.is_available())
    return Accelerator(**kwargs)


def check_supported(engine: Engine, config: Any) -> None:
    """Refuse, before anything is loaded, what the training loop cannot do under `engine` yet.

    Training checkpoints (`save_steps`, `resume`) work in one process and under DDP, FSDP2 and DeepSpeed
    (`checkpoint.py`); not under FSDP1 (no CPU path to test it), nor for full fine-tuning under FSDP2 (its
    checkpoint would gather the whole model in one process).
    OLoRA and PiSSA convert their adapter against the whole model at saving time, and PriLoRA prunes its whole A in
    place: one process and DDP only.
    """
    sharded = engine in (Engine.FSDP1, Engine.FSDP2, Engine.ZERO2, Engine.ZERO3)
    checkpoints = getattr(config, "resume", False) or getattr(config, "save_steps", 0)
    if checkpoints and engine is Engine.FSDP1:
        raise NotImplementedError(
            "save_steps/resume are not supported with fsdp1; use configs/distributed/fsdp2.yaml (or ddp.yaml) to "
            "checkpoint and resume.")
    if checkpoints and engine is Engine.FSDP2 and getattr(config, "method", None) == "fft":
        raise NotImplementedError(
            "save_steps/resume with method=fft are not supported with fsdp2 (the checkpoint would gather the whole "
            "model in one process); use configs/distributed/zero3.yaml, or train with save_steps 0.")
    if engine is Engine.FSDP2 and getattr(config, "method", None) == "fft" and not torch.cuda.is_available():
        raise NotImplementedError(
            "method=fft with FSDP2 on CPUs is not supported (saving the whole sharded model goes through accelerate, "
            "which does not shard CPUs); use configs/distributed/ddp.yaml."
        )
    if sharded and getattr(config, "method", None) == "prilora":
        raise NotImplementedError(
            f"method=prilora is not supported with {engine.value} yet (its pruning edits A in place on each process; "
            "sharded engines hold A, or its master copy, in shards); use configs/distributed/ddp.yaml."
        )
    if sharded and getattr(config, "method", None) in ("olora", "pissa"):
        raise NotImplementedError(
            f"method={config.method} is not supported with {engine.value} yet (converting its adapter needs the "
            "whole model in one process); use configs/distributed/ddp.yaml."
        )


# --- the pools ------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module, accelerator: Any = None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, "module", model)


def rasa_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every `RasaLayer` of the model."""
    from rasa_lora.adapter import RasaLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, RasaLayer)}


def pool_users(model: nn.Module) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """(layer path, layer, pool parameter) for every layer, adapter and pool tensor (A_S and B_S) it uses."""
    users = []
    for path, layer in rasa_layers(model).items():
        for adapter in layer.rasa_group:
            if layer.has_pool(adapter):  # k = 0 has no pool
                for pool in layer.shared_factors(adapter):
                    users.append((path, layer, pool))
    return users


def zero3_external_parameters(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(layer, parameter) pairs ZeRO-3 must gather at the layer's forward although the layer does not own them.

    ZeRO-3 gathers `module.parameters(recurse=False)` at a module's forward. A RasaLayer reads its group's pool
    (A_S, B_S, owned by the tuner) and its private factors (A~, B~, D, held in child ParameterDicts whose forward
    never runs), and its fused path reads the base layer's weight and bias without calling the base layer's
    forward; DeepSpeed's getter-based discovery may find these at run time, but declaring them is the
    documented way and keeps the prefetch plan right from the first step.
    """
    pairs = []
    for layer in rasa_layers(model).values():
        base = layer.get_base_layer()
        pairs.extend((layer, p) for p in (base.weight, getattr(base, "bias", None)) if p is not None)
        for adapter in layer.rasa_group:
            pairs.extend((layer, param) for param in layer.adapter_parameters(adapter))
    return pairs


def register_zero3_external_parameters(model: nn.Module, register: Callable[[nn.Module, nn.Parameter], Any] | None
                                       = None) -> int:
    """Register, on every RasaLayer, its group's pools (and its private factors) as ZeRO-3 external parameters.

    `register` defaults to `deepspeed.zero.register_external_parameter` (imported here, so deepspeed is needed only
    for ZeRO-3). Call it after the adapter is final (casting replaces the tensors) and before
    `deepspeed.initialize` / `accelerator.prepare`. Returns the number of registrations.
    """
    if register is None:
        try:
            import deepspeed
        except ImportError as error:
            raise ModuleNotFoundError(
                "ZeRO-3 needs deepspeed (`pip install deepspeed` on the GPU machine); it is not installed."
            ) from error
        # `deepspeed.zero` is an attribute of the package, not an importable module (`from deepspeed.zero import`
        # fails with deepspeed 0.19.8: measured).
        register = deepspeed.zero.register_external_parameter
    pairs = zero3_external_parameters(model)
    for layer, param in pairs:
        if not isinstance(param, nn.Parameter):
            raise TypeError(f"{type(layer).__name__} reads a {type(param).__name__}, not an nn.Parameter; "
                            "ZeRO-3 can only gather parameters")
        register(layer, param)
    return len(pairs)


def _fsdp_units(model: nn.Module) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def misplaced_pools(model: nn.Module, units: Sequence[str]) -> list[str]:
    """Pools whose FSDP unit (the innermost of the module paths `units`; "" is the root) misses a layer using them."""
    names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
    bad = []
    for layer_path, _, pool in pool_users(model):
        pool_path = names.get(id(pool), "")
        owner = max((unit for unit in units if unit == "" or pool_path.startswith(unit + ".")), key=len, default=None)
        if owner is None or not (owner == "" or layer_path.startswith(owner + ".")):
            bad.append(f"{pool_path} (unit {owner!r}) is used by {layer_path}")
    return sorted(set(bad))


def check_pool_placement(model: nn.Module) -> None:
    """Raise unless each pool belongs to an FSDP2 unit that encloses every layer using it (the root, normally)."""
    model = _unwrap(model)
    units = _fsdp_units(model)
    if not units:
        raise ValueError("check_pool_placement: the model has no FSDP2 unit; call it after `fully_shard`.")
    bad = misplaced_pools(model, units)
    if bad:
        raise ValueError(
            "FSDP2 placed a RaSA pool in a unit that does not enclose all its layers: " + "; ".join(bad[:3])
            + ". Shard only the decoder layers (not the tuner or its pool containers) and leave the pools in the root."
        )


# --- preparation --------------------------------------------------------------------------------------------
def _set_static_graph(accelerator: Any) -> None:
    from accelerate.utils import DistributedDataParallelKwargs

    handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
    handler.static_graph = True
    accelerator.ddp_handler = handler


def _default_to_layer_wrapping(plugin: Any) -> None:
    """Per-decoder-layer FSDP units unless the config chose a policy (accelerate's default is one unit)."""
    if plugin.auto_wrap_policy is None:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin.auto_wrap_policy = transformer_auto_wrap_policy


def prepare_model_for_engine(model: nn.Module, accelerator: Any, use_reentrant: bool = False) -> nn.Module:
    """The engine-specific steps due before `accelerator.prepare` (see the module's table); returns `model`."""
    engine = detect_engine(accelerator)
    if engine is Engine.DDP and use_reentrant:
        _set_static_graph(accelerator)
    elif engine is Engine.FSDP1:
        plugin = accelerator.state.fsdp_plugin
        if plugin.use_orig_params is False:
            warnings.warn("FSDP1 with a RaSA adapter needs use_orig_params=True (frozen and trainable parameters "
                          "share flat units); setting it.", stacklevel=2)
        plugin.use_orig_params = True
        _default_to_layer_wrapping(plugin)
    elif engine is Engine.FSDP2 and _type_name(accelerator.state) == "FSDP":
        _default_to_layer_wrapping(accelerator.state.fsdp_plugin)
    elif engine is Engine.ZERO3:
        register_zero3_external_parameters(_unwrap(model))
    return model


def _shard_fsdp2_here(model: nn.Module, accelerator: Any) -> nn.Module:
    """FSDP2 on CPUs, where accelerate does not shard: its own wrapping function, a plugin read from the launcher."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    _default_to_layer_wrapping(plugin)
    shim = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                           parallelism_config=None, mixed_precision=accelerator.mixed_precision,
                           is_main_process=accelerator.is_main_process, device=accelerator.device)
    return fsdp2_prepare_model(shim, model)


def _move_optimizer(optimizer: torch.optim.Optimizer, before: dict[int, str], model: nn.Module) -> None:
    """Point the optimizer at the parameters that replaced the ones it was built with (same names)."""
    if optimizer.state:
        raise RuntimeError("the optimizer has state already; shard the model before the first optimizer step")
    after = dict(model.named_parameters())
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if before.get(id(p)) not in after]
        if missing:
            raise KeyError(f"{len(missing)} optimizer parameters are not model parameters; build the optimizer "
                           "from model.parameters()")
        group["params"] = [after[before[id(p)]] for p in group["params"]]


def _fill_deepspeed_batch_size(accelerator: Any, micro_batch_size: int | None) -> None:
    """DeepSpeed wants the micro-batch size; accelerate takes it from a prepared DataLoader, which we do not use."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        if micro_batch_size is None:
            raise ValueError("DeepSpeed config has train_micro_batch_size_per_gpu='auto'; pass micro_batch_size to "
                             "prepare_training or set a number in the JSON.")
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)


def prepare_training(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                     use_reentrant: bool = False, micro_batch_size: int | None = None
                     ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Engine-specific steps, then `accelerator.prepare` in the order the engine needs; returns the prepared trio.

    Build `optimizer` (and `scheduler`) from `model.parameters()` first, as for one process; gradient
    checkpointing must already be enabled with `checkpointing_kwargs(engine, ...)`, and `use_reentrant` must be
    the mode it was enabled with. `micro_batch_size` fills DeepSpeed's `train_micro_batch_size_per_gpu: auto`.
    The scheduler is returned as it is: accelerate's wrapper would step it once per process at every call (it
    assumes per-process epochs), while the recipe counts global optimizer steps.
    """
    engine = detect_engine(accelerator)
    prepare_model_for_engine(model, accelerator, use_reentrant)
    if engine in (Engine.ZERO2, Engine.ZERO3):
        _fill_deepspeed_batch_size(accelerator, micro_batch_size)
    if engine is Engine.FSDP2 and _type_name(accelerator.state) != "FSDP":
        before = {id(param): name for name, param in model.named_parameters()}
        model = _shard_fsdp2_here(model, accelerator)
        _move_optimizer(optimizer, before, model)
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if engine is Engine.FSDP2:
        check_pool_placement(model)
    return model, optimizer, scheduler


# --- data parallel bookkeeping ---------------------------------------------------------------------------------
def local_micro_batches(micro_batches: Sequence[Any], accelerator: Any) -> list[Any]:
    """This process's share of one optimizer step's micro-batches (every process gets the same number)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(micro_batches) % world:
        raise ValueError(
            f"{len(micro_batches)} micro-batches per step cannot be split evenly over {world} processes; choose "
            f"global_batch_size a multiple of micro_batch_size * {world}."
        )
    return list(micro_batches[rank::world])


@contextlib.contextmanager
def micro_batch_sync(accelerator: Any, model: nn.Module, last: bool):
    """Around one micro-batch's forward and backward: gradients are reduced only at the step's last micro-batch.

    Earlier micro-batches accumulate locally (`accelerator.no_sync`: DDP's no_sync, FSDP2's
    `set_requires_gradient_sync(False)`), and `sync_gradients` tells DeepSpeed where its accumulation boundary is
    (accelerate passes it to `set_gradient_accumulation_boundary` and steps the engine only there).
    """
    accelerator.sync_gradients = last
    # DDP with static_graph (reentrant checkpointing) fails inside no_sync ("expect_autograd_hooks_ INTERNAL ASSERT",
    # measured with torch 2.13): it reduces every micro-batch instead, which is correct, only more communication.
    if last or accelerator.num_processes <= 1 or getattr(model, "static_graph", False):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # also when rasa-lora sharded it (CPU), where accelerate does not know
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with accelerator.no_sync(model):
        yield


def loss_divisor(num_items: int | float, accelerator: Any) -> float:
    """`num_items_in_batch` for one process: data parallelism averages gradients over processes, so each process
    divides its summed token loss by (step's tokens / processes), and the average is the step's mean token loss."""
    return float(num_items) / accelerator.num_processes


def agreed_signal(signum: int | None, accelerator: Any) -> int | None:
    """The stop signal any process received (the largest number), so all processes stop after the same step.

    A launcher forwards SIGINT/SIGTERM to each process at slightly different times; if one process stopped a step
    earlier than another, the next collective (a gradient all-reduce, the checkpoint barrier) would hang.
    """
    if accelerator.num_processes <= 1:
        return signum
    flag = torch.tensor([signum or 0], device=accelerator.device)
    agreed = int(accelerator.reduce(flag, "max")[0])
    return agreed or None


# --- saving -------------------------------------------------------------------------------------------------
def _full(value: torch.Tensor) -> torch.Tensor:
    """A full, detached CPU copy of a possibly sharded tensor (collective for DTensors: call on every rank)."""
    from torch.distributed.tensor import DTensor

    value = value.detach()
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.cpu().clone()


def _gather_zero3(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {name: param.detach().cpu().clone() for name, param in params.items()}


def _adapter_entries(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The model-state-dict entries (parameters kept as they are, sharded or not) PEFT saves for the adapter.

    Entries are matched to PEFT's selection by identity, or by key where a method replaces the tensors while
    selecting (AdaLoRA cuts them to its rank pattern; saving from these entries cuts them again, as one process).
    """
    from peft import get_peft_model_state_dict

    local = model.state_dict(keep_vars=True)
    selected = get_peft_model_state_dict(model, state_dict=local, adapter_name=adapter_name)
    chosen = {id(value) for value in selected.values()}
    rename = getattr(type(getattr(model, "base_model", model)), "_remove_adapter_name_from_key", None)

    def kept(key: str, value: torch.Tensor) -> bool:
        return id(value) in chosen or (rename is not None and rename(key, adapter_name) in selected)

    return {key: value for key, value in local.items() if kept(key, value)}


def gather_adapter_entries(model: nn.Module, accelerator: Any = None, adapter_name: str = "default"
                           ) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the adapter, keyed as in `model.state_dict()`. Collective: call on every rank."""
    engine = detect_engine(accelerator) if accelerator is not None else Engine.SINGLE
    if engine is Engine.FSDP1:
        full = accelerator.get_state_dict(model)  # FSDP1's own full-state-dict gathering
        unwrapped = _unwrap(model, accelerator)
        keep = _adapter_entries(unwrapped, adapter_name)
        return {key: full[key].detach().cpu().clone() for key in keep if key in full}
    unwrapped = _unwrap(model, accelerator)
    entries = _adapter_entries(unwrapped, adapter_name)
    if engine is Engine.ZERO3:
        zero = {key: value for key, value in entries.items() if hasattr(value, "ds_id")}
        gathered = _gather_zero3(zero) if zero else {}
        return {key: gathered[key] if key in gathered else _full(value) for key, value in sorted(entries.items())}
    return {key: _full(value) for key, value in sorted(entries.items())}


def gather_adapter_state(model: nn.Module, accelerator: Any = None, adapter_name: str = "default"
                         ) -> dict[str, torch.Tensor]:
    """The adapter state dict in PEFT's saved format (adapter name removed, pools once), as full CPU tensors."""
    from peft import get_peft_model_state_dict

    entries = gather_adapter_entries(model, accelerator, adapter_name)
    return get_peft_model_state_dict(_unwrap(model, accelerator), state_dict=entries, adapter_name=adapter_name)


def save_adapter(model: nn.Module, accelerator: Any, output_dir: str | Path, adapter_name: str = "default",
                 **save_kwargs: Any) -> Path:
    """Save the adapter as one process would (`save_pretrained`); call on every rank, the main process writes.

    Where every process holds whole parameters (one process, DDP) the main process saves directly; otherwise the
    adapter is gathered first and saved from the gathered tensors. OLoRA/PiSSA's conversion
    (`path_initial_model_for_weight_conversion`) needs the whole model state and is refused when sharded.
    """
    engine = detect_engine(accelerator)
    unwrapped = _unwrap(model, accelerator)
    save_kwargs.setdefault("selected_adapters", [adapter_name])
    for key, value in adapter_save_options(unwrapped, adapter_name).items():  # no Hub lookup for "smollm2"
        save_kwargs.setdefault(key, value)
    if engine in (Engine.SINGLE, Engine.DDP):
        if accelerator.is_main_process:
            unwrapped.save_pretrained(str(output_dir), **save_kwargs)
    else:
        if "path_initial_model_for_weight_conversion" in save_kwargs:
            raise NotImplementedError(f"converting an OLoRA/PiSSA adapter is not supported with {engine.value}")
        entries = gather_adapter_entries(model, accelerator, adapter_name)
        if accelerator.is_main_process:
            unwrapped.save_pretrained(str(output_dir), state_dict=entries, **save_kwargs)
    accelerator.wait_for_everyone()
    return Path(output_dir)
