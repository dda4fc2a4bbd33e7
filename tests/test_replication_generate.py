"""benchmarks/replication.py's evaluation stage: one process loads the base model once and evaluates a list of
adapters, with the same outputs as the per-adapter path it replaced (`rasa-lora eval` for the multiple-choice
tasks; a freshly loaded, merged model for GSM8K), and continues where a stopped process left off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

replication = pytest.importorskip("benchmarks.replication")

LIMITS = {"gsm8k": 4, "arc_challenge": 3, "winogrande": 3, "hellaswag": 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (so the real prompts tokenize), as a local model folder,
    and a LoRA and a RaSA adapter on it with random (non-zero) updates."""
    from peft import LoraConfig, get_peft_model

    import rasa_lora
    from rasa_lora.models import LLAMA_PROJECTIONS, load_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = load_tokenizer(None)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=40, num_layers=3)
    model.config.max_position_embeddings = 2048  # the prompts are longer than tiny_llama's 256
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    configs = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_PROJECTIONS),
               "rasa": rasa_lora.RasaConfig(r=4, rasa_k=1, rasa_alpha=8, target_modules=LLAMA_PROJECTIONS)}
    generator = torch.Generator().manual_seed(0)
    for name, config in configs.items():
        adapted = get_peft_model(tiny_llama(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=40,
                                            num_layers=3), config)
        with torch.no_grad():
            for param in adapted.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        adapted.save_pretrained(root / name)
    return root


def _old_path(base: str, adapter: str | None, data_dir, out, batch_size: int, max_new_tokens: int) -> None:
    """What the stage did before (one process per adapter, the model loaded for GSM8K and again for each
    multiple-choice task through `rasa-lora eval`), written into `out` for comparison."""
    from rasa_lora.cli import main as cli_main
    from rasa_lora.evaluation.cli import load_model_and_tokenizer
    from rasa_lora.evaluation.generation import generate_transformers
    from rasa_lora.evaluation.tasks import load_task, math_prompt

    items = load_task("gsm8k", data_dir, LIMITS["gsm8k"])
    model, tokenizer = load_model_and_tokenizer(base, adapter, "float32", "cpu")
    if adapter is not None:
        model = model.merge_and_unload()
    texts = generate_transformers(model, tokenizer, [math_prompt(item["question"]) for item in items],
                                  max_new_tokens, 0.0, 1, batch_size, stop=["### Instruction"])
    (out / "gsm8k").mkdir(parents=True)
    (out / "gsm8k" / "generations.jsonl").write_text("".join(
        json.dumps({"id": item["id"], "generation": text[0]}) + "\n" for item, text in zip(items, texts)))
    for task in replication.MC_TASKS:
        command = ["eval", task, "--data-dir", str(data_dir), "--output-dir", str(out / task), "--dtype", "float32",
                   "--batch-size", "64", "--device", "cpu", "--model", base, "--limit", str(LIMITS[task])]
        assert cli_main(command + (["--adapter", adapter] if adapter else [])) == 0


@pytest.mark.slow
def test_one_process_gives_what_the_per_adapter_path_gave(tiny_dir, shared_data, tmp_path, monkeypatch):
    import rasa_lora.evaluation.cli as evaluation_cli

    base = str(tiny_dir / "base")
    loads = []
    original = evaluation_cli.load_model_and_tokenizer
    monkeypatch.setattr(evaluation_cli, "load_model_and_tokenizer",
                        lambda *args, **kwargs: loads.append(args) or original(*args, **kwargs))
    work = [{"name": name, "adapter": None if name == "base" else str(tiny_dir / name), "model": None,
             "out": str(tmp_path / "new" / name)} for name in ("rasa", "base", "lora")]
    timings = replication.evaluate_work(base, work, shared_data, list(replication.TASKS), LIMITS, 8, 2)
    assert len(loads) == 1  # the base model, once for three entries
    monkeypatch.setattr(evaluation_cli, "load_model_and_tokenizer", original)
    assert [t["name"] for t in timings] == ["rasa", "base", "lora"]
    generations = {}
    for name in ("rasa", "base", "lora"):
        adapter = None if name == "base" else str(tiny_dir / name)
        _old_path(base, adapter, shared_data, tmp_path / "old" / name, batch_size=2, max_new_tokens=8)
        new, old = tmp_path / "new" / name, tmp_path / "old" / name
        generations[name] = (new / "gsm8k" / "generations.jsonl").read_text()
        assert generations[name] == (old / "gsm8k" / "generations.jsonl").read_text()
        for task in replication.MC_TASKS:
            new_records = [json.loads(line) for line in (new / task / "records.jsonl").read_text().splitlines()]
            old_records = [json.loads(line) for line in (old / task / "records.jsonl").read_text().splitlines()]
            assert new_records == old_records, (name, task)
            new_summary = json.loads((new / task / "summary.json").read_text())
            old_summary = json.loads((old / task / "summary.json").read_text())
            assert {k: new_summary[k] for k in ("acc", "acc_norm", "items", "adapter")} == \
                   {k: old_summary[k] for k in ("acc", "acc_norm", "items", "adapter")}
        timing = json.loads((new / "timing.json").read_text())
        assert set(timing["tasks"]) == set(replication.TASKS) and timing["tasks"]["gsm8k"]["generated_tokens"] > 0
    # the adapters changed the outputs (so the comparison above could tell them apart)
    assert len(set(generations.values())) == 3


