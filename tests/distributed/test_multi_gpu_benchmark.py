"""`benchmarks/multi_gpu.py` (the 2-GPU verification of DDP/FSDP2/ZeRO-3) runs its CPU dry run and judges it right.

The driver starts its one-process runs and a DDP run through `accelerate launch --config_file
configs/distributed/ddp.yaml` (gloo on this CPU), loads the saved adapters in a fresh process and compares. In fp32
on the CPU every comparison is exact or at reduction-order rounding, so this also fails if the benchmark's own
bookkeeping (which micro-batches a rank takes, the loss divisor, the captured gradients) goes wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def test_cpu_dry_run_of_the_multi_gpu_benchmark(tmp_path):
    out = tmp_path / "mg.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/multi_gpu.py", "--out", str(out), "--models", "tiny", "--engines", "ddp",
         "--work", str(tmp_path / "work"), "--timeout", "240"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())["models"]["tiny"]
    assert all(row["rc"] == 0 for row in report["processes"].values()), report["processes"]
    assert set(report["runs"]) == {"single", "repeat", "ddp"}
    ddp, compare = report["runs"]["ddp"], report["compare"]["ddp"]
    assert ddp["processes"] == 2 and ddp["wrapper"] == "DistributedDataParallel"
    assert ddp["pool_tensors"] == 14 and ddp["pool_grads_finite"] and not ddp["pool_grads_missing"]
    assert ddp["pool_grad_cross_rank_max_abs_diff"] == 0.0
    assert max(compare["loss_rel_err"]) <= 1e-6
    assert compare["pool_grad_rel_err_max"] <= 1e-6
    assert report["load"]["ddp"]["vs_own_run"] <= 1e-6 and report["load"]["ddp"]["ok"]
    assert report["load"]["ddp"]["vs_one_gpu"] <= 1e-6


@pytest.mark.gpu
def test_resume_under_deepspeed_on_two_gpus(tmp_path):
    """The resume stage on 2 GPUs for ZeRO-2 and ZeRO-3 (accelerate runs DeepSpeed only on GPUs; CPU coverage of the
    same checkpoint calls: tests/distributed/test_resume.py). Tiny random Llama; ~16 launches, minutes. Not run yet."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install rasa-lora[deepspeed])")
    from rasa_lora.models import tiny_llama
    from tests.train.conftest import build_tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tokenizer = build_tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "resume.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/multi_gpu.py", "--out", str(out), "--models", str(model_dir), "--engines",
         "zero2,zero3", "--no-workers", "--resume", "--work", str(tmp_path / "work"), "--timeout", "300"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["models"]["tiny"]["resume"]
    for engine in ("zero2", "zero3"):
        row = rows[engine]
        assert row["interrupted"]["rc"] == 143 and row["resumed"]["rc"] == 0, row
        assert row["interrupted_adapter"]["pools"] == 14
        assert row["ok"], row
