"""The hub fallbacks (no local data) against the hub datasets' recorded configs and fields, offline."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from rasa_lora.evaluation.tasks import HENDRYCKS_MATH_CONFIGS, task_spec

METADATA = json.loads((Path(__file__).parent / "data" / "hub_metadata.json").read_text())


def _value(name: str, dtype: str, index: int):
    if dtype == "int64":
        return index
    if name == "solution":
        return f"so the result is $\\boxed{{{index}}}$."
    if name == "answer":
        return f"step #### {index}"
    return f"{name} {index}"


@pytest.fixture
def hub(monkeypatch):
    """`datasets.load_dataset` as the hub answers it: refuses a missing or unknown config, gives rows with the
    recorded fields only (indexing a field the dataset lacks raises KeyError, as on the real rows)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        meta = METADATA.get(name)
        if meta is None:
            raise FileNotFoundError(f"Dataset {name} not recorded")
        configs = meta["configs"]
        if config is None and "default" not in configs:
            raise ValueError(f"Config name is missing. Please pick one among the available configs: {configs}")
        if config is not None and config not in configs:
            raise ValueError(f"BuilderConfig '{config}' not found. Available: {configs}")
        if split not in meta["splits"]:
            raise ValueError(f"Unknown split {split!r}")
        return [{field: _value(field, dtype, i) for field, dtype in meta["features"].items()} for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_math_loads_every_subject_config(hub):
    items = task_spec("math").load_hub()
    assert [c[1] for c in hub] == list(HENDRYCKS_MATH_CONFIGS) and len(HENDRYCKS_MATH_CONFIGS) == 7
    assert len(items) == 14 and len({i["id"] for i in items}) == 14
    assert items[0]["answer"] == "0" and items[0]["question"] == "problem 0"


def test_math500_and_gsm8k_fallbacks_fit_their_datasets(hub):
    math500 = task_spec("math500").load_hub()
    gsm8k = task_spec("gsm8k").load_hub()
    assert math500[1]["id"] == "unique_id 1" and math500[1]["answer"] == "step #### 1"
    assert gsm8k[1]["answer"] == "1" and hub[-1] == ("openai/gsm8k", "main", "test")


def test_humaneval_plus_does_not_ask_the_hub_dataset_for_fields_it_lacks(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "evalplus", None)  # evalplus absent: a clear error naming both fixes
    monkeypatch.setitem(sys.modules, "evalplus.data", None)
    with pytest.raises(ImportError, match="--data-dir .*pip install evalplus"):
        task_spec("humaneval+").load_hub()
    assert not any(name == "evalplus/humanevalplus" for name, _, _ in hub)


def test_humaneval_plus_fallback_uses_evalplus_release(hub, monkeypatch, humanevalplus):
    release = {task_id: {k: v for k, v in task.items() if k != "id"} for task_id, task in humanevalplus.items()}
    data = types.ModuleType("evalplus.data")
    data.get_human_eval_plus = lambda: release
    package = types.ModuleType("evalplus")
    package.data = data
    monkeypatch.setitem(sys.modules, "evalplus", package)
    monkeypatch.setitem(sys.modules, "evalplus.data", data)
    items = task_spec("humaneval+").load_hub()
    assert len(items) == 164 and all({"base_input", "plus_input", "atol", "id"} <= set(i) for i in items)
