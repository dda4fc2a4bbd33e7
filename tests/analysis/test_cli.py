"""`rasa-lora analyze` writes analysis.json and the two figures; bad input exits with a clear message."""

from __future__ import annotations

import json

from rasa_lora.analysis.cli import analyze_main


def test_analyze_synthetic_writes_json_and_figures(tmp_path):
    code = analyze_main(["--synthetic", "tiny", "--num-layers", "4", "--iters", "3", "--k-sweep", "0-2",
                         "--dtype", "float64", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "analysis.json").read_text())
    group = report["groups"]["layers.*.attn"]
    assert group["shape"] == [48, 40] and group["num_layers"] == 4
    assert len(group["rasa_error_curve"]) == 3
    assert set(group["k_sweep"]) == {"0", "1", "2"}
    assert group["k_sweep"]["0"] == group["lora_error"]
    assert group["wall_time_s"] > 0
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert (tmp_path / "k_sweep.png").stat().st_size > 1000


def test_analyze_refuses_k_above_r(tmp_path, capsys):
    code = analyze_main(["--synthetic", "tiny", "--r", "4", "--k", "5", "--out", str(tmp_path)])
    assert code == 2
    assert "k=5" in capsys.readouterr().err


def test_analyze_refuses_a_sweep_outside_zero_to_r(tmp_path, capsys):
    code = analyze_main(["--synthetic", "tiny", "--r", "4", "--k-sweep", "0-6", "--out", str(tmp_path)])
    assert code == 2
    assert "outside" in capsys.readouterr().err