def test_a_stopped_generation_continues_from_its_finished_batches(tiny_dir, shared_data, tmp_path, monkeypatch):
    from rasa_lora.evaluation import generation
    from rasa_lora.evaluation.cli import load_model_and_tokenizer
    from rasa_lora.evaluation.tasks import load_task

    model, tokenizer = load_model_and_tokenizer(str(tiny_dir / "base"), None, "float32", "cpu")
    items = load_task("gsm8k", shared_data, 5)
    replication.generate_gsm8k(model, tokenizer, items, tmp_path / "whole", 10, 2)
    calls, stop = [], [True]
    original = generation.generate_transformers

    class Stopped(Exception):
        pass

    def stopped_at_the_second_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2 and stop[0]:
            raise Stopped  # as a time limit's SIGTERM ends the process mid-batch
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_transformers", stopped_at_the_second_batch)
    with pytest.raises(Stopped):
        replication.generate_gsm8k(model, tokenizer, items, tmp_path / "stopped", 10, 2)
    partial = tmp_path / "stopped" / "gsm8k" / "generations.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2 and not (partial.parent / "generations.jsonl").exists()
    with partial.open("a") as handle:
        handle.write('{"id": "gsm8k/3", "gener')  # a torn line: redone
    calls.clear()
    stop[0] = False
    timing = replication.generate_gsm8k(model, tokenizer, items, tmp_path / "stopped", 10, 2)
    assert calls == [2, 1] and timing["batches"] == 2  # the first batch is not generated again
    assert (tmp_path / "stopped" / "gsm8k" / "generations.jsonl").read_text() == \
           (tmp_path / "whole" / "gsm8k" / "generations.jsonl").read_text()
    assert not partial.exists()
    # a dry run's generations, already scored, then the full set: the old verdicts go, the new are scored afresh
    (tmp_path / "stopped" / "gsm8k" / "summary.json").write_text('{"accuracy": 1.0}')
    replication.generate_gsm8k(model, tokenizer, items[:4] + load_task("gsm8k", shared_data, 6)[5:], tmp_path
                               / "stopped", 10, 2)
    assert not (tmp_path / "stopped" / "gsm8k" / "summary.json").exists()


def test_limits_tasks_and_runs(tmp_path):
    assert replication.parse_limits("32") == dict.fromkeys(replication.TASKS, 32)
    assert replication.parse_limits("gsm8k=100,hellaswag=50") == {"gsm8k": 100, "hellaswag": 50}
    assert replication.task_limit("hellaswag", {}) == 1000
    assert replication.task_limit("hellaswag", {"hellaswag": 5}) == 5
    assert replication.task_limit("gsm8k", {"hellaswag": 5}) is None
    with pytest.raises(ValueError, match="TASK=N"):
        replication.parse_limits("gsm8k=all")
    assert replication.parse_tasks("gsm8k") == ["gsm8k"]
    with pytest.raises(ValueError, match="choose from"):
        replication.parse_tasks("gsm8k,mmlu")
    for run, epochs in (("lora-r8-s0", (1, 2)), ("rasa-r8-s0", (1, 2))):
        for epoch in epochs:
            folder = tmp_path / run / "epochs" / f"epoch-{epoch}"
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text("{}")
    (tmp_path / "fft-s0").mkdir()
    (tmp_path / "fft-s0" / "summary.json").write_text("{}")
    (tmp_path / "fft-s0" / "config.json").write_text('{"epochs": 2}')
    names = [entry["name"] for entry in replication.work_list(tmp_path)]
    assert names == ["base", "fft-s0@2", "lora-r8-s0@1", "lora-r8-s0@2", "rasa-r8-s0@1", "rasa-r8-s0@2"]
    fft = replication.work_list(tmp_path, ["fft-s0"])
    assert fft == [{"name": "fft-s0@2", "adapter": None, "model": str(tmp_path / "fft-s0"),
                    "out": str(tmp_path / "fft-s0" / "eval" / "epoch-2")}]
    assert [e["name"] for e in replication.work_list(tmp_path, ["base", "rasa-r8-s0"])] == [
        "base", "rasa-r8-s0@1", "rasa-r8-s0@2"]


