"""`accelerate launch --config_file configs/distributed/fsdp2.yaml -m rasa_lora.cli train` with 2 CPU processes.

The end-to-end check of the wiring in the trainer (FSDP2, the harder engine: rasa-lora shards the model on the
CPU, gathers the adapter for saving). A tiny random Llama with SmolLM2's tokenizer stands in for SmolLM2 so the
run takes seconds; the same command on the default model was run by hand (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from rasa_lora.models import embedded_gguf_path, load_tokenizer, tiny_llama

    try:  # SmolLM2's tokenizer comes from the embedded package, which `make setup` installs (CI has it)
        embedded_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:  # e.g. the GPU machine, where it is not carried
        pytest.skip(f"needs the embedded SmolLM2 package: {error}")
    tokenizer = load_tokenizer(None)
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_launch_fsdp2_trains_and_saves_an_adapter_that_loads(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import rasa_lora  # noqa: F401  (registers RaSA with PEFT)

    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
               "--config_file", str(REPO / "configs" / "distributed" / "fsdp2.yaml"), "-m", "rasa_lora.cli", "train",
               "--base-model", str(tiny_base), "--max-steps", "2", "--global-batch-size", "4",
               "--micro-batch-size", "1", "--num-examples", "16", "--output-dir", str(out), "--progress-bar", "false"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # written once, by the main process
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    assert any("rasa_shared_A" in name for name, _ in model.named_parameters())
