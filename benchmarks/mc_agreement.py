"""Multiple choice: `rasa-lora eval`'s scores against lm-evaluation-harness's on the same items and model.

Our side: the task loaders of `rasa_lora.evaluation.tasks` and `multiple_choice.loglikelihoods`/`score_choices`.
lm-eval's side, all its own code: the task as its YAML defines it (`arc_challenge`, `winogrande`, `hellaswag`,
built by its TaskManager with our local rows as a `custom_dataset` in the hub datasets' layout), its
`construct_requests`, `HFLM.loglikelihood` on the same preloaded model object, and its `process_results`.
Compares per-request log-likelihoods (max abs difference, tolerance 1e-4) and per-item acc/acc_norm (must be
identical). Needs lm-eval (`pip install 'rasa-lora[bench]'`).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/mc_agreement.py --limit 200 --out mc_agreement.json

The first `--limit` items of each local file are used (a fixed subset). HellaSwag: our copy is a text export
without `ctx_a`/`ctx_b` (see shared/data/SOURCES.md); lm-eval's `process_docs` gets `activity_label` and `ctx_a`
split from it at the first ": " and an empty `ctx_b`, so both sides see the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TOLERANCE = 1e-4
TASKS = ("arc_challenge", "winogrande", "hellaswag")
LM_EVAL_VERSION = "0.4.13"
# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow the `kernels` package
# that transformers imports; the script needs nothing from this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _read_jsonl(path: Path, limit: int) -> list[dict]:
    rows = []
    with path.open() as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == limit:
                break
    return rows


def hub_docs(task: str, data_dir: Path, limit: int, offset: int = 0) -> list[dict]:
    """Our local rows `offset`..`offset + limit` in the layout of the hub dataset lm-eval's task reads."""
    from rasa_lora.evaluation.tasks import task_spec

    rows = _read_jsonl(data_dir / task_spec(task).local_file, offset + limit)[offset:]
    if task == "arc_challenge":
        return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
    if task == "winogrande":
        return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]
    docs = []
    for i, r in enumerate(rows, start=offset):
        label, _, ctx = r["ctx"].partition(": ")
        docs.append({"ind": i, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": r["ctx"],
                     "endings": r["endings"], "source_id": "", "split": "val", "split_type": "",
                     "label": str(r["label"])})
    return docs


def lm_eval_task(name: str, docs: list[dict]):
    """lm-eval's task `name` from its own YAML, reading `docs` instead of the hub (same docs for every split)."""
    import datasets
    from lm_eval.tasks import TaskManager

    def custom_dataset(**_):
        split = datasets.Dataset.from_list(docs)
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})

    manager = TaskManager()
    return manager._factory._build_task(manager._entry(name), {"custom_dataset": custom_dataset})


def score_lm_eval(lm, task) -> tuple[list[list[float]], list[dict], list[list[tuple[str, str]]]]:
    docs = list(task.eval_docs)
    requests, spans = [], []
    for index, doc in enumerate(docs):
        context = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))  # as build_all_requests
        instances = task.construct_requests(doc=doc, ctx=context, metadata=(task.config.task, index, 1))
        instances = instances if isinstance(instances, list) else [instances]
        spans.append((len(requests), len(instances)))
        requests.extend(instances)
    results = lm.loglikelihood(requests, disable_tqdm=False)
    lls, metrics, pairs = [], [], []
    for doc, (start, n) in zip(docs, spans):
        doc_results = results[start:start + n]
        lls.append([ll for ll, _ in doc_results])
        pairs.append([tuple(r.args) for r in requests[start:start + n]])
        metrics.append(task.process_results(doc, doc_results))
    return lls, metrics, pairs


