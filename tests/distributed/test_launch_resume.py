"""`accelerate launch --config_file configs/distributed/fsdp2.yaml -m rasa_lora.cli train`, SIGTERM mid-run, then
`--resume`: the final adapter and every step's loss are bitwise those of an uninterrupted FSDP2 run (2 CPU processes,
gloo, fp32, dropout 0.05 as in the recipe: each process's dropout RNG comes back too).

The signal goes to the launcher, as a scheduler's preemption would: torch's elastic agent forwards it to both
workers, they agree on the step to stop after (`agreed_signal`), write one checkpoint and exit 143. A tiny random
Llama with the tests' 384-token tokenizer keeps each launch ~25 s on 2 cores; the uninterrupted run runs beside the
interrupted one.
"""

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

from tests.distributed.worker import free_port

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
STEPS = 8



def _launch(config: str, args: list[str]) -> subprocess.Popen:
    import rasa_lora

    source = str(Path(rasa_lora.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    # a port of its own: two launches run side by side here, and accelerate's default 29500 is taken by the first
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
               str(free_port()), "--config_file", str(REPO / "configs" / "distributed" / config), "-m",
               "rasa_lora.cli", "train", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        return process.wait(timeout=timeout), process.stderr.read()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_then_resume_under_fsdp2_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    keys = ["--base-model", str(tiny_model_dir), "--max-steps", str(STEPS), "--global-batch-size", "4",
            "--micro-batch-size", "1", "--num-examples", "32", "--progress-bar", "false", "--cutoff-len", "256",
            "--gradient-checkpointing", "false"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reference = _launch("fsdp2.yaml", [*keys, "--output-dir", str(straight)])
    process = _launch("fsdp2.yaml", [*keys, "--output-dir", str(interrupted)])
    deadline = time.monotonic() + 240
    metrics = interrupted / "metrics.jsonl"
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # the launcher
    code, err = _wait(process)
    assert code == 143, err[-3000:]
    assert "interrupted by SIGTERM" in err
    stopped = [path.name for path in (interrupted / "checkpoints").iterdir()]
    assert len(stopped) == 1 and 2 <= int(stopped[0].split("-")[1]) < STEPS, stopped
    assert not (interrupted / "adapter_model.safetensors").exists()
    code, err = _wait(_launch("fsdp2.yaml", ["--output-dir", str(interrupted), "--resume", "true"]))
    assert code == 0, err[-3000:]
    code, err = _wait(reference)
    assert code == 0, err[-3000:]
    final, expected = (load_file(path / "adapter_model.safetensors") for path in (interrupted, straight))
    assert final.keys() == expected.keys() and sum("rasa_shared" in key for key in expected) == 14
    assert [key for key in expected if not torch.equal(final[key], expected[key])] == []
    assert _losses(interrupted) == _losses(straight) and len(_losses(straight)) == STEPS
