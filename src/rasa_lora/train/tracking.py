"""Experiment tracking for `rasa-lora train`: `report_to: tensorboard | trackio | wandb | none`, through accelerate.

Each tracker receives what `metrics.jsonl` holds, row by row at the same steps (loss, lr, epoch, tokens,
tokens_per_s, elapsed_s), and the recipe as its configuration (hyperparameters). `metrics.jsonl` stays the record
the project's own tools read; trackers are a view of it. TensorBoard writes event files under
`output_dir/tensorboard/<run name>` (offline, the authors' choice); trackio and wandb log where their own settings say
(`WANDB_MODE=offline`, `TRACKIO_DIR`, ...). The tracker's package is checked before anything is loaded, and a missing
one is named with its `pip install` line. Default `none`: no tracker, no extra import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPORT_TO = ("none", "tensorboard", "trackio", "wandb")
# tracker -> (module that must be importable, what to install)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
             "wandb": ("wandb", "wandb")}
TENSORBOARD_DIR = "tensorboard"


def check_available(report_to: str) -> None:
    """Raise, naming the fix, when the tracker's package is missing (call before loading anything)."""
    if report_to == "none":
        return
    module, package = _PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"report_to={report_to!r} needs the {package!r} package; `pip install {package}` "
                                  "(or `pip install 'rasa-lora[tracking]'`), or set report_to: none")


def accelerator_kwargs(config: Any) -> dict[str, Any]:
    """Keyword arguments of `accelerate.Accelerator` for the recipe's tracker ({} for none)."""
    if config.report_to == "none":
        return {}
    if config.report_to == "tensorboard":
        return {"log_with": "tensorboard", "project_dir": str(Path(config.output_dir) / TENSORBOARD_DIR)}
    return {"log_with": config.report_to}


def hyperparameters(config: Any) -> dict[str, Any]:
    """The recipe as flat scalars (TensorBoard's hparams take bool, str, int, float; lists become text)."""
    values = {}
    for key, value in config.to_dict().items():
        values[key] = value if isinstance(value, (bool, str, int, float)) else str(value)
    return values


def start(accelerator: Any, config: Any) -> None:
    """Open the run (main process only, as accelerate does) with the recipe as its configuration."""
    if config.report_to != "none":
        accelerator.init_trackers(Path(config.output_dir).name or "rasa-lora", config=hyperparameters(config))


def log(accelerator: Any, config: Any, row: dict[str, Any]) -> None:
    """One metrics.jsonl row, at its optimizer step."""
    if config.report_to != "none":
        accelerator.log({key: value for key, value in row.items() if key != "step"}, step=row["step"])


def finish(accelerator: Any, config: Any) -> None:
    if config.report_to != "none":
        accelerator.end_training()
