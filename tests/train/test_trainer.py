"""The training loop on a tiny random Llama: outputs, methods, checkpoints, resume, refusal of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rasa_lora.train.cli import main as train_main
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides


def _args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


def test_run_leaves_adapter_metrics_summary_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(build_config(tiny_overrides(tiny_model_dir, out, max_steps=3)))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "RASA"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["tokens_per_s"] > 0 for row in rows)
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (saved["method"], saved["steps"], saved["final_loss"]) == ("rasa", 3, rows[-1]["loss"])
    assert saved["best_loss"] == min(row["loss"] for row in rows) and saved["tokens"] == rows[-1]["tokens"]


def test_the_collector_skips_the_setup_during_the_loop_only(tiny_model_dir, tmp_path, monkeypatch):
    """During the training loop the objects alive at its start are frozen out of Python's cyclic collector (its
    full collections would walk them all); after the loop, and after an error in it, they are back."""
    import gc

    from rasa_lora.train import trainer

    seen, loop = [], trainer.training_loop

    def watching(run, metrics_path):
        seen.append(gc.get_freeze_count())
        loop(run, metrics_path)

    monkeypatch.setattr(trainer, "training_loop", watching)
    before = gc.get_freeze_count()
    train(build_config(tiny_overrides(tiny_model_dir, tmp_path / "run", max_steps=1)))
    assert seen[0] > 10_000 and gc.get_freeze_count() == before

    def failing(run, metrics_path):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "training_loop", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(build_config(tiny_overrides(tiny_model_dir, tmp_path / "run2", max_steps=1)))
    assert gc.get_freeze_count() == before


def test_a_step_does_not_read_each_micro_batchs_loss(tiny_model_dir, tmp_path, monkeypatch):
    """A `.item()` of each micro-batch's loss makes the host wait on a GPU for that micro-batch's backward before it
    queues the next forward; the step's loss is summed on the device (detached) and read once at the step's end.
    Counted: scalar reads of tensors that are part of an autograd graph (each micro-batch's loss is one)."""
    reads = []

    def counting(original):
        def read(tensor):
            if tensor.grad_fn is not None:
                reads.append(tuple(tensor.shape))
            return original(tensor)
        return read

    for name in ("item", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    summary = train(build_config(tiny_overrides(tiny_model_dir, tmp_path / "run", global_batch_size=8,
                                                micro_batch_size=2)))
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    assert reads == []  # before: 4 a step


def test_loss_goes_down_on_repeated_data(tiny_model_dir, tmp_path):
    # Full fine-tuning: on a random 32-wide model an adapter's loss moves too little for a robust check.
    values = tiny_overrides(tiny_model_dir, tmp_path / "run", method="fft", max_steps=12, num_examples=4,
                            learning_rate=1e-3, dropout=0.0)
    train(build_config(values))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2  # measured: 5.967 -> 5.578


def test_same_yaml_trains_lora_and_rasa_with_counts_differing_by_d(tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: lora\nr: 8\nalpha: 16\n")
    counts = {}
    for method in ("lora", "rasa"):
        out = tmp_path / method
        values = tiny_overrides(tiny_model_dir, out, max_steps=1)
        assert train_main([str(recipe), "--method", method, *_args(values)]) == 0
        counts[method] = json.loads((out / "summary.json").read_text())["trainable_params"]
    layers, modules, r, k = 4, 7, 8, 1
    # RaSA moves k ranks per layer into a shared pool (same A/B total); only the diagonals D are extra.
    assert counts["rasa"] - counts["lora"] == layers * modules * (r - k + layers * k)


@pytest.mark.parametrize("method", ["vera", "adalora", "olora", "dora", "pissa", "fft"])
def test_baselines_train_through_the_same_path(tiny_model_dir, tmp_path, method):
    out = tmp_path / method
    summary = train(build_config(tiny_overrides(tiny_model_dir, out, method=method, max_steps=2)))
    assert summary["steps"] == 2 and 0 < summary["trainable_params"] <= summary["total_params"]
    weights = "model.safetensors" if method == "fft" else "adapter_model.safetensors"
    assert (out / weights).is_file()
    if method == "fft":
        assert summary["trainable_params"] == summary["total_params"]


def test_checkpoints_keep_the_newest_and_leave_no_temp_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(build_config(tiny_overrides(tiny_model_dir, out, max_steps=7, save_steps=2, save_total_limit=2)))
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_existing_output_dir_is_refused_then_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    values = tiny_overrides(tiny_model_dir, out, max_steps=1)
    assert train_main(_args(values)) == 2 and (out / "keep.txt").is_file()
    assert train_main([*_args(values), "--overwrite"]) == 0 and not (out / "keep.txt").exists()


@pytest.mark.parametrize("case", ["malformed", "missing_field", "empty", "method", "key", "model"])
def test_bad_input_is_a_clear_error_and_leaves_no_output_dir(tiny_model_dir, tmp_path, capsys, case):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text({"malformed": '{"query": "q", "response": "r"}\n{oops\n',
                        "missing_field": '{"query": "q", "response": "r"}\n{"query": "q"}\n',
                        "empty": ""}.get(case, '{"query": "q", "response": "r"}\n'))
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, dataset=str(dataset), max_steps=1)
    extra = {"method": ["--method", "lorra"], "key": ["--learning-rat", "1"],
             "model": ["--base-model", str(tmp_path / "no-such-model")]}.get(case, [])
    assert train_main([*_args(values), *extra]) == 2
    expected = {"malformed": "data.jsonl line 2: malformed JSON",
                "missing_field": "data.jsonl line 2: field(s) response", "empty": "holds no records",
                "method": "is unknown; choose one of", "key": "valid keys:", "model": "does not exist"}[case]
    assert expected in capsys.readouterr().err
    assert not out.exists()


def _subprocess_env() -> dict:
    import rasa_lora

    source = str(Path(rasa_lora.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train_process(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rasa_lora", "train", *args], env=_subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step}: {process.stderr.read() if process.stderr else ''}")


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = tiny_overrides(tiny_model_dir, tmp_path / "x", max_steps=12, global_batch_size=8, micro_batch_size=1,
                            num_examples=48)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reference = _train_process(_args({**common, "output_dir": straight}))
    process = _train_process(_args({**common, "output_dir": interrupted}))
    _wait_for_step(interrupted / "metrics.jsonl", 6, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, process.stderr.read()
    stopped_at = int((interrupted / "checkpoints").iterdir().__next__().name.split("-")[1])
    assert 6 <= stopped_at < 12 and not (interrupted / "adapter_model.safetensors").exists()
    resumed = _train_process(_args({"output_dir": interrupted, "resume": True}))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    final, expected = (load_file(path / "adapter_model.safetensors") for path in (interrupted, straight))
    assert final.keys() == expected.keys() and all(torch.equal(final[key], expected[key]) for key in expected)
    losses = [[json.loads(row)["loss"] for row in (path / "metrics.jsonl").read_text().splitlines()]
              for path in (interrupted, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == 12


def test_resume_refuses_a_changed_recipe_and_a_missing_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, max_steps=2, save_steps=1)
    assert train_main(_args(values)) == 0
    assert train_main([*_args({**values, "learning_rate": 1e-3}), "--resume"]) == 2
    assert "learning_rate: saved 0.0005, now 0.001" in capsys.readouterr().err
    assert train_main([*_args({**values, "output_dir": tmp_path / "empty"}), "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_resume_accepts_a_run_saved_before_a_key_existed_when_the_key_keeps_its_default(tiny_model_dir, tmp_path,
                                                                                         capsys):
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, max_steps=3, save_steps=1)
    assert train_main(_args(values)) == 0
    saved = json.loads((out / "config.json").read_text())
    for key in ("val_set_size", "eval_dataset"):  # as an older version wrote it
        del saved[key]
    (out / "config.json").write_text(json.dumps(saved))
    assert train_main([*_args({**values, "val_set_size": 2}), "--resume"]) == 2  # not the default: refused
    assert "val_set_size: saved 0.0, now 2" in capsys.readouterr().err
    assert train_main([*_args(values), "--resume"]) == 0


def test_the_cli_destroys_a_finished_runs_process_group(tiny_model_dir, tmp_path, monkeypatch):
    """`rasa-lora train` ends a multi-process run's process group itself (a one-process gloo group stands in)."""
    import torch.distributed as dist

    from rasa_lora.train import cli

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        finished = []
        monkeypatch.setattr("rasa_lora.train.trainer.train", lambda config: finished.append(config) or {})
        assert cli.main(_args(tiny_overrides(tiny_model_dir, tmp_path / "run"))) == 0
        assert finished and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_micro_batches_reach_the_cpu_device_unchanged():
    from rasa_lora.train.trainer import to_device

    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.ones(2, 3, dtype=torch.long)}
    moved = to_device(batch, torch.device("cpu"))
    assert all(torch.equal(moved[key], batch[key]) for key in batch)


@pytest.mark.gpu
def test_micro_batches_reach_the_gpu_without_waiting_for_queued_work():
    """The copy is queued behind the GPU's work instead of the host waiting for that work (a plain .to("cuda")
    would return only after the queued sleep, with the stream idle)."""
    from rasa_lora.train.trainer import to_device

    batch = {"input_ids": torch.arange(4096).view(4, 1024), "labels": torch.full((4, 1024), -100)}
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued on the current stream
    moved = to_device(batch, torch.device("cuda"))
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy
    assert all(moved[key].is_cuda and torch.equal(moved[key].cpu(), batch[key]) for key in batch)
