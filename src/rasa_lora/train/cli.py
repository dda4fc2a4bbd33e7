"""`rasa-lora train [CONFIG.yaml] [--key value ...]`: the SFT recipe from a YAML file and command-line overrides.

Every key of `rasa_lora.train.config.TrainConfig` can be given in the YAML or as `--key value` (dashes or
underscores; `--flag` alone means true). With `--resume` and no other recipe key, the run's saved config is used.
Exit codes: 0 done, 2 bad input (nothing written), 130/143 interrupted by SIGINT/SIGTERM (a checkpoint was
written; rerun with `--resume`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = """usage: rasa-lora train [CONFIG.yaml] [--key value ...]

Fine-tune with RaSA (default), lora, vera, adalora, olora, dora, pissa or fft. Defaults are the paper's recipe;
with no argument it trains RaSA r=8 on the embedded SmolLM2-135M-Instruct with built-in arithmetic problems
(global batch 192: hours on a CPU). The micro-batch, unless given, is the largest divisor of the global batch
up to 3.
Examples:
  rasa-lora train --global-batch-size 8 --micro-batch-size 8 --max-steps 20 --num-examples 160 \
      --gradient-checkpointing false --output-dir runs/try      # a quick CPU trial (the demo's recipe)
  rasa-lora train configs/demo.yaml --method lora --output-dir runs/lora
  rasa-lora train configs/demo.yaml --output-dir runs/lora --resume
keys (see docs/training.md):
"""


def recipe_values(argv: list[str]) -> dict:
    """The recipe values of a command line: YAML < overrides."""
    from rasa_lora.train.config import parse_overrides, read_yaml

    config_path = argv[0] if argv and not argv[0].startswith("--") else None
    overrides = parse_overrides(argv[1:] if config_path else argv)
    values = read_yaml(config_path) if config_path else {}
    values.update(overrides)
    return values


def with_saved(values: dict) -> dict:
    """With `resume`, the run's saved config under the given values (saved < YAML < overrides)."""
    from rasa_lora.train.config import TrainConfig, read_run_recipe

    saved = read_run_recipe(str(values.get("output_dir", TrainConfig.output_dir))) if values.get("resume") else None
    if saved:
        values = {**saved, **values}
    return values


def _end_process_group() -> None:
    """Destroy a multi-process run's process group before the interpreter exits, as accelerate's `end_training`
    does: PyTorch warns when an NCCL group is left to teardown, and gloo's destruction during interpreter teardown
    deadlocked in `benchmarks/multi_gpu.py`'s CPU workers (a gloo thread waiting for the GIL). Only after every
    process finished the run (or checkpointed on a signal): never on an error that may have left others waiting."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the finished run's DDP wrapper, whose reducer holds the group
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    from rasa_lora.train.config import build_config, valid_keys

    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "  " + " ".join(f"--{key.replace('_', '-')}" for key in valid_keys()))
        return 0
    try:
        config = build_config(with_saved(recipe_values(argv)))
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, ModuleNotFoundError) as error:
        print(f"rasa-lora train: error: {error}", file=sys.stderr)
        return 2
    return run(config)


def run(config) -> int:
    """Train `config` (a `TrainConfig`) as `rasa-lora train` does: its messages, exit codes and summary."""
    from rasa_lora.train.trainer import TrainingInterrupted, train

    try:
        summary = train(config)
    except TrainingInterrupted as interrupted:
        _end_process_group()
        print(f"rasa-lora train: {interrupted}; continue with the same command and --resume", file=sys.stderr)
        return interrupted.exit_code
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, ModuleNotFoundError) as error:
        print(f"rasa-lora train: error: {error}", file=sys.stderr)
        return 2
    _end_process_group()
    if not summary:  # a process other than the main one of a multi-process run: it wrote nothing
        return 0
    out = Path(config.output_dir)
    print(json.dumps(summary, indent=2))
    saved = "model" if config.method == "fft" else "adapter"  # a full fine-tune's output_dir is a model folder
    print(f"{saved}: {out}  metrics: {out / 'metrics.jsonl'}  loss plot: {out / 'loss.png'}")
    return 0
