"""The replication study (issue 20): does RaSA beat LoRA? `docs/replication.md` has the question and the answer.

Runs the grid of `configs/replication/gsm8k-smollm2.yaml` (SmolLM2-135M-Instruct on GSM8K) on one GPU, several
trainings side by side (a 135M model's step is host-bound, so each process keeps one core busy), then generates
and scores what the paper measures. Every stage is resumable: a rerun skips what is done and continues what was
interrupted, so the grid can span several 10-minute sittings of a rented GPU.

Stages (GPU machine: `train`, `generate`, `analyze`, `pack`; here: `score`):
  python3 benchmarks/replication.py train --runs lora-r8-s0,rasa-r8-s0 --base-model /tmp/smollm2.gguf \\
      --data-dir .data --jobs 7 --time-limit 540
  python3 benchmarks/replication.py generate --base-model /tmp/smollm2.gguf --data-dir .data --jobs 4 \\
      --batch-size 1319 [--runs lora-r8-s0,base] [--tasks gsm8k] [--limit gsm8k=660]
  python3 benchmarks/replication.py analyze --base-model /tmp/smollm2.gguf      # Figs. 2-3 on the fft run's deltas
  python3 benchmarks/replication.py pack --out $OUT/replication.tar.gz           # the small files, to bring back
  python3 benchmarks/replication.py score --root benchmarks/results/replication  # GSM8K verdicts (math-verify)
Then `python3 benchmarks/replication_report.py` writes the tables and figures of docs/replication.md.

Run names: `{method}-r{r}-s{seed}` (lora, rasa, vera), `fft-s{seed}`. The study's own choices (global batch 32,
2 epochs in the first sitting, no gradient checkpointing, 500 held-out examples) are in the recipe's header.
`time-limit` sends SIGTERM to trainings still running at the limit: the trainer checkpoints and exits 143.

`generate` evaluates the base model and every epoch adapter (`--runs`: some runs only; `base` names the base model)
in `--jobs` processes, each loading the base model once and taking its share of the adapters in turn: the
multiple-choice tasks (ARC-Challenge, WinoGrande, the first 1,000 of HellaSwag) on the PEFT model with `rasa-lora
eval`'s scoring function, then GSM8K test generations (greedy, 400 new tokens, `--batch-size` prompts at a time,
longest first) on the merged copy. Each adapter's outputs are written as they finish (GSM8K batch by batch), with
`eval/epoch-N/timing.json` (seconds per task, decoding steps, ms a step, tokens/s, peak GPU memory); a rerun, or the
next sitting, continues. The stage ends with a table of what is done and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "replication" / "gsm8k-smollm2.yaml"
ROOT = Path("runs/replication")
MC_TASKS = ("arc_challenge", "winogrande", "hellaswag")
MC_LIMIT = {"hellaswag": 1000}  # the first 1,000 of HellaSwag's 10,042 validation items
# Method-specific keys beside the recipe's: the paper's VeRA learning rate; full fine-tuning keeps no epoch
# adapters (the trainer refuses them), takes a small rate for Lion (not screened) and float32 weights (bf16 weights
# would round away most of Lion's lr-sized steps).
METHOD_KEYS = {"vera": {"learning_rate": 5e-3},
               "fft": {"learning_rate": 1e-5, "save_epoch_adapters": False, "model_dtype": "float32"}}
# METHOD[-rR][-kK][-aALPHA][-lrLR]-sSEED: the recipe's keys a run changes (screened variants carry -k, -a, -lr).
NAME = re.compile(r"^(?P<method>lora|rasa|vera|fft)(?:-r(?P<r>\d+))?(?:-k(?P<k>\d+))?(?:-a(?P<alpha>[\d.]+))?"
                  r"(?:-lr(?P<lr>[\d.]+e-\d+))?-s(?P<seed>\d+)$")


def parse_run(name: str) -> dict:
    match = NAME.match(name)
    if match is None:
        raise ValueError(f"run name {name!r} is not METHOD[-rR][-kK][-aALPHA][-lrLR]-sSEED (e.g. rasa-r8-s0, "
                         "rasa-r8-a16-s0, rasa-r8-lr1e-3-s0, fft-s0)")
    keys = {"method": match["method"], "seed": int(match["seed"])}
    keys.update(METHOD_KEYS.get(keys["method"], {}))
    if match["r"]:
        keys["r"] = int(match["r"])
    if match["k"]:
        keys["rasa_k"] = int(match["k"])
    if match["alpha"]:
        keys["alpha"] = float(match["alpha"])
    if match["lr"]:
        keys["learning_rate"] = float(match["lr"])
    return keys


def train_command(name: str, base_model: str | None, data_dir: Path, root: Path, extra: list[str]) -> list[str]:
    out = root / name
    command = [sys.executable, "-m", "rasa_lora.cli", "train", str(RECIPE), "--output-dir", str(out),
               "--dataset", str(data_dir / "gsm8k" / "train.jsonl"), "--progress-bar", "false"]
    if base_model:
        command += ["--base-model", base_model]
    for key, value in parse_run(name).items():
        command += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        command.append("--resume")
    elif out.exists():
        command.append("--overwrite")  # started but nothing resumable: start again
    return command + extra


def _status(out: Path) -> str:
    if (out / "summary.json").is_file():
        return "done"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()] if (out / "metrics.jsonl").is_file() else []
    steps = [row for row in rows if "loss" in row]
    if not steps:
        return "not started"
    return f"step {steps[-1]['step']} ({steps[-1]['epoch']:.2f} epochs), {steps[-1]['tokens_per_s']:.0f} tok/s"


def run_parallel(jobs: list[tuple[str, list[str], Path]], parallel: int, time_limit: float, threads: int) -> dict:
    """Start `jobs` (name, command, log file) `parallel` at a time; at `time_limit` seconds SIGTERM what runs.
    Returns name -> exit code (None: never started)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    pending, running, codes = list(jobs), {}, {name: None for name, _, _ in jobs}
    stopping = False
    while pending or running:
        if stopping:
            pending = []  # past the time limit nothing new starts: those jobs keep exit code None
        while pending and len(running) < parallel:
            name, command, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("a")
            handle.write(f"\n$ {' '.join(command)}\n")
            handle.flush()
            running[name] = (subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                              cwd=REPO), handle)
        for name, (process, handle) in list(running.items()):
            if process.poll() is not None:
                codes[name] = process.returncode
                handle.close()
                del running[name]
                print(f"[{time.monotonic() - started:6.0f} s] {name}: exit {process.returncode}", flush=True)
        if not stopping and time.monotonic() - started > time_limit:
            stopping = True
            print(f"[{time.monotonic() - started:6.0f} s] time limit: SIGTERM to {', '.join(running) or 'none'}",
                  flush=True)
            for process, _ in running.values():
                process.send_signal(signal.SIGTERM)
        time.sleep(1)
    return codes


