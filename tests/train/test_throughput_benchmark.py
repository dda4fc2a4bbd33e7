"""`benchmarks/train_throughput.py` on the CPU (tiny model): the trainer's own step with the adapter and without it,
the same steps and tokens for each variant, ratios and JSON written."""

import json

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.mark.slow
def test_frozen_and_rasa_run_the_same_steps(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    bench = load_benchmark("train_throughput")
    recipe = ["--base-model", str(tiny_model_dir), "--num-examples", "16", "--global-batch-size", "4",
              "--micro-batch-size", "2", "--gradient-checkpointing", "true", "--dropout", "0.05"]
    assert bench.main(["--variants", "frozen,rasa", "--steps", "2", "--warmup", "1", "--out", str(out), "--",
                       *recipe]) == 0
    rows = json.loads(out.read_text())["rows"]
    frozen, rasa = rows
    assert (frozen["variant"], rasa["variant"]) == ("frozen", "rasa")
    assert frozen["tokens"] == rasa["tokens"] > 0  # the same data, counted as the trainer counts it
    assert frozen["vs_frozen"] == 1.0 and rasa["vs_frozen"] == pytest.approx(
        rasa["tokens_per_s"] / frozen["tokens_per_s"])
    assert frozen["step_tokens"] == rasa["step_tokens"] and len(rasa["step_ms"]) == 2
    assert rasa["median_step_ms"] == pytest.approx(sum(rasa["step_ms"]) / 2)  # the median of two steps
    assert rasa["vs_frozen_median"] == pytest.approx(frozen["median_step_ms"] / rasa["median_step_ms"])
    assert "/ frozen" in capsys.readouterr().out
