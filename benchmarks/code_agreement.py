"""Code: our HumanEval+ verdicts against evalplus's own, on the same completions.

Input: a JSONL of `{"task_id", "completion"}` (what `benchmarks/generate_for_eval.py` and `rasa-lora eval
--completions` use; several lines per task = several samples). Ours: `code.check_plus` in the sandbox. evalplus's:
its `check_correctness` (the function `evalplus.evaluate` maps over samples) with its own expected outputs
(`get_groundtruth`, computed here for the tasks present only and cached under a name of our own, so evalplus's
full-dataset cache is not touched), base-only = base inputs, plus = base and plus inputs, as evalplus reports
"base" and "base + extra". Same data file on both sides (EvalPlus's HumanEvalPlus release, through
`HUMANEVAL_OVERRIDE_PATH`). Prints the per-sample agreement and pass@1 on both sides; writes every sample's two
verdicts to --out. Needs evalplus (`pip install --no-deps evalplus` plus the few modules it imports, see
docs/evaluation.md).

    PYTHONPATH=src python benchmarks/code_agreement.py --completions samples.jsonl --out code_agreement.json

With `--evalplus-results X_eval_results.json` (what `HUMANEVAL_OVERRIDE_PATH=... python -m evalplus.evaluate
--dataset humaneval --samples samples.jsonl` writes beside the samples; it needs all 164 tasks) the verdicts of
evalplus's whole command line are compared too, sample for sample.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]  # see mc_agreement


def _load_completions(path: Path) -> list[tuple[str, str]]:
    with path.open() as f:
        return [(r["task_id"], r["completion"]) for r in map(json.loads, filter(str.strip, f))]


def evalplus_verdicts(problems: dict, samples: list[tuple[str, str]], data_file: Path) -> list[dict]:
    from evalplus.eval import PASS
    from evalplus.evaluate import check_correctness, get_groundtruth

    tasks = sorted({task_id for task_id, _ in samples})
    subset = {t: problems[t] for t in tasks}
    digest = hashlib.sha256(data_file.read_bytes() + ",".join(tasks).encode()).hexdigest()[:16]
    expected = get_groundtruth(subset, f"rasa-lora-subset-{digest}", [])
    out = []
    for k, (task_id, completion) in enumerate(samples):
        problem = problems[task_id]
        result = check_correctness("humaneval", k, problem, problem["prompt"] + completion, expected[task_id],
                                   base_only=False, fast_check=True, identifier=f"{task_id}#{k}")
        base = result["base"][0] == PASS
        out.append({"base": base, "plus": base and result["plus"][0] == PASS, "base_status": result["base"][0],
                    "plus_status": result["plus"][0]})
    return out


def compare_evaluate(rows: list[dict], results_file: Path) -> dict:
    """Our verdicts against `evalplus.evaluate`'s results file: its k-th sample of a task is our k-th line of it."""
    evaluated = json.loads(results_file.read_text())["eval"]
    seen: dict[str, int] = {}
    theirs = []
    for r in rows:
        k = seen.get(r["task_id"], 0)
        seen[r["task_id"]] = k + 1
        result = evaluated[r["task_id"]][k]
        base = result["base_status"] == "pass"
        theirs.append((base, base and result["plus_status"] == "pass"))
    n = max(len(rows), 1)
    return {"file": str(results_file),
            "agree_base": sum(r["ours_base"] == b for r, (b, _) in zip(rows, theirs)),
            "agree_plus": sum(r["ours_plus"] == p for r, (_, p) in zip(rows, theirs)),
            "pass@1_base": sum(b for b, _ in theirs) / n, "pass@1_plus": sum(p for _, p in theirs) / n,
            "differ": [r["task_id"] for r, t in zip(rows, theirs) if (r["ours_base"], r["ours_plus"]) != t]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--completions", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--evalplus-results", default=None, help="evalplus.evaluate's *_eval_results.json, same samples")
    args = p.parse_args(argv)
    from rasa_lora.evaluation.code import check_plus, ground_truth
    from rasa_lora.evaluation.tasks import default_data_dir, load_task, task_spec
    from rasa_lora.models import cache_dir

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    data_file = data_dir / task_spec("humaneval+").local_file
    os.environ["HUMANEVAL_OVERRIDE_PATH"] = str(data_file)  # read by evalplus.data at import
    try:
        from evalplus.data import get_human_eval_plus
    except ImportError:
        print("code_agreement needs evalplus: pip install --no-deps evalplus (see docs/evaluation.md)", file=sys.stderr)
        return 2
    samples = _load_completions(Path(args.completions))
    tasks = {t["id"]: t for t in load_task("humaneval+", data_dir)}
    start = time.perf_counter()
    truths = ground_truth([tasks[t] for t in dict.fromkeys(t for t, _ in samples)], cache_dir() / "humanevalplus-truth",
                          args.workers)
    ours = check_plus([(tasks[t], c) for t, c in samples], truths, args.workers)
    ours_s = time.perf_counter() - start
    with gzip.open(data_file, "rt") as f:
        n_release = sum(1 for line in f if line.strip())
    problems = get_human_eval_plus(err_incomplete=n_release == 164)
    start = time.perf_counter()
    theirs = evalplus_verdicts(problems, samples, data_file)
    theirs_s = time.perf_counter() - start
    rows = [{"task_id": t, "sample": k, "completion": c, "ours_base": o["base"], "ours_plus": o["plus"],
             "ours_failure": o["failure"], "evalplus_base": e["base"], "evalplus_plus": e["plus"],
             "evalplus_status": [e["base_status"], e["plus_status"]]}
            for k, ((t, c), o, e) in enumerate(zip(samples, ours, theirs))]
    n = len(rows)
    report = {"samples": n, "tasks": len({r["task_id"] for r in rows}), "completions": str(args.completions),
              "agree_base": sum(r["ours_base"] == r["evalplus_base"] for r in rows),
              "agree_plus": sum(r["ours_plus"] == r["evalplus_plus"] for r in rows),
              "pass@1_base": [sum(r["ours_base"] for r in rows) / max(n, 1),
                              sum(r["evalplus_base"] for r in rows) / max(n, 1)],
              "pass@1_plus": [sum(r["ours_plus"] for r in rows) / max(n, 1),
                              sum(r["evalplus_plus"] for r in rows) / max(n, 1)],
              "seconds": [round(ours_s, 1), round(theirs_s, 1)],
              "differ": [r for r in rows
                         if (r["ours_base"], r["ours_plus"]) != (r["evalplus_base"], r["evalplus_plus"])],
              "rows": rows}
    if args.evalplus_results:
        report["evalplus_evaluate"] = compare_evaluate(rows, Path(args.evalplus_results))
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print("| samples | tasks | agree base | agree plus | pass@1 base (ours / evalplus) | pass@1 plus (ours / evalplus) "
          "| seconds (ours / evalplus) |\n|---|---|---|---|---|---|---|")
    print(f"| {n} | {report['tasks']} | {report['agree_base']}/{n} | {report['agree_plus']}/{n} | "
          f"{report['pass@1_base'][0]:.4f} / {report['pass@1_base'][1]:.4f} | {report['pass@1_plus'][0]:.4f} / "
          f"{report['pass@1_plus'][1]:.4f} | {report['seconds'][0]} / {report['seconds'][1]} |")
    if args.evalplus_results:
        e = report["evalplus_evaluate"]
        print(f"evalplus.evaluate ({args.evalplus_results}): agree base {e['agree_base']}/{n}, plus "
              f"{e['agree_plus']}/{n}, pass@1 base {e['pass@1_base']:.4f}, plus {e['pass@1_plus']:.4f}")
    for r in report["differ"]:
        print(f"differ: {r['task_id']}#{r['sample']} ours base/plus {r['ours_base']}/{r['ours_plus']} "
              f"({r['ours_failure']}), evalplus {r['evalplus_status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