def cmd_train(args) -> int:
    root = Path(args.root)
    names = [name for name in args.runs.split(",") if name]
    todo = [name for name in names if not (root / name / "summary.json").is_file()]
    jobs = [(name, train_command(name, args.base_model, Path(args.data_dir), root, args.extra),
             root / "logs" / f"{name}.train.log") for name in todo]
    run_parallel(jobs, args.jobs, args.time_limit, args.threads)
    print(f"\n{'run':<16} status")
    for name in names:
        print(f"{name:<16} {_status(root / name)}")
    return 0


def adapters_of(out: Path) -> list[tuple[int, Path]]:
    """(epoch, adapter or model folder) to evaluate: each kept epoch adapter, else the final one (epoch = all)."""
    found = sorted((int(p.name[6:]), p) for p in (out / "epochs").glob("epoch-*") if p.name[6:].isdigit()
                   and (p / "adapter_config.json").is_file())
    summary = out / "summary.json"
    if not found and summary.is_file():
        from rasa_lora.train.config import read_run_recipe  # a full fine-tune's config.json is its model's

        config = read_run_recipe(out)
        found = [(int(round(float(config["epochs"]))), out)]
    return found


TASKS = ("gsm8k", *MC_TASKS)
STOP = ["### Instruction"]  # a GSM8K generation ends at EOS or where the model starts a new Alpaca turn
MC_BATCH = 64


def parse_limits(text: str | None) -> dict[str, int]:
    """`--limit`: N (every task's first N items) or TASK=N,... (those tasks only)."""
    if not text:
        return {}
    if "=" not in text:
        return dict.fromkeys(TASKS, int(text))
    limits = {}
    for part in filter(None, text.split(",")):
        task, _, count = part.partition("=")
        if task not in TASKS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--limit {text!r}: give N or TASK=N,... with TASK one of {', '.join(TASKS)}")
        limits[task] = int(count)
    return limits


