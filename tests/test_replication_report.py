"""benchmarks/replication_report.py: the update-size rule and the matched RaSA/LoRA pairs (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_step_size import measured_first_step_ratios

report = pytest.importorskip("benchmarks.replication_report")
REPO = Path(__file__).resolve().parents[1]


def test_the_rule_agrees_with_the_measured_update_size():
    for name, (alpha, ratios) in measured_first_step_ratios().items():
        predicted = report.update_size("rasa", 8, alpha, 1)
        assert min(ratios) - 0.01 <= predicted <= max(ratios) + 0.01, (name, predicted, ratios)
    assert report.update_size("lora", 8, 8.0) == pytest.approx(1.0)
    assert report.update_size("rasa", 8, 16.0, 1) == pytest.approx(report.update_size("lora", 8, 9.5), rel=2e-3)
    # the ratio does not depend on r for LoRA alpha 8, and RaSA at r=32, k=4 is again well below LoRA
    assert report.update_size("lora", 32, 8.0) == pytest.approx(1.0)
    assert report.update_size("rasa", 32, 8.0) == pytest.approx(0.5 * (32 * (1 / 28 + 1 / 120)) ** 0.5)


def _run(root: Path, name: str, method: str, alpha: float, seed_losses: list[float], train_loss: float) -> None:
    """A finished run: config, summary, and metrics with 10 steps an epoch and a held-out loss per epoch."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method, "r": 8, "alpha": alpha, "rasa_k": None,
                                                    "learning_rate": 5e-4}))
    (folder / "summary.json").write_text(json.dumps({"trainable_params": 10, "rasa_k": 1 if method == "rasa" else None,
                                                     "tokens": 100, "train_time_s": 1.0}))
    rows = [{"step": step, "epoch": step / 10, "loss": train_loss} for step in range(1, 21)]
    rows += [{"step": 10 * epoch, "eval_loss": loss} for epoch, loss in enumerate(seed_losses, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_matched_pairs_get_their_own_rows(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    for seed, (rasa16, lora95) in enumerate([(0.90, 0.91), (0.92, 0.93), (0.94, 0.95)]):
        _run(root, f"rasa-r8-a16-s{seed}", "rasa", 16.0, [1.0, rasa16], 0.8)
        _run(root, f"lora-r8-a9.5-s{seed}", "lora", 9.5, [1.0, lora95], 0.8 + seed / 100)
        _run(root, f"lora-r8-s{seed}", "lora", 8.0, [1.0, 0.99], 0.8)
        _run(root, f"rasa-r8-s{seed}", "rasa", 8.0, [1.0, 0.97], 0.8)
    assert report.main(["--root", str(root), "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [(p["rasa"], p["lora"]) for p in study["matched_pairs"]] == [("rasa-r8-a16", "lora-r8-a9.5")]
    tables = (out / "tables.md").read_text()
    section = tables.split("at the same update size")[1]
    held_out = next(line for line in section.splitlines() if "held-out loss, epoch 2" in line)
    cells = [cell.strip() for cell in held_out.split("|")]
    assert cells[1].startswith("rasa-r8-a16 (alpha 16, size 1.187) vs lora-r8-a9.5 (alpha 9.5, size 1.188)")
    assert cells[3:6] == ["0.9200 ± 0.0200 (n=3)", "0.9300 ± 0.0200 (n=3)", "-0.0100"]
    assert cells[6] == "no (ranges overlap)"
    assert cells[7] == "s0: -0.0100, s1: -0.0100, s2: -0.0100 (all < 0)"
    # the same-alpha comparison stays as it was
    assert "| rasa-r8 vs lora-r8 | held-out loss, epoch 2 | 0.9700 ± 0.0000 (n=3) | 0.9900 ± 0.0000 (n=3)" in tables


def test_gsm8k_and_forgetting_are_paired_by_seed_in_points(tmp_path):
    """Each seed's GSM8K and forgetting difference (percentage points), as for the losses."""
    root, out = tmp_path / "runs", tmp_path / "out"
    for seed, (rasa_acc, lora_acc) in enumerate([(0.030, 0.020), (0.020, 0.025), (0.025, 0.025)]):
        for name, method, accuracy in ((f"rasa-r8-s{seed}", "rasa", rasa_acc), (f"lora-r8-s{seed}", "lora", lora_acc)):
            _run(root, name, method, 8.0, [1.0, 0.9], 0.8)
            for epoch in (1, 2):
                folder = root / name / "eval" / f"epoch-{epoch}"
                (folder / "gsm8k").mkdir(parents=True)
                (folder / "gsm8k" / "summary.json").write_text(json.dumps({"accuracy": accuracy}))
                for task, metric in report.FORGETTING.items():
                    (folder / task).mkdir()
                    (folder / task / "summary.json").write_text(json.dumps({metric: 0.5 + accuracy}))
    assert report.main(["--root", str(root), "--out", str(out)]) == 0
    rows = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")]
            for line in (out / "tables.md").read_text().splitlines() if line.startswith("| rasa-r8 vs lora-r8 |")}
    assert rows["GSM8K %, epoch 2"][7] == "s0: +1.00, s1: -0.50, s2: +0.00"
    assert rows["forgetting mean %, epoch 2"][7] == "s0: +1.00, s1: -0.50, s2: +0.00"


def test_the_analysis_of_real_deltas_gets_a_table(tmp_path):
    """Figs. 2-3: each `rasa-lora analyze` output under a full fine-tune's run becomes a table in tables.md."""
    root, out = tmp_path / "runs", tmp_path / "out"
    _run(root, "lora-r8-s0", "lora", 8.0, [1.0, 0.9], 0.8)
    folder = root / "fft-s0" / "analysis"
    folder.mkdir(parents=True)
    curve = [0.52 - 0.001 * i for i in range(21)]  # 0.52 at the start, 0.50 after 20 iterations
    group = {"shape": [576, 1536], "lora_relative_error": 0.5, "rasa_relative_error_curve": curve,
             "rasa_relative_error": curve[-1], "iterations": 20, "first_iteration_below_lora": 20,
             "k_sweep_relative": {"0": 0.5, "1": 0.499}, "best_k": 1}
    (folder / "analysis.json").write_text(json.dumps({"config": {"r": 8, "k": 1, "init": "random", "iters": 20,
                                                                 "tol": 0.0},
                                                      "groups": {"model.layers.*.mlp.down_proj": group}}))
    assert report.main(["--root", str(root), "--out", str(out)]) == 0
    tables = (out / "tables.md").read_text()
    assert "## Reconstruction of the real deltas (Figs. 2-3): `fft-s0/analysis/analysis.json`" in tables
    assert ("| mlp.down_proj | 576 x 1536 | 0.5000 | 1.0200 | 1.0000 | 20 | 20 | 0: 1.0000, 1: 0.9980 | 1 |"
            in tables)
