"""The agreement scripts of benchmarks/ (ours vs lm-eval, math-verify, evalplus) on small inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("task", ["arc_challenge", "winogrande", "hellaswag"])
def test_multiple_choice_requests_equal_lm_evals_own(task, shared_data):
    """lm-eval's task YAML, fed our local rows, builds the same (context, continuation) pairs, token split and
    choice texts as our loaders, on the first 100 items (no model needed)."""
    pytest.importorskip("lm_eval", reason="lm-eval is a bench extra: pip install 'rasa-lora[bench]'")
    from lm_eval.api.model import TemplateLM

    from rasa_lora.evaluation.multiple_choice import encode_pair
    from rasa_lora.evaluation.tasks import load_task
    from rasa_lora.models import load_tokenizer

    mc = load_benchmark("mc_agreement")
    items = load_task(task, shared_data, 100)
    lm_task = mc.lm_eval_task(task, mc.hub_docs(task, shared_data, 100))
    docs = list(lm_task.eval_docs)
    assert len(docs) == len(items) == 100
    tokenizer = load_tokenizer(None)

    class Split(TemplateLM):  # lm-eval's own _encode_pair, on our tokenizer
        tokenizer_name = "t"
        loglikelihood_rolling = generate_until = _loglikelihood_tokens = None

        def tok_encode(self, string, **kwargs):
            return tokenizer(string, add_special_tokens=True)["input_ids"]

        @property
        def eot_token_id(self):
            return tokenizer.eos_token_id

    split = Split.__new__(Split)
    split.backend = "causal"
    for item, doc in zip(items, docs):
        context = lm_task.fewshot_context(doc, num_fewshot=0, gen_prefix=lm_task.doc_to_prefix(doc))
        requests = lm_task.construct_requests(doc=doc, ctx=context, metadata=(task, 0, 1))
        pairs = [tuple(r.args) for r in requests]
        assert pairs == list(zip(item["contexts"], item["continuations"])), item["id"]
        assert [encode_pair(tokenizer, *p) for p in pairs] == [tuple(map(list, split._encode_pair(*p))) for p in pairs]
        if task != "winogrande":  # winogrande: lm-eval reports acc only
            assert lm_task.doc_to_choice(doc) == item["choice_texts"]
        gold = lm_task.doc_to_text(doc) if task == "winogrande" else lm_task.doc_to_target(doc)
        assert gold == item["gold"]


ANTLR411 = os.environ.get("RASA_LORA_ANTLR411")


@pytest.mark.skipif(not ANTLR411, reason="set RASA_LORA_ANTLR411 to a `pip install --target DIR "
                    "antlr4-python3-runtime==4.11.0` folder (lm-eval's minerva_math needs it)")
@pytest.mark.parametrize("task", ["math500", "gsm8k"])
def test_math_agreement_script_on_handmade_generations(task, tmp_path, shared_data):
    pytest.importorskip("lm_eval", reason="lm-eval is a bench extra")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ANTLR411, str(REPO / "src")]))
    out = tmp_path / "agreement.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "math_agreement.py"), "--task", task,
                           "--generations", str(DATA / f"{task}_generations_handmade.jsonl"), "--data-dir",
                           str(shared_data), "--out", str(out), "--markdown", str(tmp_path / "a.md")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    table = {(t["ours"], t["reference"]): t for t in report["agreement"]}
    assert report["minerva_parser"] == "sympy" and report["extracted"] == report["items"]
    assert table[("ours minerva", "lm-eval minerva is_equiv")]["differ"] == []
    assert table[("ours math-verify", "math-verify direct, extracted answer")]["differ"] == []
    expected = {"math500": [4, 4], "gsm8k": [2, 2]}[task]  # one wrong answer in math500, one in gsm8k (30,000)
    assert table[("ours minerva", "lm-eval minerva is_equiv")]["accepted"] == expected


def test_code_agreement_script_on_handmade_completions(tmp_path, shared_data, capsys):
    pytest.importorskip("evalplus", reason="evalplus is a bench extra (pip install --no-deps evalplus)")
    rows = [json.loads(line) for line in (DATA / "humanevalplus_completions_handmade.jsonl").read_text().splitlines()]
    subset = [r for r in rows if r["task_id"] in ("HumanEval/0", "HumanEval/4")]
    completions = tmp_path / "samples.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in subset))
    out = tmp_path / "code.json"
    assert load_benchmark("code_agreement").main(["--completions", str(completions), "--data-dir", str(shared_data),
                                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    n = len(subset)
    assert report["samples"] == n == 7 and report["agree_base"] == n and report["agree_plus"] == n
    assert report["pass@1_base"] == [3 / 7, 3 / 7] and report["pass@1_plus"] == [2 / 7, 2 / 7]


def test_code_agreement_reads_evalplus_evaluate_results_sample_for_sample(tmp_path):
    """evalplus.evaluate's results file lists a task's samples in file order (completion_id): the k-th line of a
    task is compared with its k-th result, and a plus failure after a base pass counts for plus only."""
    status = [("pass", "pass"), ("pass", "fail"), ("fail", "fail")]
    results = {"eval": {"T/0": [{"base_status": b, "plus_status": p} for b, p in status[:2]],
                        "T/1": [{"base_status": b, "plus_status": p} for b, p in status[2:]]}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    rows = [{"task_id": "T/0", "ours_base": True, "ours_plus": True}, {"task_id": "T/1", "ours_base": True,
             "ours_plus": False}, {"task_id": "T/0", "ours_base": True, "ours_plus": True}]
    report = load_benchmark("code_agreement").compare_evaluate(rows, tmp_path / "r.json")
    assert report["agree_base"] == 2 and report["agree_plus"] == 2 and report["differ"] == ["T/1", "T/0"]
    assert report["pass@1_base"] == 2 / 3 and report["pass@1_plus"] == 1 / 3


def test_generate_for_eval_offset_and_limit_pick_the_items_in_order(tmp_path, shared_data, monkeypatch):
    """`--offset 3 --limit 2` generates for items 3 and 4 (to generate in chunks), with their own ids, the paper
    prompt and the math stop; generation itself is replaced by an echo of the question's first words."""
    import torch

    import rasa_lora.evaluation.cli as cli
    import rasa_lora.evaluation.generation as generation
    from rasa_lora.evaluation.tasks import load_task

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": text.split()}

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new, temperature, n, batch_size, stop=(), progress=None):
        seen.update(max_new=max_new, n=n, stop=list(stop))
        progress(len(prompts))
        return [[p.split("### Instruction:\n")[1][:20]] for p in prompts]

    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda *a: (torch.nn.Linear(1, 1), Tokenizer()))
    monkeypatch.setattr(generation, "generate_transformers", fake_generate)
    out = tmp_path / "g.jsonl"
    data = shared_data / "gsm8k" / "test.jsonl"
    assert load_benchmark("generate_for_eval").main(["--task", "gsm8k", "--data-file", str(data), "--offset", "3",
                                                     "--limit", "2", "--max-new-tokens", "7", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    items = load_task("gsm8k", shared_data)[3:5]
    assert [r["id"] for r in rows] == [i["id"] for i in items] == ["gsm8k/3", "gsm8k/4"]
    assert [r["generation"] for r in rows] == [i["question"][:20] for i in items]
    assert seen == {"max_new": 7, "n": 1, "stop": ["### Instruction"]}
    assert json.loads(out.with_suffix(".summary.json").read_text())["items"] == 2


def test_lm_eval_gsm8k_scorer_is_built_from_its_yaml():
    """lm-eval's own gsm8k scoring: strict-match needs `#### N`; flexible-extract takes the last number, so it also
    accepts the real SmolLM2 output cut off inside "The answer is 720" (gsm8k/106, gold 72), as our extraction does."""
    pytest.importorskip("lm_eval", reason="lm-eval is a bench extra: pip install 'rasa-lora[bench]'")
    score = load_benchmark("math_agreement").lm_eval_gsm8k_scorer()
    solution = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"
    assert score("so $1,018.\n#### 1,018", solution) == {"strict-match": True, "flexible-extract": True}
    assert score("The answer is: $1,018.", solution) == {"strict-match": False, "flexible-extract": True}
    assert score("The answer is 1018. Then 3 more.", solution) == {"strict-match": False, "flexible-extract": False}
    cut = "The answer is 720.\n\n### Response:\nThe answer is 72"
    assert score(cut, "... = <<6*12=72>>72\n#### 72") == {"strict-match": False, "flexible-extract": True}
