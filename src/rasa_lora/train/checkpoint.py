"""Training checkpoints: written atomically, the newest K kept, restored exactly.

A checkpoint is `OUTPUT_DIR/checkpoints/step-NNNNNN/state.pt` holding everything the next step depends on: the
trainable parameters (adapter weights, RaSA's shared pools, or the whole model for fft), the optimizer and
scheduler state, the RNG states (Python, torch CPU, CUDA), the loop counters, and method state that lives outside
parameters (AdaLoRA's importance scores, PriLoRA's pruning statistics). The data position needs no file: the batch
order is a function of (seed, epoch) and the step number.

Atomicity: the files are written into `checkpoints/.tmp-step-NNNNNN` and the directory is renamed into place, so a
kill during the write leaves either the old set of checkpoints or the new one, never a half-written newest one.
Limits: the frozen base model is not stored (it is reloaded from `base_model`), so resuming needs the same base.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.name.startswith(_PREFIX) and (path / "state.pt").is_file()]
    return sorted(found, key=lambda path: int(path.name[len(_PREFIX):]))


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


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loop_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    payload = {
        "trainable": {name: param.detach().cpu() for name, param in model.named_parameters() if param.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "loop": dict(loop_state),
        "method": _method_state(model),
    }
    torch.save(payload, staging / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint into freshly built objects; returns the loop state."""
    payload = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    saved = payload["trainable"]
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if expected != set(saved):
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"checkpoint {path} does not match this model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); resume with the same base_model, method and target_modules")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(saved[name])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    _restore_method_state(model, payload["method"])
    restore_rng_states(payload["rng"])
    return payload["loop"]
