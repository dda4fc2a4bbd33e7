"""`benchmarks/qrasa.py`: its CPU smoke run (tiny shapes) measures every variant and writes the JSON it prints."""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmark_scripts import load_benchmark

pytest.importorskip("bitsandbytes", reason="the QRaSA benchmark needs bitsandbytes (the quant extra)")


def test_small_run_measures_every_variant_and_the_big_step(tmp_path, capsys):
    qrasa = load_benchmark("qrasa")
    out = tmp_path / "q.json"
    assert qrasa.main(["--small", "--out", str(out), "--tokens", "32", "--steps", "2", "--warmup", "1",
                       "--big-steps", "1", "--big-layers", "2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["rasa-bf16", "qrasa", "qrasa-fused", "qlora", "qrasa-70b"]
    assert all(row["steps"] == (1 if row["variant"] == "qrasa-70b" else 2) for row in rows)
    assert rows[-1]["layers"] == 2 and rows[-1]["fits"]
    table = capsys.readouterr().out.splitlines()
    assert table[-6].split()[:2] == ["variant", "shape"] and table[-1].startswith("qrasa-70b")


def test_the_4bit_model_is_built_quantized_layer_by_layer():
    from rasa_lora import quant

    qrasa = load_benchmark("qrasa")
    model = qrasa.build_model("small", torch.device("cpu"), torch.float32, layers=2, nf4=True)
    assert not any(p.device.type == "meta" for p in model.parameters())
    linears = [m for m in model.model.layers.modules() if quant.is_4bit(m)]
    assert len(linears) == 2 * 7 and not quant.is_4bit(model.lm_head) and model.is_loaded_in_4bit


def test_fewer_than_seven_timed_steps_are_refused_outside_the_smoke_run(tmp_path):
    qrasa = load_benchmark("qrasa")
    with pytest.raises(SystemExit):
        qrasa.main(["--out", str(tmp_path / "q.json"), "--steps", "5"])
