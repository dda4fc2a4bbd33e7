"""`rasa-lora eval TASK --model M [--adapter A]`: run one benchmark, write per-item JSONL and summary.json.

Tasks: math, math500, gsm8k (greedy generation, both math checkers), humaneval, humaneval+ (n samples at a
temperature, sandboxed tests, pass@k), arc_challenge, hellaswag, winogrande (log-likelihood multiple choice).
`--gold` scores the references instead of model output (math: the reference solutions; code: the canonical
solutions), which checks the checkers; for math it also writes `disagreements.md`, where the two checkers differ.

Output: `DIR/records.jsonl` (one record per item, or per (task, sample) for code) and `DIR/summary.json`.
A rerun with the same DIR skips items already in records.jsonl and recomputes the summary from all of them.
Records are appended a whole batch at a time and the summary is written atomically; a run that fails or is
interrupted before scoring anything removes the folder it created, and Ctrl-C says what was kept.

Data: `--data-dir` (default `../shared/data` beside the working directory or the repository) in the layout of
`docs/first-hour.md` ("Benchmark data"); without one, the Hugging Face Hub's copies (needs `datasets` and a network).

Generation stops at EOS, at the task's stop strings and, for math, at the end of the line that gives "The answer
is ..."; default token limits: gsm8k 512, math/math500 2048 (the paper's), code 512.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rasa_lora.atomic import write_atomic
from rasa_lora.errors import ArgumentParser, UserError
from rasa_lora.evaluation.tasks import TASKS, task_spec

# Default generation limits by task, then by kind. GSM8K solutions are a few sentences (the longest gold solution
# has ~400 tokens with its calculator notes); MATH keeps the paper's 2048.
_MAX_NEW_TOKENS = {"gsm8k": 512, "math": 2048, "math500": 2048, "code": 512}


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rasa-lora eval", description=__doc__.split("\n\n")[0])
    p.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--model", default=None, help="base model: path, .gguf, hub name; default the embedded SmolLM2")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (RaSA, LoRA, ...) for --model")
    p.add_argument("--data-dir", default=None,
                   help="benchmark files, e.g. DIR/gsm8k/test.jsonl (layout: README, 'Benchmark data'); default "
                        "../shared/data when it exists, else the Hugging Face Hub (needs `datasets` and a network)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output-dir", default=None, help="default runs/eval/TASK")
    p.add_argument("--gold", action="store_true", help="score the reference answers/solutions (checks the checkers)")
    p.add_argument("--n-samples", type=int, default=50, help="code: samples per task (paper: 50)")
    p.add_argument("--temperature", type=float, default=None, help="default 0 for math, 0.2 for code")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation limit; default gsm8k 512, math/math500 2048 (the paper's), code 512. Math "
                        "generations also stop at EOS and after the line giving \"The answer is ...\"")
    p.add_argument("--workers", type=int, default=None, help="sandbox / checker processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--prompt-style", default="paper", choices=["paper", "humanevalpack"],
                   help="code: 'paper' (Fig. 9 with our instruction text, cut at bigcode's HumanEval stop words) or "
                        "'humanevalpack' (the bigcode harness's HumanEvalPack instruction and its truncation)")
    p.add_argument("--completions", default=None,
                   help="score outputs made elsewhere instead of generating: code, a JSONL of {task_id, completion} "
                        "(the same number per task); math, a JSONL of {id, generation}")
    return p


class AdapterMismatchError(ValueError):
    pass


def load_model_and_tokenizer(model_name: str | None, adapter: str | None, dtype: str, device: str | None = None):
    """Base model (+ adapter) on `device`. An adapter that does not fit the base raises AdapterMismatchError."""
    import torch

    from rasa_lora.models import check_adapter_files, load_model, load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter is not None:
        check_adapter_files(adapter)  # before the base model loads: a bad adapter folder fails at once
    model = load_model(model_name, dtype=dtype).to(device)
    if adapter is None:
        return model.eval(), load_tokenizer(model_name)
    return attach_adapter(model, adapter, model_name), load_tokenizer(model_name)


def attach_adapter(model, adapter: str, model_name: str | None = None):
    """`model` (a loaded base, changed in place) with the PEFT adapter in `adapter`, in eval mode, as
    `load_model_and_tokenizer` gives it. An adapter that does not fit the base raises AdapterMismatchError."""
    from rasa_lora.models import load_adapter as load_peft_adapter

    config_file = Path(adapter) / "adapter_config.json"
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    try:
        model = load_peft_adapter(model, adapter)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterMismatchError(
            f"Adapter {adapter!r} does not fit base model {model_name or 'smollm2'!r} (it was trained on "
            f"{trained_on!r}): {str(error).splitlines()[0][:300]}. Pass the adapter's own base with --model."
        ) from error
    return model.eval()


def _read_records(path: Path) -> dict[str, dict]:
    records = {}
    if path.is_file():
        with path.open() as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # the torn last line of an interrupted run: redone
                        continue
                    records[record["id"]] = record
    return records


def _append(path: Path, records: list[dict]) -> None:
    """Append a batch's records in one write (an interruption leaves at most a torn last line, which is skipped)."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if torn else "") + "".join(json.dumps(record) + "\n" for record in records))
        f.flush()


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.command = "rasa-lora eval " + shlex.join(argv)
    out_dir = Path(args.output_dir or Path("runs") / "eval" / args.task)
    try:
        return _run(args, out_dir)
    except (FileNotFoundError, KeyError, ValueError, ImportError, UserError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        _close_bars()
        print(f"rasa-lora eval: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = len(_read_records(out_dir / "records.jsonl"))
        where = (f"{kept} scored records are kept in {out_dir / 'records.jsonl'}; the same command continues from "
                 "there" if kept else "nothing was scored and nothing is left behind")
        print(f"\nrasa-lora eval: interrupted (Ctrl-C); {where}", file=sys.stderr)
        return 130


def _load_items(args: argparse.Namespace, spec) -> list[dict]:
    """The task's items; a failed Hub fallback (no local data) becomes one line saying where data come from."""
    from rasa_lora.evaluation.tasks import default_data_dir, load_task
    from rasa_lora.models import hub_offline, hub_reachable

    if args.data_dir is not None or not spec.local_file or default_data_dir() is not None:
        return load_task(args.task, args.data_dir, args.limit)
    fix = (f"pass --data-dir FOLDER, a folder holding {spec.local_file} (the layout of docs/first-hour.md, "
           "\"Benchmark data\"), or connect to the Hugging Face Hub (needs `pip install datasets`)")
    if hub_offline() or not hub_reachable():
        raise UserError(f"no local benchmark data for {args.task!r} (no ../shared/data beside the working directory "
                        f"or the repository) and the Hugging Face Hub cannot be reached: {fix}")
    try:
        return load_task(args.task, args.data_dir, args.limit)
    except Exception as error:  # datasets' ConnectionError, HfHubHTTPError, ...: all end the same way
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"no local benchmark data for {args.task!r}, and loading it from the Hugging Face Hub failed "
                        f"({type(error).__name__}: {first}): {fix}") from None


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    spec = task_spec(args.task)
    if args.gold and spec.kind == "choice":
        raise ValueError(f"--gold applies to math and code tasks, not to {args.task!r} (it has no generations).")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit} must be at least 1.")
    if args.adapter is not None and not (args.gold or args.completions):
        from rasa_lora.models import check_adapter_files

        check_adapter_files(args.adapter)
    commit = _commit()  # at the start: the code that ran, even if the tree moves on during a long run
    items = _load_items(args, spec)
    records_path = out_dir / "records.jsonl"
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = {"math": _run_math, "code": _run_code, "choice": _run_choice}[spec.kind]
    try:
        metrics = runner(args, items, records_path)
    except BaseException:
        if created and not _read_records(records_path):
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing scored: leave no empty folder behind
        raise
    model_name = None if args.gold or args.completions else args.model or "smollm2 (embedded SmolLM2-135M-Instruct)"
    summary = {"task": args.task, "model": model_name, "completions": args.completions,
               "adapter": args.adapter, "gold": args.gold, "limit": args.limit, "items": len(items), **metrics,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
               "command": args.command}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "disagreements"}, indent=2))
    return 0


