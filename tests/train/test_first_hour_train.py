"""What a new user meets first with `rasa-lora train` on a CPU: the derived micro-batch, the warning before a long
run, a progress bar that moves per micro-batch, and Ctrl-C acknowledged at once."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from rasa_lora.train import trainer
from rasa_lora.train.config import build_config, parse_overrides
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides
from tests.train.test_trainer import _args, _train_process, _wait_for_step


@pytest.mark.parametrize(("global_batch", "micro"), [(192, 3), (8, 2), (7, 1), (4, 2), (3, 3), (1, 1), (10, 2)])
def test_micro_batch_is_derived_when_not_given(global_batch, micro):
    config = build_config({"global_batch_size": global_batch})
    assert config.micro_batch_size == micro
    assert global_batch % config.micro_batch_size == 0


def test_a_given_micro_batch_is_kept_or_refused():
    assert build_config({"global_batch_size": 8, "micro_batch_size": 8}).micro_batch_size == 8
    with pytest.raises(ValueError, match="micro_batch_size=3 does not divide global_batch_size=8"):
        build_config({"global_batch_size": 8, "micro_batch_size": 3})


def test_global_batch_8_trains_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    from rasa_lora.cli import main

    values = tiny_overrides(tiny_model_dir, tmp_path / "run", global_batch_size=8, max_steps=1)
    del values["micro_batch_size"]
    assert main(["train", *_args(values)]) == 0, capsys.readouterr().err
    saved = (tmp_path / "run" / "config.json").read_text()
    assert '"micro_batch_size": 2' in saved


def test_long_cpu_runs_are_announced_with_the_quick_recipe():
    paper = build_config({})
    warning = trainer.cpu_warning(paper, total_steps=84, device=torch.device("cpu"))
    assert warning is not None and "84 optimizer steps of 192" in warning and trainer.QUICK_RECIPE in warning
    assert trainer.cpu_warning(paper, 84, torch.device("cuda")) is None
    # the quick recipe is a valid command line and is itself short enough not to warn
    quick = build_config(parse_overrides(trainer.QUICK_RECIPE.split()[2:]))
    assert quick.micro_batch_size == 8 and quick.max_steps == 20
    assert trainer.cpu_warning(quick, quick.max_steps, torch.device("cpu")) is None


def test_the_warning_comes_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise RuntimeError("the model would load here")

    monkeypatch.setattr(trainer, "build_model", no_model)
    values = tiny_overrides(tiny_model_dir, tmp_path / "run", num_examples=200, max_steps=None, epochs=8)
    del values["micro_batch_size"], values["global_batch_size"]
    with pytest.raises(RuntimeError, match="would load"):
        train(build_config(values))
    err = capsys.readouterr().err
    assert "warning: on a CPU this run is 16 optimizer steps of 192" in err and "A quick trial" in err


def test_the_progress_bar_counts_micro_batches(tiny_model_dir, tmp_path, capsys):
    values = tiny_overrides(tiny_model_dir, tmp_path / "run", global_batch_size=4, micro_batch_size=1, max_steps=2,
                            progress_bar=True)
    train(build_config(values))
    err = capsys.readouterr().err
    assert "8/8" in err and "micro-batch" in err and "step 2/2" in err


def _long_run_past_step_2(tiny_model_dir, tmp_path):
    """(output dir, training process) of a 400-step run that has logged its second step."""
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, max_steps=400, global_batch_size=8, micro_batch_size=1,
                            num_examples=64)
    process = _train_process(_args(values))
    _wait_for_step(out / "metrics.jsonl", 2, process)
    return out, process


@pytest.mark.slow
def test_ctrl_c_is_acknowledged_at_once_then_checkpointed(tiny_model_dir, tmp_path):
    out, process = _long_run_past_step_2(tiny_model_dir, tmp_path)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    err = process.stderr.read()
    acknowledged, finished = err.find("SIGINT received: finishing this step"), err.find("interrupted by SIGINT")
    assert 0 <= acknowledged < finished, err
    assert (out / "checkpoints").is_dir()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_without_waiting(tiny_model_dir, tmp_path):
    _, process = _long_run_past_step_2(tiny_model_dir, tmp_path)
    process.send_signal(signal.SIGINT)
    time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    err = process.stderr.read()
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_building_a_model_raises_no_future_warning(tiny_model_dir):
    import warnings

    from rasa_lora.train import methods

    config = build_config(tiny_overrides(tiny_model_dir, "unused", gradient_checkpointing=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = trainer.build_model(config, total_steps=2, device=torch.device("cpu"))
        methods.enable_gradient_checkpointing(model, use_reentrant=True)
    assert any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def test_an_adapter_trained_on_the_embedded_model_names_it_portably(tmp_path, monkeypatch):
    import json
    import warnings

    import peft.utils.save_and_load as save_and_load

    def no_lookup(*args, **kwargs):
        raise AssertionError("PEFT asked the Hub about the base model while saving")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_lookup)
    out = tmp_path / "run"
    config = build_config({"output_dir": str(out), "global_batch_size": 1, "num_examples": 8, "max_steps": 1,
                           "cutoff_len": 64, "gradient_checkpointing": False, "progress_bar": False,
                           "target_modules": ["q_proj"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "smollm2"  # was the cache path of the machine that trained it
    assert not [w for w in caught if "smollm2" in str(w.message)]
