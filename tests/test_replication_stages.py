"""benchmarks/replication.py: the stage runner's time limit and the run names (no model, no GPU)."""

import sys
import time
from pathlib import Path

import pytest

replication = pytest.importorskip("benchmarks.replication")
REPO = Path(__file__).resolve().parents[1]


def test_the_time_limit_stops_running_jobs_and_starts_no_pending_one(tmp_path):
    # Before the fix, jobs still pending at the limit kept the loop waiting for ever (a GPU sitting hung on it).
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    jobs = [(f"job{i}", sleeper, tmp_path / f"job{i}.log") for i in range(3)]
    started = time.monotonic()
    codes = replication.run_parallel(jobs, parallel=1, time_limit=1, threads=1)
    assert time.monotonic() - started < 20
    assert codes["job0"] == -15 and codes["job1"] is None and codes["job2"] is None


def test_jobs_that_end_in_time_all_run(tmp_path):
    quick = [sys.executable, "-c", "pass"]
    codes = replication.run_parallel([(f"q{i}", quick, tmp_path / f"q{i}.log") for i in range(3)], parallel=2,
                                     time_limit=60, threads=1)
    assert codes == {"q0": 0, "q1": 0, "q2": 0}


def test_run_names():
    assert replication.parse_run("rasa-r8-a16-s2") == {"method": "rasa", "seed": 2, "r": 8, "alpha": 16.0}
    assert replication.parse_run("lora-r16-lr1e-3-s0")["learning_rate"] == 1e-3
    assert replication.parse_run("fft-s0")["model_dtype"] == "float32"
    with pytest.raises(ValueError, match="METHOD"):
        replication.parse_run("rasa-8")


def test_train_command_resumes_or_restarts(tmp_path):
    data = tmp_path / "data"
    command = replication.train_command("rasa-r8-s1", None, data, tmp_path, ["--dataset-fraction", "0.5"])
    assert "--resume" not in command and "--overwrite" not in command and command[-2:] == ["--dataset-fraction", "0.5"]
    (tmp_path / "rasa-r8-s1").mkdir()
    assert "--overwrite" in replication.train_command("rasa-r8-s1", None, data, tmp_path, [])
    (tmp_path / "rasa-r8-s1" / "checkpoints" / "step-000003").mkdir(parents=True)
    assert "--resume" in replication.train_command("rasa-r8-s1", None, data, tmp_path, [])


def test_the_sitting_script_runs_every_stage_in_order_with_valid_arguments(monkeypatch):
    """benchmarks/replication_sitting.sh (DRY_RUN=1 prints its commands): the stages in order, each command parsed
    by replication.py's own argument parser, and no stage wrapped in `timeout` (its child would outlive a killed
    device command)."""
    import shlex
    import subprocess

    printed = subprocess.run(["bash", str(REPO / "benchmarks" / "replication_sitting.sh")], cwd=REPO,
                             env={"DRY_RUN": "1", "TJOBS": "3", "PATH": "/usr/bin:/bin"}, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    names = [line.split(":")[0] for line in printed]
    assert names == ["train-paper", "analyze", "eval-paper-mc", "eval-paper-gsm8k", "train-matched", "eval-matched"]
    assert not any("timeout" in line for line in printed)
    seen = []
    for stage in ("cmd_train", "cmd_generate", "cmd_analyze"):
        monkeypatch.setattr(replication, stage, lambda args, stage=stage: seen.append((stage, args)) or 0)
    for line in printed:
        argv = shlex.split(line.split(": ", 1)[1])
        assert argv[:2] == ["python3", "benchmarks/replication.py"]
        assert replication.main(argv[2:]) == 0
    stages = [stage for stage, _ in seen]
    assert stages == ["cmd_train", "cmd_analyze", "cmd_generate", "cmd_generate", "cmd_train", "cmd_generate"]
    assert seen[0][1].runs.split(",")[-1] == "fft-s0" and seen[0][1].extra == ["--dataset-fraction", "0.5"]
    assert seen[2][1].tasks == "arc_challenge,winogrande,hellaswag" and seen[3][1].tasks == "gsm8k"
    assert all(args.batch_size == 1319 for stage, args in seen if stage == "cmd_generate")
