"""The replication study (issue 20): does RaSA beat LoRA? `docs/replication.md` has the question and the answer.

Runs the grid of `configs/replication/gsm8k-smollm2.yaml` (SmolLM2-135M-Instruct on GSM8K) on one GPU, several
trainings side by side (a 135M model's step is host-bound, so each process keeps one core busy), then generates
and scores what the paper measures. Every stage is resumable: a rerun skips what is done and continues what was
interrupted, so the grid can span several 10-minute sittings of a rented GPU.

Stages (GPU machine: `train`, `generate`, `analyze`, `pack`; here: `score`):
  python3 benchmarks/replication.py train --runs lora-r8-s0,rasa-r8-s0 --base-model /tmp/smollm2.gguf \\
      --data-dir .data --jobs 7 --time-limit 540
  python3 benchmarks/replication.py generate --base-model /tmp/smollm2.gguf --data-dir .data --jobs 8
  python3 benchmarks/replication.py analyze --base-model /tmp/smollm2.gguf      # Figs. 2-3 on the fft run's deltas
  python3 benchmarks/replication.py pack --out $OUT/replication.tar.gz           # the small files, to bring back
  python3 benchmarks/replication.py score --root benchmarks/results/replication  # GSM8K verdicts (math-verify)
Then `python3 benchmarks/replication_report.py` writes the tables and figures of docs/replication.md.

Run names: `{method}-r{r}-s{seed}` (lora, rasa, vera), `fft-s{seed}`. The study's own choices (global batch 32,
2 epochs in the first sitting, no gradient checkpointing, 500 held-out examples) are in the recipe's header.
`time-limit` sends SIGTERM to trainings still running at the limit: the trainer checkpoints and exits 143.
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
        config = json.loads((out / "config.json").read_text())
        found = [(int(round(float(config["epochs"]))), out)]
    return found


def generate_one(base_model: str | None, adapter: str | None, data_dir: Path, out: Path, max_new_tokens: int,
                 batch_size: int, limit: int | None = None) -> None:
    """GSM8K test generations (greedy, the training prompt) of one adapter, then the multiple-choice tasks
    (scored here: they need no checker). Generations go to out/gsm8k/generations.jsonl, scored elsewhere."""
    import torch

    from rasa_lora.evaluation.cli import load_model_and_tokenizer
    from rasa_lora.evaluation.generation import generate_transformers
    from rasa_lora.evaluation.tasks import load_task, math_prompt

    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    target = out / "gsm8k" / "generations.jsonl"
    items = load_task("gsm8k", data_dir, limit)
    if not (target.is_file() and len(target.read_text().splitlines()) == len(items)):
        model, tokenizer = load_model_and_tokenizer(base_model, adapter, dtype, device)
        if adapter is not None and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # plain weights generate faster; the merge is exact
        started = time.perf_counter()
        texts = generate_transformers(model, tokenizer, [math_prompt(item["question"]) for item in items],
                                      max_new_tokens, 0.0, 1, batch_size, stop=["### Instruction"])
        seconds = time.perf_counter() - started
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_text("".join(json.dumps({"id": item["id"], "generation": text[0]}) + "\n"
                                   for item, text in zip(items, texts)))
        partial.rename(target)
        (target.parent / "generation.json").write_text(json.dumps(
            {"seconds": round(seconds, 1), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
             "adapter": adapter, "base_model": base_model}, indent=2) + "\n")
        del model
        torch.cuda.empty_cache()
    for task in MC_TASKS:
        if (out / task / "summary.json").is_file():
            continue
        command = ["eval", task, "--data-dir", str(data_dir), "--output-dir", str(out / task), "--dtype", dtype,
                   "--batch-size", "64", "--device", device]
        command += ["--model", base_model] if base_model else []
        command += ["--adapter", adapter] if adapter else []
        task_limit = min(filter(None, (limit, MC_LIMIT.get(task))), default=None)
        command += ["--limit", str(task_limit)] if task_limit else []
        from rasa_lora.cli import main as cli_main

        if cli_main(command) != 0:
            raise RuntimeError(f"rasa-lora {' '.join(command)} failed")


def cmd_generate_one(args) -> int:
    generate_one(args.base_model, args.adapter, Path(args.data_dir), Path(args.out), args.max_new_tokens,
                 args.batch_size, args.limit)
    return 0


def cmd_generate(args) -> int:
    root = Path(args.root)
    jobs = []
    base_out = root / "base" / "eval" / "epoch-0"
    work = [("base", None, base_out)]
    for out in sorted(p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)):
        for epoch, adapter in adapters_of(out):
            if parse_run(out.name)["method"] == "fft":
                work.append((f"{out.name}@{epoch}", "MODEL:" + str(adapter), out / "eval" / f"epoch-{epoch}"))
            else:
                work.append((f"{out.name}@{epoch}", str(adapter), out / "eval" / f"epoch-{epoch}"))
    for name, adapter, out in work:
        done = (out / "gsm8k" / "generations.jsonl").is_file() and all(
            (out / task / "summary.json").is_file() for task in MC_TASKS)
        if done:
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "generate-one", "--data-dir", args.data_dir,
                   "--out", str(out), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                   str(args.batch_size)] + (["--limit", str(args.limit)] if args.limit else [])
        if adapter and adapter.startswith("MODEL:"):
            command += ["--base-model", adapter[6:]]  # a full fine-tune is a model, not an adapter
        else:
            command += ["--base-model", args.base_model] if args.base_model else []
            command += ["--adapter", adapter] if adapter else []
        jobs.append((name, command, out / "generate.log"))
    print(f"{len(jobs)} adapters to evaluate ({len(work) - len(jobs)} done)", flush=True)
    codes = run_parallel(jobs, args.jobs, args.time_limit, args.threads)
    failed = [name for name, code in codes.items() if code not in (0, None)]
    print(f"failed: {', '.join(failed) or 'none'}")
    return 0


def cmd_analyze(args) -> int:
    """Figs. 2-3 on the real deltas of the full fine-tune: `rasa-lora analyze BASE TUNED` at the study's r."""
    from rasa_lora.cli import main as cli_main

    tuned = Path(args.root) / args.fft_run
    if not (tuned / "summary.json").is_file():
        print(f"{tuned} has not finished training; run the train stage first", file=sys.stderr)
        return 2
    out = Path(args.root) / args.fft_run / "analysis"
    base = args.base_model or "smollm2"
    return cli_main(["analyze", base, str(tuned), "--r", "8", "--k", "1", "--iters", str(args.iters),
                     "--out", str(out)])


SMALL = re.compile(r"(config|summary|generation|analysis|reproduce)\.json$|metrics\.jsonl$|records\.jsonl$|"
                   r"generations\.jsonl$|\.log$|\.png$")


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
        stage.add_argument("--batch-size", type=int, default=384)
        stage.add_argument("--limit", type=int, default=None, help="first N items of each task (a dry run)")
        if name == "generate-one":
            stage.add_argument("--adapter", default=None)
            stage.add_argument("--out", required=True)
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
    stages = {"train": cmd_train, "generate": cmd_generate, "generate-one": cmd_generate_one,
              "analyze": cmd_analyze, "pack": cmd_pack, "score": cmd_score}
    return stages[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
