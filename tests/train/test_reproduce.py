"""`rasa-lora reproduce`: a recipe trained, then evaluated, in one resumable command, beside the paper's figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rasa_lora import reproduce
from rasa_lora.train.config import build_config, read_yaml
from tests.train.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO.parent / "shared" / "paper" / "000_5ed23578a0b2cea5.txt"
MODELS = {"llama": "meta-llama/Llama-3.1-8B", "mistral": "mistralai/Mistral-7B-v0.3"}


def _args(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def test_trains_then_evaluates_and_a_rerun_redoes_nothing(tiny_model_dir, tmp_path, shared_data, monkeypatch):
    out = tmp_path / "run"
    argv = [*_args(tiny_overrides(tiny_model_dir, out, max_steps=1)), "--eval-tasks", "gsm8k,arc_challenge",
            "--eval-limit", "2", "--eval-data", str(shared_data), "--max-new-tokens", "4"]
    assert reproduce.main(argv) == 0
    content = json.loads((out / "reproduce.json").read_text())
    assert [(row["task"], row["metric"]) for row in content["results"]] == [("gsm8k", "accuracy"),
                                                                            ("arc_challenge", "acc_norm")]
    assert all(0 <= row["last"] <= 100 and row["items"] == 2 and row["paper_last"] is None and "best" not in row
               for row in content["results"])
    assert "not comparable with the paper" in (out / "reproduce.md").read_text()
    for task in ("gsm8k", "arc_challenge"):
        assert len((out / "eval" / task / "records.jsonl").read_text().splitlines()) == 2
    # the same command again: training is finished and every item scored, so neither runs again
    monkeypatch.setattr("rasa_lora.train.cli.run", lambda config: pytest.fail("trained again"))
    monkeypatch.setattr("rasa_lora.evaluation.cli.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("loaded a model to score items already scored"))
    assert reproduce.main(argv) == 0
    assert json.loads((out / "reproduce.json").read_text()) == content


def test_an_interrupted_training_is_resumed(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    seen = []
    monkeypatch.setattr("rasa_lora.train.checkpoint.checkpoint_dirs", lambda path: [out / "checkpoint-1"])
    monkeypatch.setattr("rasa_lora.train.cli.run", lambda config: seen.append(config) or 1)
    argv = [*_args(tiny_overrides(tiny_model_dir, out)), "--eval-tasks", "gsm8k"]
    assert reproduce.main(argv) == 1  # the training's exit code, and no evaluation after a failed training
    # the trainer is called with the recipe itself (resuming), not with a command line rebuilt and parsed again
    assert len(seen) == 1 and seen[0].resume and seen[0].output_dir == str(out) and seen[0].max_steps == 2


def test_the_domain_picks_the_benchmarks_and_an_unknown_one_says_how_to_choose(tmp_path, capsys):
    math = build_config(read_yaml(REPO / "configs/paper/llama3.1-8b-math-rasa-r8.yaml"))
    code = build_config(read_yaml(REPO / "configs/paper/mistral-7b-code-lora-r16.yaml"))
    assert reproduce.eval_tasks(math, None) == ["math", "arc_challenge", "hellaswag", "winogrande"]
    assert reproduce.eval_tasks(code, None) == ["humaneval+", "arc_challenge", "hellaswag", "winogrande"]
    assert reproduce.main(["--output-dir", str(tmp_path / "x")]) == 2
    assert "--eval-tasks" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="mbpp"):
        reproduce.eval_tasks(math, "math,mbpp")
    recipe = str(REPO / "configs/paper/llama3.1-8b-math-rasa-r8.yaml")
    for bad in (["--eval-limit", "0"], ["--n-samples", "x"], ["--eval-data", str(tmp_path / "none")]):
        assert reproduce.main([recipe, "--output-dir", str(tmp_path / "y"), *bad]) == 2
        assert bad[0] in capsys.readouterr().err and not (tmp_path / "y").exists()


def _paper_tables() -> dict[tuple[str, str, str, int], dict[str, float]]:
    """The (BEST, LAST) columns of the paper's Tables 1 (code) and 2 (math), read from its text."""
    lines = re.sub(r"</?(i|b)>", "", PAPER.read_text()).splitlines()  # italic / bold marks of best results
    start1 = next(i for i, line in enumerate(lines) if line.startswith("Table 1:"))
    start2 = next(i for i, line in enumerate(lines) if line.startswith("Table 2:"))
    figures: dict = {}
    for line in lines[start1:start2]:
        cells = line.split("\t")
        if not cells[0].isdigit() or len(cells) < 10:
            continue
        r, methods = int(cells[0]), cells[1].split()
        columns = [cell.split() for cell in cells[3:]]  # time, P@1 best, P@1 last, P@10 best, P@10 last, twice
        for m, method in enumerate(methods):
            for model, first in (("llama", 0), ("mistral", 5)):
                best_last = [(float(columns[first + k][m]), float(columns[first + k + 1][m])) for k in (1, 3)]
                figures[(model, "code", method.lower(), r)] = {"pass@1": best_last[0], "pass@10": best_last[1]}
    runs = 0  # after VeRA's row (r = 1024), six methods at r = 8, then 16, then 32; the r labels sit mid-group
    for line in lines[start2:start2 + 40]:
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) < 8 or not any(cell.endswith("h") for cell in cells):
            continue
        if cells[1] == "VeRA":
            r = 1024
        else:
            r, runs = (8, 16, 32)[runs // 6], runs + 1
        values = [cell for cell in cells[2:] if cell and cell != "_" and not cell.endswith(("M", "h"))]
        for model, index in (("llama", 0), ("mistral", 2)):  # BEST, LAST, BEST, LAST
            figures[(model, "math", cells[1].lower(), r)] = {"accuracy": (float(values[index]),
                                                                          float(values[index + 1]))}
    return figures


@pytest.mark.skipif(not PAPER.is_file(), reason="needs the paper's text in ../shared/paper")
def test_the_papers_figures_are_its_tables_and_cover_every_paper_recipe():
    tables = _paper_tables()
    assert len(tables) >= 2 * 7 + 2 * 13  # code: VeRA and 3 x (LoRA, MoRA, RaSA); math: 13 runs a model
    for key, figures in reproduce.PAPER.items():
        assert tables[key] == figures, key
    for path in sorted((REPO / "configs" / "paper").glob("*.yaml")):
        config = build_config(read_yaml(path))
        if path.stem in FIGURE_6_CHART_ONLY:  # its bar is in the chart only, not in the text
            assert reproduce.paper_figures(config) == {}, path.name
            continue
        assert reproduce.paper_figures(config), f"{path.name} has no paper figures"


FIGURE_6_CHART_ONLY = {"llama3.1-70b-math-rasa-r4", "mixtral-8x7b-math-rasa-r4"}


@pytest.mark.skipif(not PAPER.is_file(), reason="needs the paper's text in ../shared/paper")
def test_figure_6_figures_are_the_ones_its_text_gives():
    text = PAPER.read_text()
    assert "larger Llama and Mistral models using LoRA, achieving MATH accuracies of 40.4% and 32.6%" in text
    assert [figures["accuracy"] for figures in reproduce.FIGURE_6.values()] == [(None, 40.4), (None, 32.6)]
    recipe = build_config(read_yaml(REPO / "configs/paper/mixtral-8x7b-math-lora-r4.yaml"))
    assert reproduce.paper_figures(recipe) == {"accuracy": (None, 32.6)}


def test_every_epoch_scores_each_epochs_adapter_and_plots_them(tiny_model_dir, tmp_path, shared_data):
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, num_examples=8, epochs=2)  # 2 steps an epoch, 4 in all
    del values["max_steps"]
    argv = [*_args(values), "--every-epoch", "--eval-tasks", "gsm8k,arc_challenge,winogrande", "--eval-limit", "2",
            "--eval-data", str(shared_data), "--max-new-tokens", "4"]
    assert reproduce.main(argv) == 0
    assert [path.name for path in sorted((out / "epochs").iterdir())] == ["epoch-1", "epoch-2"]
    assert (out / "eval" / "epoch-1" / "gsm8k" / "records.jsonl").is_file()
    assert not (out / "eval" / "epoch-2").exists()  # the last epoch's adapter is the final one, scored once
    content = json.loads((out / "reproduce.json").read_text())
    for row in content["results"]:
        assert sorted(row["per_epoch"]) == ["1", "2"]  # JSON keys
        assert row["best"] == max(row["per_epoch"].values()) and row["per_epoch"]["2"] == row["last"]
    assert "best epoch" in (out / "reproduce.md").read_text()
    assert (out / "epochs.png").stat().st_size > 10_000