@pytest.mark.slow
def test_the_generate_stage_shares_adapters_among_processes_and_resumes(tiny_dir, shared_data, tmp_path, capsys):
    import shutil

    root = tmp_path / "runs"
    for run in ("lora-r8-s0", "rasa-r8-s0"):
        shutil.copytree(tiny_dir / run.split("-")[0], root / run / "epochs" / "epoch-1")
    command = ["generate", "--root", str(root), "--base-model", str(tiny_dir / "base"), "--data-dir", str(shared_data),
               "--jobs", "2", "--threads", "1", "--limit", "gsm8k=3,arc_challenge=2", "--tasks", "gsm8k,arc_challenge",
               "--max-new-tokens", "4", "--batch-size", "2", "--runs", "rasa-r8-s0,lora-r8-s0"]
    assert replication.main(command) == 0
    printed = capsys.readouterr().out
    assert "2 adapters to evaluate (0 done)" in printed and "failed: none" in printed
    for run in ("lora-r8-s0", "rasa-r8-s0"):
        out = root / run / "eval" / "epoch-1"
        assert len((out / "gsm8k" / "generations.jsonl").read_text().splitlines()) == 3
        assert json.loads((out / "arc_challenge" / "summary.json").read_text())["items"] == 2
        assert set(json.loads((out / "timing.json").read_text())["tasks"]) == {"gsm8k", "arc_challenge"}
        assert not (out / "winogrande").exists()
    assert not (root / "base").exists()  # not among --runs
    work = [json.loads((root / "logs" / f"generate-{i}.json").read_text()) for i in range(2)]
    assert sorted(entry["name"] for share in work for entry in share) == ["lora-r8-s0@1", "rasa-r8-s0@1"]
    assert replication.main(command) == 0
    assert "0 adapters to evaluate (2 done)" in capsys.readouterr().out


def test_decode_batch_experiment_runs_on_the_cpu(shared_data, tmp_path):
    from tests.benchmark_scripts import load_benchmark

    decode_batch = load_benchmark("experiments/decode_batch")
    out = tmp_path / "decode.json"
    assert decode_batch.main(["--narrow", "--batches", "1,3", "--new-tokens", "3", "--data-dir", str(shared_data),
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["batch"], row["stop_string"]) for row in rows] == [(1, True), (1, False), (3, True), (3, False)]
    assert rows[0]["prompt_width"] == rows[2]["prompt_width"]  # the longest prompt leads every batch
    assert all(row["ms_per_step"] > 0 for row in rows)


def test_an_adapter_that_fails_does_not_stop_the_others(tiny_dir, shared_data, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((tiny_dir / "lora" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))  # weights of r=4: do not fit
    (broken / "adapter_model.safetensors").write_bytes((tiny_dir / "lora" / "adapter_model.safetensors").read_bytes())
    work = [{"name": name, "adapter": str(path), "model": None, "out": str(tmp_path / name)}
            for name, path in (("broken", broken), ("lora", tiny_dir / "lora"))]
    records = replication.evaluate_work(str(tiny_dir / "base"), work, shared_data, ["gsm8k"], {"gsm8k": 2}, 4, 2)
    assert [record["name"] for record in records] == ["broken", "lora"]
    assert "error" in records[0] and "does not fit" in records[0]["error"]
    assert "error" not in records[1] and (tmp_path / "lora" / "gsm8k" / "generations.jsonl").is_file()
    assert "broken: failed" in capsys.readouterr().out


def test_pack_brings_back_the_evaluation_outputs_and_timings(tmp_path):
    import tarfile

    out = tmp_path / "replication" / "rasa-r8-s0" / "eval" / "epoch-1"
    for name in ("timing.json", "gsm8k/generations.jsonl", "gsm8k/generation.json", "arc_challenge/records.jsonl",
                 "arc_challenge/summary.json", "gsm8k/generations.partial.jsonl"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}\n")
    archive = tmp_path / "pack.tar.gz"
    assert replication.main(["pack", "--root", str(tmp_path / "replication"), "--out", str(archive)]) == 0
    with tarfile.open(archive) as packed:
        names = {Path(name).relative_to("replication/rasa-r8-s0/eval/epoch-1").as_posix() for name in packed.getnames()}
    # the partial file comes back too: it holds only the batches that finished (a time limit cut the rest)
    assert names == {"timing.json", "gsm8k/generations.jsonl", "gsm8k/generation.json", "arc_challenge/records.jsonl",
                     "arc_challenge/summary.json", "gsm8k/generations.partial.jsonl"}
