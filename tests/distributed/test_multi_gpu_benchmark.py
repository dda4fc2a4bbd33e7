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
