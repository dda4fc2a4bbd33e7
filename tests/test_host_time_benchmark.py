"""`benchmarks/host_time.py --small` on the CPU: every variant measured in both modes, ratios and JSON written."""

import json

import pytest
import torch

from rasa_lora.ops import set_fused_backend
from tests.benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_small_run_writes_rows_for_each_method_and_mode(tmp_path, capsys):
    out = tmp_path / "host_time.json"
    host_time = load_benchmark("host_time")
    try:
        assert host_time.main(["--small", "--steps", "2", "--warmup", "1", "--methods", "frozen,rasa",
                               "--modes", "eager,compile:default",  # compile:MODE: the mode named in the row
                               "--compile-backend", "aot_eager", "--explain", "--out", str(out)]) == 0
    finally:
        set_fused_backend(None)
        torch._dynamo.reset()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["mode"]) for r in rows] == [("frozen", "eager"), ("rasa", "eager"),
                                                         ("frozen", "compile:default"), ("rasa", "compile:default")]
    for row in rows:
        assert len(row["steps_ms"]) == 2 and 0 < row["host_ms"] <= row["step_ms"] * 1.01
        assert row["x_frozen"] == pytest.approx(row["step_ms"] / rows[0 if row["mode"] == "eager" else 2]["step_ms"])
    assert all(isinstance(r["graph_breaks"], int) for r in rows if r["mode"] == "compile:default")
    table = capsys.readouterr().out
    assert "x frozen" in table and any(line.split()[2:4] == ["rasa", "compile:default"]
                                       for line in table.splitlines() if len(line.split()) > 3)


@pytest.mark.slow
def test_processes_repeat_the_run_in_fresh_processes_and_count_the_target(tmp_path, capsys):
    """`--processes 2`: two fresh processes, rows tagged with their process, each process's ratio to the frozen base
    in the summary with how many met `--target` (eager rows: compiling in each process took minutes here)."""
    out = tmp_path / "host_time.json"
    host_time = load_benchmark("host_time")
    argv = ["--small", "--steps", "1", "--warmup", "1", "--methods", "frozen,rasa", "--modes", "eager",
            "--processes", "2", "--target", "1000", "--out", str(out)]
    assert host_time.main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["process"], r["method"], r["mode"]) for r in result["rows"]] == [
        (0, "frozen", "eager"), (0, "rasa", "eager"), (1, "frozen", "eager"), (1, "rasa", "eager")]
    (summary,) = result["summary"]
    assert summary["processes"] == 2 and summary["met"] == 2
    ratios = [r["x_frozen"] for r in result["rows"] if r["method"] == "rasa"]
    assert summary["x_frozen_min"] == min(ratios) and summary["x_frozen_max"] == max(ratios)
    assert "over 2 processes, <= 1000.0 in 2" in capsys.readouterr().out


def test_rasa_ref_times_the_reference_path_and_rasa_the_fused_one(tmp_path, monkeypatch):
    """`--methods rasa,rasa-ref`: the same RaSA model, once through the fused op and once through the layer's
    reference path (eq. 5 in plain PyTorch), so the two paths' host costs can be compared in one run."""
    from rasa_lora.adapter import layer as layer_module

    calls = {"fused": 0}
    original = layer_module.rasa_linear

    def counting(*args, **kwargs):
        calls["fused"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "rasa_linear", counting)
    host_time = load_benchmark("host_time")
    seen = []
    measure = host_time.measure

    def recording(*args, **kwargs):
        before = calls["fused"]
        result = measure(*args, **kwargs)
        seen.append(calls["fused"] - before)
        return result

    monkeypatch.setattr(host_time, "measure", recording)
    out = tmp_path / "host_time.json"
    try:
        assert host_time.main(["--small", "--steps", "1", "--warmup", "1", "--methods", "rasa,rasa-ref",
                               "--modes", "eager", "--out", str(out)]) == 0
    finally:
        set_fused_backend(None)
    assert seen[0] > 0 and seen[1] == 0
    result = json.loads(out.read_text())
    assert result["complete"] is True and [r["method"] for r in result["rows"]] == ["rasa", "rasa-ref"]