def test_every_epoch_on_a_run_trained_without_them_says_so(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    argv = [*_args(tiny_overrides(tiny_model_dir, out)), "--every-epoch", "--eval-tasks", "gsm8k"]
    assert reproduce.main(argv) == 2
    assert "save_epoch_adapters" in capsys.readouterr().err


def test_a_full_fine_tune_is_evaluated_as_a_model(tiny_model_dir, tmp_path, shared_data):
    out = tmp_path / "fft"
    argv = [*_args(tiny_overrides(tiny_model_dir, out, max_steps=1, method="fft")), "--eval-tasks", "arc_challenge",
            "--eval-limit", "2", "--eval-data", str(shared_data)]
    assert reproduce.main(argv) == 0
    summary = json.loads((out / "eval" / "arc_challenge" / "summary.json").read_text())
    assert summary["model"] == str(out) and summary["adapter"] is None


def test_compare_puts_runs_beside_the_papers_figures(tmp_path, capsys):
    runs = {"rasa-r8": {"method": "rasa", "r": 8, "base_model": "meta-llama/Llama-3.1-8B", "dataset": "m",
                        "results": [{"task": "math", "metric": "accuracy", "last": 28.0, "paper_last": 29.1,
                                     "best": 30.0, "paper_best": 30.3, "items": 5000, "limit": None},
                                    {"task": "winogrande", "metric": "acc", "last": 70.2, "paper_last": None,
                                     "items": 1267, "limit": None}]},
            "lora-r8": {"method": "lora", "r": 8, "base_model": None, "dataset": None,
                        "results": [{"task": "gsm8k", "metric": "accuracy", "last": 12.5, "paper_last": None,
                                     "items": 3, "limit": 3}]}}
    for name, content in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "reproduce.json").write_text(json.dumps(content))
    out = tmp_path / "table.md"
    assert reproduce.compare_main([str(tmp_path / "rasa-r8"), str(tmp_path / "lora-r8"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| rasa-r8 | rasa | 8 | math | accuracy | 28.0 | 29.1 | 30.0 | 30.3 |" in text
    assert "| lora-r8 | lora | 8 | gsm8k | accuracy | 12.5 | - | - | - |" in text and "not comparable" in text
    assert out.with_suffix(".png").stat().st_size > 5_000
    assert reproduce.compare_main([str(tmp_path / "nothing-here")]) == 2
    assert "rasa-lora reproduce" in capsys.readouterr().err