def _close_bars() -> None:
    """Erase any progress bar an error left open, so that the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.leave = False
        bar.close()


def _progress(total: int, done: int, desc: str, unit: str = "it"):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, file=sys.stderr, dynamic_ncols=True, unit=unit)


class _TokenRate:
    """Shows generated tokens and tokens/s in a bar's postfix while a batch generates (the bar itself counts items,
    which move only when a batch ends); refreshed at most twice a second."""

    def __init__(self, bar) -> None:
        self.bar, self.tokens, self.started, self.shown = bar, 0, time.perf_counter(), 0.0

    def __call__(self, count: int) -> None:
        self.tokens += count
        now = time.perf_counter()
        if now - self.shown >= 0.5:
            self.shown = now
            rate = self.tokens / max(now - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens:,} tokens generated, {rate:.1f} tok/s", refresh=True)


def _chunks(sequence: list, size: int):
    for start in range(0, len(sequence), size):
        yield sequence[start:start + size]


# --- math -------------------------------------------------------------------------------------------------------------
def _generator(args):
    from rasa_lora.evaluation.generation import Generator

    return Generator(lambda: load_model_and_tokenizer(args.model, args.adapter, args.dtype, args.device),
                     args.model, args.adapter, args.dtype, args.batch_size, args.seed)


def _gold_generation(task: str, item: dict) -> str:
    if task == "gsm8k":
        return f"The answer is: {item['answer']}"
    return item["solution"]


def _run_math(args, items: list[dict], records_path: Path) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from rasa_lora.evaluation.math_check import extract_answer, judge_many
    from rasa_lora.evaluation.tasks import math_prompt

    done = _read_records(records_path)
    todo = [item for item in items if item["id"] not in done]
    external = _read_generations(Path(args.completions), todo) if args.completions else None
    from rasa_lora.evaluation.generation import ANSWER_LINE

    generator = _generator(args)
    bar = _progress(len(items), len(items) - len(todo), f"{args.task}", unit="item")
    rate = _TokenRate(bar)
    # the checker processes ignore Ctrl-C (the terminal sends it to them too): this process reports it, once
    with ProcessPoolExecutor(max_workers=args.workers or os.cpu_count() or 1, initializer=signal.signal,
                             initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        for chunk in _chunks(todo, max(args.batch_size, 1) * 4):
            prompts = [math_prompt(item["question"]) for item in chunk]
            if args.gold:
                generations = [_gold_generation(args.task, item) for item in chunk]
            elif external is not None:
                generations = [external[item["id"]] for item in chunk]
            else:
                generations = [g[0] for g in generator(prompts, _max_new_tokens(args), args.temperature or 0.0, 1,
                                                       stop=["### Instruction"], answer_stop=ANSWER_LINE,
                                                       progress=bar.update, on_tokens=rate)]
            answers = [extract_answer(g) for g in generations]
            verdicts = judge_many([(item["answer"], a) for item, a in zip(chunk, answers)], pool=pool)
            _append(records_path, [{"id": item["id"], "prompt": p, "generation": g, "extracted": a,
                                    "gold": item["answer"], "verdicts": v}
                                   for item, p, g, a, v in zip(chunk, prompts, generations, answers, verdicts)])
            if args.gold or external is not None:
                bar.update(len(chunk))
    bar.close()
    return _math_summary(args, items, _read_records(records_path), records_path.parent)


def _max_new_tokens(args) -> int:
    return args.max_new_tokens or _MAX_NEW_TOKENS.get(args.task) or _MAX_NEW_TOKENS[task_spec(args.task).kind]


def _read_generations(path: Path, items: list[dict]) -> dict[str, str]:
    """Math generations by item id from a JSONL of {"id", "generation"}; every item must have one."""
    if not path.is_file():
        raise FileNotFoundError(f"--completions file {path} does not exist.")
    with path.open() as f:
        by_id = {row["id"]: row["generation"] for row in map(json.loads, filter(str.strip, f))}
    missing = [item["id"] for item in items if item["id"] not in by_id]
    if missing:
        raise ValueError(f"--completions {path} has no generation for {len(missing)} items, e.g. {missing[:3]}; "
                         "give one {\"id\", \"generation\"} line per item (or use --limit).")
    return by_id


def _math_summary(args, items: list[dict], records: dict[str, dict], out_dir: Path) -> dict:
    from rasa_lora.evaluation.math_check import MINERVA_REFERENCE, answer_shape, minerva_parser

    rows = [records[item["id"]] for item in items]
    n = max(len(rows), 1)
    summary = {"accuracy": sum(r["verdicts"]["math_verify"] for r in rows) / n,
               "accuracy_minerva": sum(r["verdicts"]["minerva"] for r in rows) / n,
               "checker": f"accuracy = math-verify; accuracy_minerva = {MINERVA_REFERENCE} (normalisation, "
                          "string check, sympy)", "minerva_parser": minerva_parser()}
    differ = [r for r in rows if r["verdicts"]["math_verify"] != r["verdicts"]["minerva"]]
    counts = Counter((answer_shape(r["gold"]), "math-verify only" if r["verdicts"]["math_verify"] else
                      "minerva only") for r in differ)
    summary["disagreements"] = {f"{shape} / {who}": c for (shape, who), c in sorted(counts.items())}
    lines = [f"# Where the two math checkers disagree: `{args.task}`{' (gold answers)' if args.gold else ''}", "",
             f"{len(rows)} items; math-verify correct: {sum(r['verdicts']['math_verify'] for r in rows)}; "
             f"Minerva/sympy correct: {sum(r['verdicts']['minerva'] for r in rows)}; disagreements: {len(differ)}.",
             "", "| kind of gold answer | judged correct by | count |", "| --- | --- | --- |"]
    lines += [f"| {shape} | {who} | {c} |" for (shape, who), c in sorted(counts.items())]
    lines += ["", "| id | gold | extracted | math-verify | minerva |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['id']} | `{r['gold']}` | `{r['extracted']}` | {r['verdicts']['math_verify']} | "
              f"{r['verdicts']['minerva']} |" for r in differ]
    write_atomic(out_dir / "disagreements.md", "\n".join(lines) + "\n")
    return summary


# --- code -------------------------------------------------------------------------------------------------------------
def _run_code(args, items: list[dict], records_path: Path) -> dict:
    from rasa_lora.evaluation import code

    external = _read_completions(Path(args.completions), items) if args.completions else None
    n = 1 if args.gold else len(next(iter(external.values()))) if external else args.n_samples
    done = _read_records(records_path)
    jobs = [(item, s) for item in items for s in range(n) if f"{item['id']}#{s}" not in done]
    truths = None
    if args.task == "humaneval+" and jobs:
        from rasa_lora.models import cache_dir

        bar = _progress(len(items), 0, "canonical timings")
        truths = code.ground_truth(items, cache_dir() / "humanevalplus-truth", args.workers, lambda: bar.update())
        bar.close()
    generator = _generator(args)
    bar = _progress(len(items) * n, len(items) * n - len(jobs), args.task)
    pending_tasks = list(dict.fromkeys(item["id"] for item, _ in jobs))
    by_id = {item["id"]: item for item in items}
    for chunk_ids in _chunks(pending_tasks, max(1, args.batch_size // max(n, 1)) * 4 if n < args.batch_size else 2):
        chunk = [(by_id[i], s) for i in chunk_ids for s in range(n) if f"{i}#{s}" not in done]
        completions = ([("", external[item["id"]][s]) for item, s in chunk] if external is not None else
                       _completions(args, chunk, generator, n))
        pairs = [(item, c) for (item, _), (_, c) in zip(chunk, completions)]
        if args.task == "humaneval+":
            verdicts = code.check_plus(pairs, truths, args.workers, lambda: bar.update())
        else:
            verdicts = code.check_base(pairs, args.workers, lambda: bar.update())
        _append(records_path, [{"id": f"{item['id']}#{s}", "task_id": item["id"], "sample": s, "generation": g,
                                "completion": c, "verdicts": v}
                               for (item, s), (g, c), v in zip(chunk, completions, verdicts)])
    bar.close()
    records = _read_records(records_path)
    samples = code.evalplus_samples([records[f"{item['id']}#{s}"] for item in items for s in range(n)], by_id)
    # `evalplus.evaluate --samples` reads it
    write_atomic(records_path.parent / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in samples))
    return _code_summary(items, n, records, args.task) | {"prompt_style": args.prompt_style}


def _read_completions(path: Path, items: list[dict]) -> dict[str, list[str]]:
    """Completions by task id from a JSONL file of {"task_id", "completion"}; every task needs the same count."""
    if not path.is_file():
        raise FileNotFoundError(f"--completions file {path} does not exist.")
    by_task: dict[str, list[str]] = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_task.setdefault(row["task_id"], []).append(row["completion"])
    counts = {item["id"]: len(by_task.get(item["id"], [])) for item in items}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        uneven = {k: v for k, v in counts.items() if v != max(counts.values())}
        raise ValueError(f"--completions {path} must give every task the same number (>= 1) of completions; "
                         f"these differ from {max(counts.values())}: {dict(list(uneven.items())[:5])}.")
    return {task_id: by_task[task_id] for task_id in counts}


def _completions(args, chunk, generator, n) -> list[tuple[str, str]]:
    """(raw generation, completion) per (item, sample) of the chunk, in --prompt-style."""
    from rasa_lora.evaluation.code import completion_from_generation
    from rasa_lora.evaluation.tasks import code_prompt

    if args.gold:
        return [("", item["canonical_solution"]) for item, _ in chunk]
    items = list(dict.fromkeys(item["id"] for item, _ in chunk))
    by_id = {item["id"]: item for item, _ in chunk}
    temperature = 0.2 if args.temperature is None else args.temperature
    style = args.prompt_style
    generated = generator([code_prompt(by_id[i]["prompt"], style, by_id[i]["entry_point"]) for i in items],
                          _max_new_tokens(args), temperature, n)
    samples = {i: g for i, g in zip(items, generated)}
    return [(samples[item["id"]][s], completion_from_generation(samples[item["id"]][s], style))
            for item, s in chunk]


def _code_summary(items: list[dict], n: int, records: dict[str, dict], task: str) -> dict:
    from rasa_lora.evaluation.code import pass_at_k

    keys = ["plus", "base"] if task == "humaneval+" else ["base"]
    summary: dict = {"n_samples": n}
    for key in keys:
        correct = [sum(records[f"{item['id']}#{s}"]["verdicts"][key] for s in range(n)) for item in items]
        prefix = "" if key == keys[0] else "base_"
        for k in (1, 10):
            if k <= n:
                summary[f"{prefix}pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / max(len(items), 1)
    isolation = [r["verdicts"].get("isolation", {}) for r in records.values()]
    summary["network_isolated"] = all(i.get("network") for i in isolation) if isolation else None
    return summary


# --- multiple choice ------------------------------------------------------------------------------------------------
def _run_choice(args, items: list[dict], records_path: Path) -> dict:
    done = _read_records(records_path)
    todo = [item for item in items if item["id"] not in done]
    model = tokenizer = None
    if todo:
        model, tokenizer = load_model_and_tokenizer(args.model, args.adapter, args.dtype, args.device)
    return score_choice_task(model, tokenizer, items, records_path, args.batch_size, args.task)


def score_choice_task(model, tokenizer, items: list[dict], records_path: Path, batch_size: int,
                      desc: str = "choice", encode_cache: dict | None = None) -> dict:
    """Score the multiple-choice `items` with a loaded model, as `rasa-lora eval` does: records appended to
    `records_path` 64 items at a time (items already there are skipped), then acc / acc_norm over all `items`.
    `encode_cache`: see `multiple_choice.loglikelihoods` (one dict per tokenizer, for many models)."""
    from rasa_lora.evaluation.multiple_choice import loglikelihoods, score_choices

    done = _read_records(records_path)
    todo = [item for item in items if item["id"] not in done]
    bar = _progress(len(items), len(items) - len(todo), desc)
    for chunk in _chunks(todo, 64):
        pairs = [pair for item in chunk for pair in zip(item["contexts"], item["continuations"])]
        values = loglikelihoods(model, tokenizer, pairs, batch_size, cache=encode_cache)
        records, start = [], 0
        for item in chunk:
            lls = values[start:start + len(item["contexts"])]
            start += len(item["contexts"])
            records.append({"id": item["id"], "loglikelihoods": lls, "gold": item["gold"],
                            **score_choices(lls, item["choice_texts"], item["gold"])})
        _append(records_path, records)
        bar.update(len(chunk))
    bar.close()
    records = _read_records(records_path)
    rows = [records[item["id"]] for item in items]
    n = max(len(rows), 1)
    return {"acc": sum(r["acc"] for r in rows) / n, "acc_norm": sum(r["acc_norm"] for r in rows) / n}
