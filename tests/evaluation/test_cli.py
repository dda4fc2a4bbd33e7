"""`rasa-lora eval`: gold runs, summary.json, resume, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from rasa_lora.evaluation.cli import main
from rasa_lora.evaluation.tasks import load_task


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    assert main(["mmlu", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Unknown task 'mmlu'" in err and "humaneval+" in err


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    assert main(["math500", "--gold", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "MATH500_test.jsonl" in capsys.readouterr().err


def test_gold_is_refused_for_multiple_choice(tmp_path, shared_data, capsys):
    assert main(["winogrande", "--gold", "--data-dir", str(shared_data), "--output-dir", str(tmp_path)]) == 2
    assert "--gold applies to math and code" in capsys.readouterr().err


def test_math_gold_run_and_resume(tmp_path, shared_data):
    out = tmp_path / "math"
    assert main(["math500", "--gold", "--limit", "6", "--data-dir", str(shared_data), "--output-dir", str(out)]) == 0
    assert _summary(out)["accuracy"] == 1.0 and _summary(out)["items"] == 6
    first = (out / "records.jsonl").read_text().splitlines()
    assert main(["math500", "--gold", "--limit", "10", "--data-dir", str(shared_data), "--output-dir", str(out)]) == 0
    lines = (out / "records.jsonl").read_text().splitlines()
    assert lines[:6] == first and len(lines) == 10  # the first six were skipped, not redone
    assert (out / "disagreements.md").is_file()


def test_gsm8k_gold_scores_one(tmp_path, shared_data):
    assert main(["gsm8k", "--gold", "--limit", "8", "--data-dir", str(shared_data), "--output-dir", str(tmp_path)]) == 0
    assert _summary(tmp_path)["accuracy"] == 1.0 and _summary(tmp_path)["accuracy_minerva"] == 1.0


def test_humanevalplus_gold_summary(tmp_path, shared_data):
    assert main(["humaneval+", "--gold", "--limit", "3", "--data-dir", str(shared_data),
                 "--output-dir", str(tmp_path)]) == 0
    summary = _summary(tmp_path)
    assert summary["pass@1"] == 1.0 and summary["base_pass@1"] == 1.0 and summary["n_samples"] == 1
    assert summary["prompt_style"] == "paper"
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    tasks = load_task("humaneval+", shared_data, limit=3)
    assert samples == [{"task_id": t["id"], "solution": t["prompt"] + t["canonical_solution"]} for t in tasks]


@pytest.mark.slow
def test_humanevalplus_gold_all_164_from_the_command(tmp_path, shared_data):
    assert main(["humaneval+", "--gold", "--data-dir", str(shared_data), "--output-dir", str(tmp_path)]) == 0
    summary = _summary(tmp_path)
    assert summary["items"] == 164 and summary["pass@1"] == 1.0 and summary["base_pass@1"] == 1.0


def test_adapter_for_another_base_is_a_clear_error(tmp_path, shared_data, capsys):
    from peft import LoraConfig, get_peft_model

    from rasa_lora.models import tiny_llama

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama(hidden_size=32).save_pretrained(base_dir)
    other = get_peft_model(tiny_llama(hidden_size=48), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(adapter_dir)
    code = main(["arc_challenge", "--model", str(base_dir), "--adapter", str(adapter_dir), "--limit", "1",
                 "--data-dir", str(shared_data), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit base model" in err and "--model" in err


@pytest.mark.slow
def test_rasa_adapter_changes_the_scores(tmp_path, shared_data):
    import torch
    from peft import get_peft_model

    import rasa_lora
    from rasa_lora.models import load_model

    adapted = get_peft_model(load_model(None), rasa_lora.RasaConfig(r=4, rasa_k=1, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "rasa_B" in name or "shared_B" in name:  # B starts at zero; make the update non-zero
                parameter.normal_(std=0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    common = ["winogrande", "--limit", "2", "--data-dir", str(shared_data)]
    assert main([*common, "--output-dir", str(tmp_path / "base")]) == 0
    assert main([*common, "--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "rasa")]) == 0
    base, rasa = ([json.loads(line)["loglikelihoods"] for line in (tmp_path / d / "records.jsonl").open()]
                  for d in ("base", "rasa"))
    assert base != rasa and _summary(tmp_path / "rasa")["adapter"] == str(tmp_path / "adapter")


def test_math_completions_file_is_scored(tmp_path, shared_data):
    from rasa_lora.evaluation.tasks import load_task

    items = load_task("math500", shared_data, limit=3)
    lines = [{"id": items[0]["id"], "generation": "The answer is: 7"}] + [
        {"id": item["id"], "generation": item["solution"]} for item in items[1:]]
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["math500", "--limit", "3", "--completions", str(path), "--data-dir", str(shared_data)]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    assert _summary(tmp_path / "out")["accuracy"] == pytest.approx(2 / 3)


def test_code_completions_returning_none_score_zero(tmp_path, shared_data):
    from rasa_lora.evaluation.tasks import load_task

    tasks = load_task("humaneval+", shared_data, limit=2)
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"task_id": t["id"], "completion": "    return None\n"}) + "\n"
                            for t in tasks for _ in range(2)))
    args = ["humaneval+", "--limit", "2", "--completions", str(path), "--data-dir", str(shared_data)]
    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    summary = _summary(tmp_path / "out")
    assert summary["n_samples"] == 2 and summary["pass@1"] == 0.0 and summary["base_pass@1"] == 0.0


def test_uneven_completions_are_a_clear_error(tmp_path, shared_data, capsys):
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    assert main(["humaneval+", "--limit", "2", "--completions", str(path), "--data-dir", str(shared_data),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "same number" in capsys.readouterr().err


def test_humanevalpack_prompt_style_end_to_end(tmp_path, shared_data, monkeypatch):
    """--prompt-style humanevalpack: the model gets HumanEvalPack's instruction and its output is cut as the bigcode
    harness cuts it (a stand-in model answers with the canonical body, then chatter at top level)."""
    from rasa_lora.evaluation import cli

    tasks = {t["id"]: t for t in load_task("humaneval+", shared_data, limit=2)}
    prompts = []

    def fake_generator(args):
        def generate(batch, max_new_tokens, temperature, n, stop=None):
            prompts.extend(batch)
            answers = []
            for prompt in batch:
                task = next(t for t in tasks.values() if prompt.endswith(t["prompt"].strip()))
                answers.append(["\n" + task["canonical_solution"].rstrip() + "\n\nprint('done')\n"] * n)
            return answers
        return generate

    monkeypatch.setattr(cli, "_generator", fake_generator)
    assert main(["humaneval+", "--limit", "2", "--n-samples", "1", "--prompt-style", "humanevalpack",
                 "--data-dir", str(shared_data), "--output-dir", str(tmp_path)]) == 0
    assert all("to solve the following problem:" in p and "```" not in p for p in prompts) and len(prompts) == 2
    summary = _summary(tmp_path)
    assert summary["pass@1"] == 1.0 and summary["prompt_style"] == "humanevalpack"
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert all("print(" not in r["completion"] for r in records)
