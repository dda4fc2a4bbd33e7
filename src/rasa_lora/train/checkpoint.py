"""Training checkpoints: written atomically, the newest K kept, restored exactly, under every engine.

A checkpoint holds everything the next step depends on: the trainable parameters (adapter weights, RaSA's shared
pools, or the whole model for fft), the optimizer and scheduler state, the RNG states (Python, torch CPU, CUDA,
the device dropout seeds) of every process, the loop counters, and method state that lives outside parameters
(AdaLoRA's importance scores, PriLoRA's pruning statistics). The data position needs no file: the batch order is a
function of (seed, epoch) and the step number. Layout of `OUTPUT_DIR/checkpoints/step-NNNNNN/`:

    state.pt        written by the main process, last: loop counters, scheduler, method state, the main process's
                    RNG, and `layout` = {"format", "engine", "world_size"}; with format "full" also `trainable`
                    (whole tensors keyed as in `model.named_parameters()`) and `optimizer` (torch's positional
                    `state_dict` with whole state tensors)
    rng-rankR.pt    the RNG states of process R >= 1 (its dropout masks)
    deepspeed/      format "deepspeed" only: the engine's own checkpoint (`DeepSpeedEngine.save_checkpoint`, tag
                    `deepspeed`, frozen parameters excluded): the adapter's fp32 master weights and optimizer state,
                    partitioned per process, with DeepSpeed's step counters

Format "full" is written by one process, DDP and FSDP2 (FSDP2 gathers its DTensor shards through
`torch.distributed.checkpoint.state_dict`, and scatters them again at resume), so such a checkpoint resumes under
any of them and with any number of processes; DeepSpeed (ZeRO-1/2/3) keeps its own partitioned format and resumes
under the same ZeRO stage and number of processes only. A mismatch is refused with the fix (`check_layout`).

Atomicity: every process writes into `checkpoints/.tmp-step-NNNNNN`; after a barrier the main process writes
`state.pt` and renames the directory into place, so a kill during the write leaves either the old set of
checkpoints or the new one, never a half-written newest one (a directory counts only with its `state.pt`). All
processes must share the output directory's file system (one node, or shared storage).
Limits: the frozen base model is not stored (it is reloaded from `base_model`), so resuming needs the same base.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"
STATE = "state.pt"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "deepspeed"
FULL, DEEPSPEED = "full", "deepspeed"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.name.startswith(_PREFIX) and (path / STATE).is_file()]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    """The optimizer step a checkpoint directory holds (its name)."""
    return int(checkpoint.name[len(_PREFIX):])


def rng_states() -> dict[str, Any]:
    from rasa_lora.ops import dropout

    states = {"python": random.getstate(), "torch": torch.get_rng_state(), "rasa_dropout": dropout.get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """The generators' states, and the device dropout seeds (`compile`, `rasa_lora.ops.dropout`) where saved."""
    from rasa_lora.ops import dropout

    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    dropout.set_states(states.get("rasa_dropout", {}))


def _method_state(model: torch.nn.Module) -> dict[str, Any]:
    """State kept outside parameters: AdaLoRA's rank allocator (importance moving averages), PriLoRA's statistics."""
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "statistics_state"):
        return {"prilora": tuner.statistics_state()}
    allocator = getattr(tuner, "rankallocator", None)
    if allocator is None:
        return {}
    return {"adalora": {key: dict(getattr(allocator, key)) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}}


def _restore_method_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    if "prilora" in state:
        model.base_model.load_statistics_state(state["prilora"])
    if "adalora" in state:
        allocator = model.base_model.rankallocator
        for key, value in state["adalora"].items():
            setattr(allocator, key, dict(value))