def parse_tasks(text: str) -> list[str]:
    tasks = [task for task in text.split(",") if task]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks {text!r}: choose from {', '.join(TASKS)} (comma-separated)")
    return tasks


def task_limit(task: str, limits: dict[str, int]) -> int | None:
    """The first N items of `task` the study scores: `--limit`, and at most 1,000 for HellaSwag."""
    return min(filter(None, (limits.get(task), MC_LIMIT.get(task))), default=None)


def _read_rows(path: Path) -> dict[str, dict]:
    """JSONL rows by id; a torn last line (a process killed mid-write) is skipped and redone."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["id"]] = row
    return rows


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text)
    os.replace(staging, path)


def task_done(out: Path, task: str, items: list[dict]) -> bool:
    """Whether `out` holds `task`'s finished outputs for exactly these items."""
    if task == "gsm8k":
        target = out / "gsm8k" / "generations.jsonl"
        return target.is_file() and list(_read_rows(target)) == [item["id"] for item in items]
    summary = out / task / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("items") == len(items)


def generate_gsm8k(model, tokenizer, items: list[dict], out: Path, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy GSM8K generations with the training prompt, cut at `STOP`, into out/gsm8k/generations.jsonl (in item
    order; scored elsewhere). Prompts are sorted by length (longest first) and generated `batch_size` at a time,
    the batches `generate_transformers` makes of the whole list; each batch is appended to
    generations.partial.jsonl as it ends, so a process stopped by a time limit loses at most the batch it was in.
    Returns the timing: seconds, decoding steps (ms a step: a 135M model's step is host-bound on a GPU, so it
    stays flat as the batch grows until the GPU is busy), generated tokens (finished rows excluded), batches."""
    import torch

    from rasa_lora.evaluation.generation import generate_transformers
    from rasa_lora.evaluation.tasks import math_prompt

    target = out / "gsm8k" / "generations.jsonl"
    partial = target.with_name("generations.partial.jsonl")
    target.parent.mkdir(parents=True, exist_ok=True)
    prompts = [math_prompt(item["question"]) for item in items]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))  # generate_transformers' order
    done = {key: row["generation"] for key, row in _read_rows(partial).items()}
    counts = {"tokens": 0, "steps": 0}

    started, batches = time.perf_counter(), 0

    def count(running: int) -> None:  # called after each decoding step with the rows still running
        counts["tokens"] += running
        counts["steps"] += 1
        if counts["steps"] % 50 == 0:  # the pace reaches the log even when a time limit cuts the batch
            print(f"gsm8k: {counts['steps']} decoding steps, {running} rows running, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)

    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        if all(items[i]["id"] in done for i in batch):
            continue
        texts = generate_transformers(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, 0.0, 1,
                                      batch_size, stop=STOP, on_tokens=count)
        rows = [{"id": items[i]["id"], "generation": text[0]} for i, text in zip(batch, texts)]
        with partial.open("a") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
        done.update((row["id"], row["generation"]) for row in rows)
        batches += 1
        print(f"gsm8k: batch of {len(batch)} done, {first + len(batch)}/{len(order)} prompts, "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    for stale in ("summary.json", "records.jsonl", "disagreements.md"):  # `score`'s verdicts of other generations
        (target.parent / stale).unlink(missing_ok=True)
    _write_atomic(target, "".join(json.dumps({"id": item["id"], "generation": done[item["id"]]}) + "\n"
                                  for item in items))
    partial.unlink(missing_ok=True)
    return {"seconds": round(seconds, 2), "items": len(items), "batches": batches, "steps": counts["steps"],
            "ms_per_step": round(1e3 * seconds / max(counts["steps"], 1), 2), "generated_tokens": counts["tokens"],
            "tokens_per_s": round(counts["tokens"] / max(seconds, 1e-9), 1), "batch_size": batch_size,
            "max_new_tokens": max_new_tokens}


def score_mc(model, tokenizer, task: str, items: list[dict], out: Path, limit: int | None, label: dict,
             encode_cache: dict | None = None) -> dict:
    """A multiple-choice task scored in this process with `rasa-lora eval`'s own function (records.jsonl, then
    summary.json with acc / acc_norm); returns the timing. `encode_cache` keeps the items' tokens across adapters."""
    from rasa_lora.evaluation.cli import score_choice_task

    started = time.perf_counter()
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    metrics = score_choice_task(model, tokenizer, items, folder / "records.jsonl", MC_BATCH, task, encode_cache)
    seconds = time.perf_counter() - started
    summary = {"task": task, **label, "limit": limit, "items": len(items), **metrics,
               "batch_size": MC_BATCH, "seconds": round(seconds, 2),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": "benchmarks/replication.py generate-one (rasa-lora eval's score_choice_task)"}
    _write_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    return {"seconds": round(seconds, 2), "items": len(items), **metrics}


def evaluate_work(base_model: str | None, work: list[dict], data_dir: Path, tasks: list[str],
                  limits: dict[str, int], max_new_tokens: int, batch_size: int) -> list[dict]:
    """Evaluate every entry of `work` ({name, adapter, model, out}) in this process, loading the base model once.

    Per entry: a copy of the loaded base gets the adapter (`model`: a full model instead, e.g. a full fine-tune),
    the multiple-choice tasks are scored on the PEFT model, then the adapter is merged (exact; plain weights
    generate faster) and GSM8K is generated; the copy is dropped. This is what `rasa-lora eval TASK --adapter A`
    and the earlier one-process-per-adapter stage computed. Each entry's outputs are written as they finish, with
    out/timing.json; finished tasks are skipped, so a rerun continues. Returns the timing records; an entry that
    fails gets {name, error} (its traceback printed) and the next one goes on."""
    import copy

    import torch

    from rasa_lora.evaluation.cli import attach_adapter, load_model_and_tokenizer
    from rasa_lora.evaluation.tasks import load_task

    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    items = {task: load_task(task, data_dir, task_limit(task, limits)) for task in tasks}
    loaded: dict = {}  # the base model's name -> (model, tokenizer): the one base this process keeps
    encode_caches: dict = {}  # model name -> the multiple-choice items' tokens (the same for every adapter)
    records = []
    for entry in work:
        out = Path(entry["out"])
        todo = [task for task in tasks if not task_done(out, task, items[task])]
        if not todo:
            continue
        try:
            started = time.perf_counter()
            timing: dict = {"name": entry["name"], "adapter": entry.get("adapter"), "model": entry.get("model"),
                            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
                            "threads": torch.get_num_threads(), "tasks": {}}
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if entry.get("model"):  # a full model: loaded for this entry only
                model, tokenizer = load_model_and_tokenizer(entry["model"], None, dtype, device)
                timing["load_s"] = round(time.perf_counter() - started, 2)
            else:
                if base_model not in loaded:
                    loaded = {base_model: load_model_and_tokenizer(base_model, None, dtype, device)}
                    timing["load_s"] = round(time.perf_counter() - started, 2)
                base, tokenizer = loaded[base_model]
                model = base
                if entry.get("adapter"):
                    attached = time.perf_counter()
                    model = attach_adapter(copy.deepcopy(base), entry["adapter"], base_model)
                    timing["attach_s"] = round(time.perf_counter() - attached, 2)
            label = {"model": entry.get("model") or base_model or "smollm2 (embedded SmolLM2-135M-Instruct)",
                     "adapter": entry.get("adapter")}
            for task in (task for task in todo if task != "gsm8k"):
                timing["tasks"][task] = score_mc(model, tokenizer, task, items[task], out, task_limit(task, limits),
                                                 label, encode_caches.setdefault(entry.get("model") or base_model, {}))
            if "gsm8k" in todo:
                if entry.get("adapter") and hasattr(model, "merge_and_unload"):
                    merging = time.perf_counter()
                    model = model.merge_and_unload()  # plain weights generate faster; the merge is exact
                    timing["merge_s"] = round(time.perf_counter() - merging, 2)
                timing["tasks"]["gsm8k"] = generate_gsm8k(model, tokenizer, items["gsm8k"], out, max_new_tokens,
                                                          batch_size)
                _write_atomic(out / "gsm8k" / "generation.json", json.dumps(
                    {**timing["tasks"]["gsm8k"], **label, "base_model": base_model}, indent=2) + "\n")
            del model
            if device == "cuda":
                timing["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.empty_cache()
            timing["total_s"] = round(time.perf_counter() - started, 2)
            _write_atomic(out / "timing.json", json.dumps(timing, indent=2) + "\n")
            print(f"{entry['name']}: " + ", ".join(f"{task} {value['seconds']:.1f} s" for task, value in
                                                   timing["tasks"].items()) + f"; {timing['total_s']:.1f} s in all",
                  flush=True)
        except Exception as error:  # one bad adapter (a mismatch, out of memory) must not cost the others
            traceback.print_exc()
            print(f"{entry['name']}: failed ({type(error).__name__}: {error}); going on with the next", flush=True)
            timing = {"name": entry["name"], "error": f"{type(error).__name__}: {error}"}
        records.append(timing)
    return records


def cmd_generate_one(args) -> int:
    if args.work:
        work = json.loads(Path(args.work).read_text())
    else:
        work = [{"name": args.adapter or "base", "adapter": args.adapter, "model": None, "out": args.out}]
    records = evaluate_work(args.base_model, work, Path(args.data_dir), parse_tasks(args.tasks),
                            parse_limits(args.limit), args.max_new_tokens, args.batch_size)
    failed = [record["name"] for record in records if "error" in record]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def work_list(root: Path, runs: list[str] | None = None) -> list[dict]:
    """What `generate` evaluates: the base model (`base`), then every run's epoch adapters (or its final model, for
    a full fine-tune); `runs` keeps those run names only (`base` among them for the base model)."""
    work = [{"name": "base", "adapter": None, "model": None, "out": str(root / "base" / "eval" / "epoch-0")}]
    for out in sorted(p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)):
        for epoch, adapter in adapters_of(out):
            entry = {"name": f"{out.name}@{epoch}", "adapter": str(adapter), "model": None,
                     "out": str(out / "eval" / f"epoch-{epoch}")}
            if parse_run(out.name)["method"] == "fft":  # a full fine-tune is a model, not an adapter
                entry.update(adapter=None, model=str(adapter))
            work.append(entry)
    if runs is not None:
        unknown = set(runs) - {entry["name"].split("@")[0] for entry in work}
        if unknown:
            print(f"no trained run (or nothing to evaluate) named {', '.join(sorted(unknown))} under {root}",
                  file=sys.stderr)
        work = [entry for entry in work if entry["name"].split("@")[0] in runs]
    return work


def cmd_generate(args) -> int:
    from rasa_lora.evaluation.tasks import load_task

    root = Path(args.root)
    tasks, limits = parse_tasks(args.tasks), parse_limits(args.limit)
    work = work_list(root, [name for name in args.runs.split(",") if name] if args.runs else None)
    items = {task: load_task(task, Path(args.data_dir), task_limit(task, limits)) for task in tasks}
    todo = [entry for entry in work if not all(task_done(Path(entry["out"]), task, items[task]) for task in tasks)]
    print(f"{len(todo)} adapters to evaluate ({len(work) - len(todo)} done), tasks {', '.join(tasks)}", flush=True)
    # fewer processes than asked when there is less work; each loads the base model once and takes its share
    shares = [todo[i::args.jobs] for i in range(min(args.jobs, len(todo)))]
    jobs = []
    for index, share in enumerate(shares):
        work_file = root / "logs" / f"generate-{index}.json"
        _write_atomic(work_file, json.dumps(share, indent=1) + "\n")
        command = [sys.executable, str(Path(__file__).resolve()), "generate-one", "--work", str(work_file),
                   "--data-dir", args.data_dir, "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                   str(args.batch_size), "--tasks", ",".join(tasks)] + (["--limit", args.limit] if args.limit else [])
        command += ["--base-model", args.base_model] if args.base_model else []
        jobs.append((f"generate-{index} ({len(share)} adapters)", command, root / "logs" / f"generate-{index}.log"))
    codes = run_parallel(jobs, args.jobs, args.time_limit, args.threads)
    failed = [name for name, code in codes.items() if code not in (0, None)]
    print(f"failed: {', '.join(failed) or 'none'}")
    print(f"\n{'adapter':<24} {'state':<10} seconds by task (gsm8k: generated tokens/s)")
    for entry in work:
        timing = _read_json(Path(entry["out"]) / "timing.json")
        done = all(task_done(Path(entry["out"]), task, items[task]) for task in tasks)
        cells = ", ".join(f"{task} {value['seconds']:.0f}" + (f" ({value['tokens_per_s']:.0f} tok/s)"
                                                                if task == "gsm8k" else "")
                          for task, value in (timing or {}).get("tasks", {}).items())
        print(f"{entry['name']:<24} {'done' if done else 'not done':<10} {cells or '-'}")
    return 0


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cmd_analyze(args) -> int:
    """Figs. 2-3 on the real deltas of the full fine-tune: `rasa-lora analyze BASE TUNED` at the study's r."""
    from rasa_lora.cli import main as cli_main

    tuned = Path(args.root) / args.fft_run
    if not (tuned / "summary.json").is_file():
        print(f"{tuned} has not finished training; run the train stage first", file=sys.stderr)
        return 2
    out = Path(args.root) / args.fft_run / "analysis"
    base = args.base_model or "smollm2"
    return cli_main(["analyze", base, str(tuned), "--r", "8", "--rasa-k", "1", "--iters", str(args.iters),
                     "--out", str(out)])


SMALL = re.compile(r"(config|summary|generation|timing|analysis|reproduce)\.json$|metrics\.jsonl$|records\.jsonl$|"
                   r"generations(\.partial)?\.jsonl$|\.log$|\.png$")  # partial: the batches a time limit let finish


def cmd_pack(args) -> int:
    root = Path(args.root)
    files = [p for p in root.rglob("*") if p.is_file() and SMALL.search(p.name)
             and "checkpoints" not in p.parts and p.stat().st_size < 8_000_000]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w:gz") as archive:
        for path in files:
            archive.add(path, arcname=str(path.relative_to(root.parent)))
    print(f"packed {len(files)} files into {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_score(args) -> int:
    """GSM8K verdicts of every generations.jsonl under ROOT (the GPU machine has no math-verify)."""
    from rasa_lora.cli import main as cli_main

    for generations in sorted(Path(args.root).rglob("gsm8k/generations.jsonl")):
        if (generations.parent / "summary.json").is_file():
            continue
        count = len(generations.read_text().splitlines())  # the first N items (all, unless a dry run)
        code = cli_main(["eval", "gsm8k", "--completions", str(generations), "--output-dir",
                         str(generations.parent), "--data-dir", args.data_dir, "--workers", str(args.workers),
                         "--limit", str(count)])
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=str(ROOT), help="the study's runs (default runs/replication)")
    common.add_argument("--base-model", default=None, help="default: the embedded SmolLM2 (here); a .gguf there")
    common.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    common.add_argument("--jobs", type=int, default=7, help="processes side by side")
    common.add_argument("--threads", type=int, default=1, help="torch threads a process")
    common.add_argument("--time-limit", type=float, default=540, help="seconds, then SIGTERM")
    train = sub.add_parser("train", parents=[common])
    train.add_argument("--runs", required=True, help="comma-separated run names, e.g. lora-r8-s0,rasa-r8-s0")
    train.add_argument("extra", nargs=argparse.REMAINDER, help="more recipe keys after --, for every run")
    for name in ("generate", "generate-one"):
        stage = sub.add_parser(name, parents=[common])
        stage.add_argument("--max-new-tokens", type=int, default=400)
        stage.add_argument("--batch-size", type=int, default=1319,
                           help="GSM8K prompts generated together (default: all 1,319 in one batch, KV cache "
                                "<= 17.7 GiB; the step is the host's, so one batch is cheapest: docs/replication.md)")
        stage.add_argument("--limit", default=None,
                           help="N: the first N items of each task (a dry run, a timing); or TASK=N,...")
        stage.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
        if name == "generate":
            stage.add_argument("--runs", default=None,
                               help="comma-separated run names to evaluate (all epochs; `base`: the base model); "
                                    "default every run under --root and the base model")
        else:
            stage.add_argument("--adapter", default=None, help="one adapter (none: the base model) ...")
            stage.add_argument("--out", default=None, help="... and its output folder")
            stage.add_argument("--work", default=None,
                               help="or a JSON list of {name, adapter, model, out}, evaluated in this process")
    analyze = sub.add_parser("analyze", parents=[common])
    analyze.add_argument("--fft-run", default="fft-s0")
    analyze.add_argument("--iters", type=int, default=20)
    pack = sub.add_parser("pack", parents=[common])
    pack.add_argument("--out", required=True)
    score = sub.add_parser("score", parents=[common])
    score.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    if args.stage in ("generate", "generate-one"):
        try:
            parse_tasks(args.tasks), parse_limits(args.limit)
        except ValueError as error:
            parser.error(str(error))
        if args.stage == "generate-one" and not (args.work or args.out):
            parser.error("generate-one needs --out (with --adapter, or none for the base model) or --work FILE")
    stages = {"train": cmd_train, "generate": cmd_generate, "generate-one": cmd_generate_one,
              "analyze": cmd_analyze, "pack": cmd_pack, "score": cmd_score}
    return stages[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
