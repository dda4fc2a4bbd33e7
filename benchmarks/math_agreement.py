"""Math: our two verdicts against math-verify's and lm-eval's own functions, called directly, on real generations.

Input: a JSONL of `{"id", "generation"}` (what `benchmarks/generate_for_eval.py` writes) for `math500` or `gsm8k`.
For every item:
- ours: `extract_answer`, then `judge` (math-verify and Minerva verdicts, as `rasa-lora eval` stores them), and
  the Minerva verdict once more with the other LaTeX parser (sympy's `parse_latex` vs `latex2sympy`);
- math-verify direct, two ways: `verify(parse(gold), parse(generation))` on the whole generation (as lm-eval's
  `minerva_math` calls it, gold = the reference solution for MATH) and on our extracted answer (`$...$` around it);
- lm-eval 0.4.13 `minerva_math` direct: `is_equiv(normalize_final_answer(extracted), gold)` with its own gold
  (`normalize_final_answer(remove_boxed(last_boxed_only_string(solution)))` for MATH, as its `process_docs`), and
  whether its own extraction (`Final Answer: The final answer is ...`) finds anything in the generation;
- GSM8K also: lm-eval's own `gsm8k` task scoring, built from its YAML (its `strict-match` and `flexible-extract`
  filters, then `exact_match` with the YAML's settings) against the data file's full reference solution: a
  different extraction (the number after `#### `, or the last number in the text), shown beside ours.
Prints the agreement table and writes every item (and the disagreements) to --out (JSON) and --markdown.

lm-eval's `is_equiv` needs sympy's `parse_latex`, i.e. antlr4-python3-runtime 4.11; math-verify's default install
brings 4.13. Put a 4.11 runtime first on the path for this script:

    pip install --target /tmp/antlr411 --no-deps antlr4-python3-runtime==4.11.0
    PYTHONPATH=/tmp/antlr411:src python benchmarks/math_agreement.py --task math500 \
        --generations benchmarks/results/2026-12-05-issue21/generations/math500_smollm2.jsonl \
        --out math500_agreement.json \
        --markdown math500_agreement.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]  # see mc_agreement

COMPARISONS = [
    ("ours math-verify", "math-verify direct, extracted answer"),
    ("ours math-verify", "math-verify direct, whole generation"),
    ("ours minerva", "lm-eval minerva is_equiv"),
    ("ours minerva", "ours minerva, other parser"),
    ("ours minerva", "ours math-verify"),
]


GSM8K_COMPARISONS = [
    ("ours math-verify", "lm-eval gsm8k strict-match"),
    ("ours math-verify", "lm-eval gsm8k flexible-extract"),
]


def lm_eval_gsm8k_scorer():
    """lm-eval's `gsm8k` task scoring from its own YAML: (generation, reference solution) -> {filter: correct}."""
    from importlib.resources import files

    import lm_eval.filters  # noqa: F401 - registers the filters
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.api.registry import get_filter

    config = yaml.safe_load((files("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    (metric,) = [m for m in config["metric_list"] if m["metric"] == "exact_match"]
    options = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    pipelines = {f["name"]: [get_filter(step["function"])(**{k: v for k, v in step.items() if k != "function"})
                             for step in f["filter"]] for f in config["filter_list"]}

    def score(generation: str, reference: str) -> dict[str, bool]:
        out = {}
        for name, steps in pipelines.items():
            responses = [[generation]]
            for step in steps:
                responses = list(step.apply(responses, [{}]))
            out[name] = bool(exact_match_hf_evaluate([responses[0]], [reference], **options)["exact_match"])
        return out
    return score


def _lm_eval_utils():
    from importlib.metadata import version

    if not version("antlr4-python3-runtime").startswith("4.11"):
        raise SystemExit("lm-eval's minerva_math needs antlr4-python3-runtime 4.11 first on the path: "
                         "pip install --target /tmp/antlr411 --no-deps antlr4-python3-runtime==4.11.0, then run "
                         "with PYTHONPATH=/tmp/antlr411:src")
    from lm_eval.tasks.minerva_math import utils

    return utils


def _mv_direct(gold: str, target: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold), parse(target)))
    except Exception:  # noqa: BLE001 - as our wrapper: a failure is "not equal"
        return False


def score_item(item: dict, generation: str, task: str, utils) -> dict:
    from rasa_lora.evaluation.math_check import (
        _with_alarm,
        extract_answer,
        judge,
        minerva_equivalent,
        minerva_parser,
        normalize_final_answer,
    )

    extracted = extract_answer(generation)
    ours = judge(item["answer"], extracted)
    other = "latex2sympy" if minerva_parser() == "sympy" else "sympy"
    other_verdict = extracted is not None and _with_alarm(5, minerva_equivalent, normalize_final_answer(extracted),
                                                          normalize_final_answer(item["answer"]), other)
    if task == "gsm8k":
        lm_gold, mv_gold = utils.normalize_final_answer(item["answer"]), item["answer"]
    else:
        boxed = utils.last_boxed_only_string(item["solution"])
        lm_gold = utils.normalize_final_answer(utils.remove_boxed(boxed)) if boxed else ""
        mv_gold = item["solution"]
    lm_found = utils.get_unnormalized_answer(generation)
    return {
        "id": item["id"], "gold": item["answer"], "extracted": extracted, "lm_eval_gold": lm_gold,
        "lm_eval_extraction_found": lm_found != "[invalidanswer]",
        "ours math-verify": ours["math_verify"], "ours minerva": ours["minerva"],
        "ours minerva, other parser": bool(other_verdict),
        "math-verify direct, extracted answer": extracted is not None and _mv_direct(f"${item['answer']}$",
                                                                                     f"${extracted}$"),
        "math-verify direct, whole generation": _mv_direct(mv_gold, generation),
        "lm-eval minerva is_equiv": extracted is not None and bool(
            utils.is_equiv(utils.normalize_final_answer(extracted), lm_gold)),
        "generation_tail": generation[-300:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=["math500", "gsm8k"])
    p.add_argument("--generations", required=True, help='JSONL of {"id", "generation"}')
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    utils = _lm_eval_utils()
    from rasa_lora.evaluation.math_check import MINERVA_REFERENCE, minerva_parser
    from rasa_lora.evaluation.tasks import load_task

    with open(args.generations) as f:
        generations = {r["id"]: r["generation"] for r in map(json.loads, filter(str.strip, f))}
    items = [i for i in load_task(args.task, args.data_dir) if i["id"] in generations]
    if not items:
        raise SystemExit(f"No item of {args.task} has a generation in {args.generations} (ids differ?).")
    rows = [score_item(item, generations[item["id"]], args.task, utils) for item in items]
    comparisons = list(COMPARISONS)
    if args.task == "gsm8k":
        from rasa_lora.evaluation.tasks import default_data_dir, task_spec

        data_file = Path(args.data_dir or default_data_dir()) / task_spec("gsm8k").local_file
        with data_file.open() as f:
            solutions = {f"gsm8k/{k}": json.loads(line)["answer"] for k, line in enumerate(filter(str.strip, f))}
        scorer = lm_eval_gsm8k_scorer()
        for row in rows:
            verdicts = scorer(generations[row["id"]], solutions[row["id"]])
            row.update({f"lm-eval gsm8k {name}": v for name, v in verdicts.items()})
        comparisons += GSM8K_COMPARISONS
    table = []
    for a, b in comparisons:
        differ = [r for r in rows if r[a] != r[b]]
        table.append({"ours": a, "reference": b, "agree": len(rows) - len(differ), "n": len(rows),
                      "accepted": [sum(r[a] for r in rows), sum(r[b] for r in rows)],
                      "differ": [r["id"] for r in differ]})
    report = {"task": args.task, "generations": str(args.generations), "items": len(rows),
              "minerva_reference": MINERVA_REFERENCE, "minerva_parser": minerva_parser(),
              "extracted": sum(r["extracted"] is not None for r in rows),
              "lm_eval_extraction_found": sum(r["lm_eval_extraction_found"] for r in rows),
              "gold_differs_from_lm_eval_gold": [r["id"] for r in rows if args.task == "math500" and
                                                 r["lm_eval_gold"] != utils.normalize_final_answer(r["gold"])],
              "agreement": table, "rows": rows}
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    lines = [f"{args.task}: {len(rows)} items, answers extracted {report['extracted']}, lm-eval's own extraction "
             f"finds {report['lm_eval_extraction_found']}; Minerva parser: {minerva_parser()}", "",
             "| ours | reference (called directly) | agree | accepted (ours / reference) |", "|---|---|---|---|"]
    lines += [f"| {t['ours']} | {t['reference']} | {t['agree']}/{t['n']} | {t['accepted'][0]} / {t['accepted'][1]} |"
              for t in table]
    print("\n".join(lines))
    if args.markdown:
        md = lines + ["", "Disagreements:", "", "| id | pair | gold | extracted | ours | reference |",
                      "|---|---|---|---|---|---|"]
        by_pair = Counter()
        for t in table:
            for rid in t["differ"]:
                r = next(x for x in rows if x["id"] == rid)
                by_pair[(t["ours"], t["reference"])] += 1
                md.append(f"| {rid} | {t['ours']} vs {t['reference']} | `{r['gold']}` | `{r['extracted']}` | "
                          f"{r[t['ours']]} | {r[t['reference']]} |")
        Path(args.markdown).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