def _local_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`trainable` and `optimizer` of format "full" where this process holds whole tensors (one process, DDP)."""
    return {"trainable": {name: param.detach().cpu() for name, param in model.named_parameters()
                          if param.requires_grad},
            "optimizer": optimizer.state_dict()}


def _staging(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"{_PREFIX}{step:06d}"
    return final, root / f".tmp-{final.name}"


def _publish(output_dir: str | Path, staging: Path, final: Path, payload: dict[str, Any], keep: int) -> Path:
    """Write `state.pt` last, rename the staging directory into place, keep the newest `keep` (main process)."""
    torch.save(payload, staging / STATE)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _payload(model: torch.nn.Module, scheduler: Any, loop_state: dict[str, Any], layout: dict[str, Any]
             ) -> dict[str, Any]:
    return {"scheduler": scheduler.state_dict(), "rng": rng_states(), "loop": dict(loop_state),
            "method": _method_state(model), "layout": layout}


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loop_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` of one process atomically and delete all but the newest `keep`."""
    final, staging = _staging(output_dir, step)
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    payload = _payload(model, scheduler, loop_state, {"format": FULL, "engine": "single", "world_size": 1})
    payload.update(_local_full_state(model, optimizer))
    return _publish(output_dir, staging, final, payload, keep)


def _check_names(path: Path, saved: dict[str, Any], model: torch.nn.Module) -> None:
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if expected != set(saved):
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"checkpoint {path} does not match this model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); resume with the same base_model, method and target_modules")


