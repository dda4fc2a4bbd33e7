"""Tests of the scripts under `benchmarks/` load them by path (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A fresh module object of `benchmarks/<name>.py` (`name` may hold a folder: "experiments/floor"; executed on
    every call, so environment switches it reads at import time take effect)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name.replace('/', '_')}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
