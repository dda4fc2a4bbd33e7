"""`report_to`: trackers receive metrics.jsonl's rows; TensorBoard writes event files offline."""

from __future__ import annotations

import json

import pytest

from rasa_lora.train import tracking
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(directory.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {directory}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


def test_tensorboard_logs_what_metrics_jsonl_logs(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs `pip install tensorboard`")
    out = tmp_path / "run"
    train(build_config(tiny_overrides(tiny_model_dir, out, max_steps=3, report_to="tensorboard")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(out / tracking.TENSORBOARD_DIR)
    for key in ("loss", "lr", "epoch", "tokens", "tokens_per_s", "elapsed_s"):
        assert [step for step, _ in scalars[key]] == [row["step"] for row in rows], key
        assert [value for _, value in scalars[key]] == pytest.approx([row[key] for row in rows], rel=1e-6), key
    assert (out / "adapter_model.safetensors").is_file()


def test_default_writes_no_tracker_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(build_config(tiny_overrides(tiny_model_dir, out, max_steps=1)))
    assert not (out / tracking.TENSORBOARD_DIR).exists()


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match="report_to='mlflow' is unknown; choose one of: none, tensorboard"):
        build_config({"report_to": "mlflow"})


def test_missing_tracker_package_names_the_fix(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "run"
    with pytest.raises(ModuleNotFoundError, match="`pip install wandb`"):
        train(build_config(tiny_overrides(tiny_model_dir, out, report_to="wandb")))
    assert not out.exists()  # refused before anything was written


def test_accelerator_receives_the_tracker():
    from types import SimpleNamespace

    def kwargs(name):
        return tracking.accelerator_kwargs(SimpleNamespace(report_to=name, output_dir="runs/x"))

    assert kwargs("none") == {}
    assert kwargs("tensorboard") == {"log_with": "tensorboard", "project_dir": "runs/x/tensorboard"}
    assert kwargs("trackio") == {"log_with": "trackio"} and kwargs("wandb") == {"log_with": "wandb"}