def _load_full(path: Path, payload: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
               ) -> None:
    saved = payload["trainable"]
    _check_names(path, saved, model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(saved[name])
    optimizer.load_state_dict(payload["optimizer"])


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint of format "full" into freshly built objects of one process; returns the loop state."""
    payload = torch.load(path / STATE, map_location="cpu", weights_only=False)
    check_layout(path, payload.get("layout"), "single", 1)
    _load_full(path, payload, model, optimizer)
    scheduler.load_state_dict(payload["scheduler"])
    _restore_method_state(model, payload["method"])
    restore_rng_states(payload["rng"])
    return payload["loop"]


# --- many processes -------------------------------------------------------------------------------------------
def _is_deepspeed(engine: str) -> bool:
    return engine in ("zero2", "zero3")


def _config_for(layout: dict[str, Any]) -> str:
    engine = layout.get("engine")
    return {"zero2": "zero2.yaml", "zero3": "zero3.yaml", "fsdp2": "fsdp2.yaml"}.get(engine, "ddp.yaml")


def check_resumable(path: Path, engine: str, world_size: int) -> None:
    """`check_layout` for checkpoint `path` before anything is loaded (errors only; the warning comes at loading)."""
    payload = torch.load(path / STATE, map_location="cpu", weights_only=False, mmap=True)
    check_layout(path, payload.get("layout"), engine, world_size, warn=False)


def check_layout(path: Path, layout: dict[str, Any] | None, engine: str, world_size: int, warn: bool = True) -> None:
    """Refuse, with the fix, a checkpoint this engine and number of processes cannot resume; warn where the resumed
    run will not be bitwise that of an uninterrupted one (another number of processes draws other dropout masks)."""
    layout = layout or {"format": FULL, "engine": "single", "world_size": 1}  # written before layouts existed
    saved_engine, saved_world = layout.get("engine"), int(layout.get("world_size") or 1)
    written = f"written by {saved_engine} with {saved_world} process{'es' if saved_world > 1 else ''}"
    if layout.get("format") == DEEPSPEED:
        if engine != saved_engine or world_size != saved_world:
            raise ValueError(
                f"checkpoint {path} was {written} (DeepSpeed's partitioned format), and this run is {engine} with "
                f"{world_size}; resume it with accelerate launch --config_file configs/distributed/"
                f"{_config_for(layout)} --num_processes {saved_world}")
        return
    if _is_deepspeed(engine):
        raise ValueError(
            f"checkpoint {path} was {written}; DeepSpeed resumes only its own checkpoints: resume it with "
            f"configs/distributed/{_config_for(layout)} (or fsdp2.yaml, ddp.yaml, one process), or start afresh")
    if world_size != saved_world and warn:
        warnings.warn(f"checkpoint {path} was {written}, resumed with {world_size}: the adapter and optimizer state "
                      "come back exactly, but each process draws its own dropout masks, so the run will not be "
                      "bitwise that of an uninterrupted one", stacklevel=2)


def _full_state_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **extra)


def _positional(optim_state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) in torch's positional layout."""
    index = {name: i for i, name in enumerate(order)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in optim_state["param_groups"]]
    return {"state": {index[name]: value for name, value in optim_state["state"].items()}, "param_groups": groups}


def _by_name(optim_state: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The inverse of `_positional`."""
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in optim_state["param_groups"]]
    return {"state": {order[i]: value for i, value in optim_state["state"].items()}, "param_groups": groups}


def _optimizer_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _gather_fsdp2(model: torch.nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> dict[str, Any]:
    """Whole CPU tensors of the trainable parameters and the optimizer state (collective; main process only gets
    them), in the layout one process writes."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_full_state_options(cpu_offload=True))
    if not main:
        return {}
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    return {"trainable": {name: model_state[name] for name in trainable},
            "optimizer": _positional(optim_state, _optimizer_order(model, optimizer))}


def _scatter_fsdp2(path: Path, payload: dict[str, Any], model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer) -> None:
    """Whole tensors of format "full" into this process's FSDP2 shards (parameters and optimizer state)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    _check_names(path, payload["trainable"], model)
    set_state_dict(model, optimizer, model_state_dict=payload["trainable"],
                   optim_state_dict=_by_name(payload["optimizer"], _optimizer_order(model, optimizer)),
                   options=_full_state_options(strict=False))


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer accelerate wrapped (its wrapper skips `step` outside a gradient-sync boundary)."""
    return getattr(optimizer, "optimizer", optimizer)


def save_training_state(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any, loop_state: dict[str, Any], keep: int, accelerator: Any) -> Path:
    """Write checkpoint `step` of a run on any engine atomically (call on every process); keep the newest `keep`.

    `model` and `optimizer` are as `accelerator.prepare` returned them (a DeepSpeed engine, an FSDP2 module).
    """
    from rasa_lora.train.distributed import Engine, detect_engine

    engine = detect_engine(accelerator)
    if engine is Engine.FSDP1:
        raise NotImplementedError("checkpoints under FSDP1 are not supported; use configs/distributed/fsdp2.yaml")
    main, rank = accelerator.is_main_process, accelerator.process_index
    final, staging = _staging(output_dir, step)
    if main:
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    fmt = DEEPSPEED if engine in (Engine.ZERO2, Engine.ZERO3) else FULL
    layout = {"format": fmt, "engine": engine.value, "world_size": int(accelerator.num_processes)}
    tensors: dict[str, Any] = {}
    if fmt == DEEPSPEED:  # collective: each process writes its partitions
        model.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=True,
                              exclude_frozen_parameters=True)
    elif engine is Engine.FSDP2:
        tensors = _gather_fsdp2(unwrapped, _torch_optimizer(optimizer), main)
    elif main:
        tensors = _local_full_state(unwrapped, optimizer)
    if not main:
        torch.save(rng_states(), staging / f"rng-rank{rank}.pt")
    accelerator.wait_for_everyone()
    if main:
        payload = _payload(unwrapped, scheduler, loop_state, layout)
        payload.update(tensors)
        _publish(output_dir, staging, final, payload, keep)
    accelerator.wait_for_everyone()
    return final


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        accelerator: Any) -> dict[str, Any]:
    """Restore checkpoint `path` into a prepared model and optimizer (call on every process); returns the loop
    state. Each process gets its own RNG states back (`rng-rankR.pt`) where the checkpoint has them."""
    from rasa_lora.train.distributed import Engine, detect_engine

    engine = detect_engine(accelerator)
    payload = torch.load(path / STATE, map_location="cpu", weights_only=False)
    check_layout(path, payload.get("layout"), engine.value, int(accelerator.num_processes))
    unwrapped = accelerator.unwrap_model(model)
    if engine in (Engine.ZERO2, Engine.ZERO3):
        loaded, _ = model.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path / DEEPSPEED_DIR}; delete {path} to "
                                    "resume from the one before it")
    elif engine is Engine.FSDP2:
        _scatter_fsdp2(path, payload, unwrapped, _torch_optimizer(optimizer))
    else:
        _load_full(path, payload, unwrapped, optimizer)
    scheduler.load_state_dict(payload["scheduler"])
    _restore_method_state(unwrapped, payload["method"])
    restore_rng_states(payload["rng"])
    own = path / f"rng-rank{accelerator.process_index}.pt"
    if own.is_file():
        restore_rng_states(torch.load(own, weights_only=False))
    return payload["loop"]
