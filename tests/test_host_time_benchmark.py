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
                               "--compile-backend", "aot_eager", "--explain", "--out", str(out)]) == 0
    finally:
        set_fused_backend(None)
        torch._dynamo.reset()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["mode"]) for r in rows] == [("frozen", "eager"), ("rasa", "eager"),
                                                         ("frozen", "compile"), ("rasa", "compile")]
    for row in rows:
        assert len(row["steps_ms"]) == 2 and 0 < row["host_ms"] <= row["step_ms"] * 1.01
        assert row["x_frozen"] == pytest.approx(row["step_ms"] / rows[0 if row["mode"] == "eager" else 2]["step_ms"])
    assert all(isinstance(r["graph_breaks"], int) for r in rows if r["mode"] == "compile")
    table = capsys.readouterr().out
    assert "x frozen" in table and "rasa   compile" in table
