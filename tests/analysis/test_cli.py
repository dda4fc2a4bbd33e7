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
    assert report["files"] == ["analysis.json", "convergence.png", "k_sweep.png"]
    # issue 29: the start, the criterion's outcome and every start's result, per group and per sweep point
    assert group["rasa_start"] in ("stacked", "theorem", "random") and group["iterations"] == 3
    assert group["converged"] is False and group["tol"] == 1e-5 and group["window"] == 5
    assert [s["init"] for s in group["starts"]] == ["stacked", "theorem", "random"]
    assert group["rasa_final_error"] == min(s["final_error"] for s in group["starts"])
    assert set(group["k_sweep_fits"]) == {"1", "2"}
    assert group["k_sweep_fits"]["2"]["iterations"] == 3


def test_analyze_refuses_k_above_r(tmp_path, capsys):
    code = analyze_main(["--synthetic", "tiny", "--r", "4", "--k", "5", "--out", str(tmp_path)])
    assert code == 2
    assert "k=5" in capsys.readouterr().err


def test_analyze_refuses_a_sweep_outside_zero_to_r(tmp_path, capsys):
    code = analyze_main(["--synthetic", "tiny", "--r", "4", "--k-sweep", "0-6", "--out", str(tmp_path)])
    assert code == 2
    assert "outside" in capsys.readouterr().err


def test_analyze_without_sweep_says_only_what_it_wrote(tmp_path, capsys):
    """Issue 19: `--k-sweep none` printed that it wrote k_sweep.png, which it did not."""
    code = analyze_main(["--synthetic", "tiny", "--num-layers", "4", "--iters", "2", "--k-sweep", "none",
                         "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert "analysis.json" in printed and "convergence.png" in printed and "k_sweep" not in printed
    assert not (tmp_path / "k_sweep.png").exists()


def _config(tmp_path, *options: str) -> dict:
    code = analyze_main(["--synthetic", "tiny", "--num-layers", "3", "--iters", "2", "--k-sweep", "none",
                         "--out", str(tmp_path), *options])
    assert code == 0
    return json.loads((tmp_path / "analysis.json").read_text())["config"]


def test_analyze_takes_rasa_k_and_still_the_deprecated_k(tmp_path, capsys):
    """Issue 28: --rasa-k as in `train` and `compress`; --k still works, with a note."""
    assert _config(tmp_path / "a", "--rasa-k", "2")["k"] == 2
    assert "deprecated" not in capsys.readouterr().err
    assert _config(tmp_path / "b", "--k", "2")["k"] == 2
    assert "--k is deprecated, use --rasa-k" in capsys.readouterr().err
    assert _config(tmp_path / "c")["k"] == 1


def test_analyze_refuses_disagreeing_k_spellings(tmp_path, capsys):
    code = analyze_main(["--synthetic", "tiny", "--k", "1", "--rasa-k", "2", "--out", str(tmp_path)])
    assert code == 2
    assert "disagree" in capsys.readouterr().err


def test_analyze_passes_the_criterion_and_restarts(tmp_path):
    config = _config(tmp_path, "--tol", "0.01", "--restarts", "3", "--init", "theorem")
    assert config["tol"] == 0.01 and config["restarts"] == 3 and config["init"] == "theorem"
    group = json.loads((tmp_path / "analysis.json").read_text())["groups"]["layers.*.attn"]
    assert [(s["init"], s["seed"]) for s in group["starts"]] == [("theorem", 0), ("random", 1), ("random", 2)]
    assert group["start_spread"] >= 0


def test_analyze_refuses_bad_restarts_and_tolerance(tmp_path, capsys):
    assert analyze_main(["--synthetic", "tiny", "--restarts", "0", "--out", str(tmp_path)]) == 2
    assert "restarts=0" in capsys.readouterr().err
    assert analyze_main(["--synthetic", "tiny", "--tol", "-1", "--out", str(tmp_path)]) == 2
    assert "tol=-1" in capsys.readouterr().err


def test_analyze_of_checkpoints_has_a_progress_bar_with_a_total(pair, tmp_path, capsys):
    """Issue 28: the bar had no total for checkpoint sources (a generator of groups); now it counts iterations
    against the limit (7 groups x 3 starts x 2 iterations) and ends full."""
    base, tuned = pair
    code = analyze_main([str(base), str(tuned), "--iters", "2", "--k-sweep", "none", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "42/42 [" in err