def compare(ours_items, ours_lls, theirs_lls, theirs_metrics, ours_pairs, theirs_pairs) -> dict:
    from rasa_lora.evaluation.multiple_choice import score_choices

    diffs, acc_diff, norm_diff, pair_diff, items = [], [], [], [], []
    for k, item in enumerate(ours_items):
        ours = score_choices(ours_lls[k], item["choice_texts"], item["gold"])
        theirs = theirs_metrics[k]
        worst = max(abs(a - b) for a, b in zip(ours_lls[k], theirs_lls[k]))
        diffs.append(worst)
        if ours["acc"] != theirs["acc"]:
            acc_diff.append(item["id"])
        if "acc_norm" in theirs and ours["acc_norm"] != theirs["acc_norm"]:
            norm_diff.append(item["id"])
        if [tuple(p) for p in ours_pairs[k]] != theirs_pairs[k]:
            pair_diff.append(item["id"])
        items.append({"id": item["id"], "ours": ours_lls[k], "lm_eval": theirs_lls[k], "max_abs_diff": worst})
    n = len(ours_items)
    return {"items": n, "requests": sum(len(x) for x in ours_lls), "max_abs_ll_diff": max(diffs, default=0.0),
            "over_tolerance": sum(d > TOLERANCE for d in diffs), "requests_text_differ": pair_diff,
            "acc_ours": sum(score_choices(ours_lls[k], it["choice_texts"], it["gold"])["acc"]
                            for k, it in enumerate(ours_items)) / max(n, 1),
            "acc_lm_eval": sum(m["acc"] for m in theirs_metrics) / max(n, 1),
            "acc_norm_ours": sum(score_choices(ours_lls[k], it["choice_texts"], it["gold"])["acc_norm"]
                                 for k, it in enumerate(ours_items)) / max(n, 1),
            "acc_norm_lm_eval": (sum(m["acc_norm"] for m in theirs_metrics) / max(n, 1)
                                 if all("acc_norm" in m for m in theirs_metrics) else None),
            "acc_differ": acc_diff, "acc_norm_differ": norm_diff, "per_item": items}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--offset", type=int, default=0, help="skip the first items (to split a subset over runs)")
    p.add_argument("--data-dir", default=None, help="default ../shared/data")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        print("mc_agreement needs lm-eval: pip install 'rasa-lora[bench]'", file=sys.stderr)
        return 2
    from rasa_lora.evaluation.multiple_choice import encode_pair, loglikelihoods
    from rasa_lora.evaluation.tasks import default_data_dir, load_task
    from rasa_lora.models import load_model, load_tokenizer

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    model, tokenizer = load_model(None).eval(), load_tokenizer(None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    report = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else LM_EVAL_VERSION,
              "model": "embedded SmolLM2-135M-Instruct (float32, CPU)", "limit": args.limit, "offset": args.offset,
              "tolerance": TOLERANCE,
              "tasks": {}}
    for name in args.tasks.split(","):
        start = time.perf_counter()
        items = load_task(name, data_dir, args.offset + args.limit)[args.offset:]
        ours_pairs = [list(zip(i["contexts"], i["continuations"])) for i in items]
        flat = [pair for pairs in ours_pairs for pair in pairs]
        values = loglikelihoods(model, tokenizer, flat, args.batch_size)
        ours_lls, k = [], 0
        for pairs in ours_pairs:
            ours_lls.append(values[k:k + len(pairs)])
            k += len(pairs)
        task = lm_eval_task(name, hub_docs(name, data_dir, args.limit, args.offset))
        theirs_lls, theirs_metrics, theirs_pairs = score_lm_eval(lm, task)
        result = compare(items, ours_lls, theirs_lls, theirs_metrics, ours_pairs, theirs_pairs)
        # token-level check of the split: identical token ids for every request on both sides
        result["token_split_differ"] = sum(
            encode_pair(tokenizer, c, x) != tuple(map(list, lm._encode_pair(c, x))) for c, x in flat)
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["tasks"][name] = result
        print(f"{name}: {result['items']} items, {result['requests']} requests, max |dLL| "
              f"{result['max_abs_ll_diff']:.2e}, acc {result['acc_ours']:.4f} / {result['acc_lm_eval']:.4f}, "
              f"acc_norm {result['acc_norm_ours']:.4f} / {result['acc_norm_lm_eval']}, acc differ "
              f"{len(result['acc_differ'])}, acc_norm differ {len(result['acc_norm_differ'])}, "
              f"{result['seconds']} s", flush=True)
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print("| task | items | requests | max abs LL diff | acc (ours / lm-eval) | acc_norm (ours / lm-eval) | items "
          "differing |\n|---|---|---|---|---|---|---|")
    for name, r in report["tasks"].items():
        norm = f"{r['acc_norm_ours']:.4f} / {r['acc_norm_lm_eval']:.4f}" if r["acc_norm_lm_eval"] is not None else "-"
        print(f"| {name} | {r['items']} | {r['requests']} | {r['max_abs_ll_diff']:.1e} | {r['acc_ours']:.4f} / "
              f"{r['acc_lm_eval']:.4f} | {norm} | {len(r['acc_differ']) + len(r['acc_norm_differ'])} |")
    ok = all(r["over_tolerance"] == 0 and not r["acc_differ"] and not r["acc_norm_differ"]
             for r in report["tasks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
