"""`rasa-lora reproduce CONFIG.yaml [--key value ...]`: one of the paper's runs end to end, in one command.

Trains with the recipe (exactly `rasa-lora train CONFIG.yaml ...`), then evaluates the result as the paper did: the
domain's test set (MATH for a math run, HumanEval+ with 50 samples at temperature 0.2 for a code run) and the three
forgetting benchmarks (ARC-Challenge, HellaSwag, WinoGrande), each through `rasa-lora eval`, and writes
`OUTPUT_DIR/reproduce.json` and `reproduce.md`: every headline metric beside the paper's figure for the same run
where the paper reports one (Tables 1 and 2, "LAST": after the final epoch, which is what a run here ends with).

Interrupted at any point, the same command goes on: a finished training (its `summary.json`) is not redone, an
interrupted one resumes from its newest checkpoint, and each benchmark skips the items it has already scored.

Options of this command (the others are the recipe's, as for `rasa-lora train`):
  --eval-tasks a,b,...     instead of the domain's (needed when the recipe's data is neither MetaMathQA nor Magicoder)
  --eval-limit N           the first N items of each benchmark (a quick look; the paper's figures are for all)
  --eval-data DIR          the benchmarks' files, in the layout of shared/data (default: ../shared/data or the hub)
  --eval-batch-size N      generation / scoring batch (default 16)
  --n-samples N            code: samples per problem (paper: 50)
  --max-new-tokens N       generation length (default 2048 for math, 512 for code)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FORGETTING = ("arc_challenge", "hellaswag", "winogrande")
DOMAINS = {"metamathqa": "math", "magicoder": "code"}  # dataset_format -> domain
DOMAIN_TASK = {"math": "math", "code": "humaneval+"}
# headline metrics by kind of task (lm-eval's choice for the multiple-choice ones: WinoGrande's is plain accuracy)
HEADLINE = {"math": ("accuracy",), "code": ("pass@1", "pass@10"), "choice": ("acc_norm",), "winogrande": ("acc",)}

_MODELS = {"meta-llama/Llama-3.1-8B": "llama", "mistralai/Mistral-7B-v0.3": "mistral"}
# The paper's LAST figures (%) for the methods `rasa-lora train` runs: (model, domain, method, r) -> {metric: value}.
# Table 1 (HumanEval+, PASS@1 and PASS@10) and Table 2 (MATH accuracy); tests/train/test_reproduce.py reads them
# back from the paper's text.
PAPER_LAST: dict[tuple[str, str, str, int], dict[str, float]] = {
    **{("llama", "code", method, r): {"pass@1": p1, "pass@10": p10} for method, r, p1, p10 in (
        ("vera", 1024, 48.8, 64.2), ("lora", 8, 53.0, 68.5), ("rasa", 8, 56.9, 69.6), ("lora", 16, 53.4, 67.6),
        ("rasa", 16, 56.4, 68.1), ("lora", 32, 56.9, 69.2), ("rasa", 32, 56.2, 71.4))},
    **{("mistral", "code", method, r): {"pass@1": p1, "pass@10": p10} for method, r, p1, p10 in (
        ("vera", 1024, 39.5, 54.4), ("lora", 8, 39.7, 54.8), ("rasa", 8, 49.0, 64.2), ("lora", 16, 40.6, 54.9),
        ("rasa", 16, 51.3, 63.7), ("lora", 32, 44.4, 57.0), ("rasa", 32, 55.7, 65.7))},
    **{("llama", "math", method, r): {"accuracy": acc} for method, r, acc in (
        ("vera", 1024, 25.6), ("lora", 8, 26.7), ("rasa", 8, 29.1), ("lora", 16, 27.1), ("rasa", 16, 29.8),
        ("lora", 32, 27.2), ("rasa", 32, 29.6), ("olora", 8, 27.8), ("olora", 16, 28.4), ("olora", 32, 28.7),
        ("adalora", 8, 28.9), ("adalora", 16, 29.4), ("adalora", 32, 29.4))},
    **{("mistral", "math", method, r): {"accuracy": acc} for method, r, acc in (
        ("vera", 1024, 19.4), ("lora", 8, 19.2), ("rasa", 8, 23.8), ("lora", 16, 19.5), ("rasa", 16, 25.1),
        ("lora", 32, 20.4), ("rasa", 32, 25.1), ("olora", 8, 22.5), ("olora", 16, 22.2), ("olora", 32, 23.5),
        ("adalora", 8, 21.6), ("adalora", 16, 23.2), ("adalora", 32, 23.5))},
}
_OWN = {"--eval-tasks": "tasks", "--eval-limit": "limit", "--eval-data": "data_dir", "--eval-batch-size": "batch_size",
        "--n-samples": "n_samples", "--max-new-tokens": "max_new_tokens"}


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(this command's options, the recipe's arguments for `rasa-lora train`)."""
    own, rest, i = {}, [], 0
    while i < len(argv):
        flag, value = argv[i].split("=", 1) if argv[i].startswith("--") and "=" in argv[i] else (argv[i], None)
        if flag in _OWN:
            if value is None:
                if i + 1 >= len(argv):
                    raise ValueError(f"{flag} needs a value")
                value, i = argv[i + 1], i + 1
            own[_OWN[flag]] = value
        else:
            rest.append(argv[i])
        i += 1
    return own, rest


def check_options(own: dict[str, str]) -> None:
    """Bad evaluation options are refused before training, not hours later."""
    for key in ("limit", "batch_size", "n_samples", "max_new_tokens"):
        if key in own and not (own[key].isdigit() and int(own[key]) >= 1):
            flag = next(flag for flag, name in _OWN.items() if name == key)
            raise ValueError(f"{flag} must be a positive integer, not {own[key]!r}")
    if "data_dir" in own and not Path(own["data_dir"]).is_dir():
        raise FileNotFoundError(f"--eval-data {own['data_dir']!r} is not a folder (the layout of shared/data)")


def eval_tasks(config, requested: str | None) -> list[str]:
    """The benchmarks of a run: the domain's test set and the forgetting benchmarks, or those requested."""
    from rasa_lora.evaluation.tasks import TASKS

    if requested:
        tasks = [t.strip() for t in requested.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--eval-tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        return tasks
    domain = DOMAINS.get(config.dataset_format)
    if domain is None:
        raise ValueError(f"dataset_format {config.dataset_format!r} names no domain of the paper (metamathqa: math, "
                         "magicoder: code); set it in the recipe, or choose benchmarks with --eval-tasks, e.g. "
                         "--eval-tasks gsm8k,arc_challenge")
    return [DOMAIN_TASK[domain], *FORGETTING]


def paper_figures(config) -> dict[str, float]:
    """The paper's LAST figures for this recipe's run ({} when the paper has none for it)."""
    model = _MODELS.get(str(config.base_model))
    domain = DOMAINS.get(config.dataset_format)
    return PAPER_LAST.get((model, domain, config.method, config.r), {}) if model and domain else {}


def headline(task: str, summary: dict) -> dict[str, float]:
    """The metrics a benchmark is reported by (math: math-verify accuracy; code: pass@1, pass@10; ARC-Challenge and
    HellaSwag: length-normalised accuracy; WinoGrande: accuracy)."""
    from rasa_lora.evaluation.tasks import task_spec

    keys = HEADLINE.get(task) or HEADLINE[task_spec(task).kind]
    return {key: summary[key] for key in keys if key in summary}


def report(config, results: dict[str, dict]) -> tuple[dict, str]:
    """reproduce.json's content and reproduce.md's table: each benchmark's headline metrics beside the paper's."""
    paper = paper_figures(config)
    rows, lines = [], [f"# {config.method} r={config.r} on {config.base_model or 'smollm2'} "
                       f"({config.dataset or 'arithmetic'})", "",
                       "| benchmark | metric | this run (%) | paper, LAST (%) | difference (points) |",
                       "| --- | --- | --- | --- | --- |"]
    for task, summary in results.items():
        for metric, value in headline(task, summary).items():
            ours = 100 * value
            theirs = paper.get(metric) if task == DOMAIN_TASK.get(DOMAINS.get(config.dataset_format)) else None
            rows.append({"task": task, "metric": metric, "value": ours, "paper_last": theirs, "items": summary["items"],
                         "limit": summary.get("limit")})
            diff = f"{ours - theirs:+.1f}" if theirs is not None else "-"
            lines.append(f"| {task} ({summary['items']} items) | {metric} | {ours:.1f} | "
                         f"{theirs if theirs is not None else '-'} | {diff} |")
    if any(r["limit"] for r in rows):
        lines += ["", "Limited to the first items of each benchmark (--eval-limit): not comparable with the paper."]
    return {"method": config.method, "r": config.r, "base_model": config.base_model, "dataset": config.dataset,
            "results": rows}, "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from rasa_lora.evaluation.cli import main as eval_main
    from rasa_lora.train import checkpoint
    from rasa_lora.train.cli import _values
    from rasa_lora.train.cli import main as train_main
    from rasa_lora.train.config import build_config

    try:
        own, train_argv = split_args(argv)
        check_options(own)
        config = build_config(_values(train_argv))
        tasks = eval_tasks(config, own.get("tasks"))
    except (ValueError, FileNotFoundError) as error:
        print(f"rasa-lora reproduce: error: {error}", file=sys.stderr)
        return 2
    out = Path(config.output_dir)
    if (out / "summary.json").is_file():
        print(f"rasa-lora reproduce: {out} holds a finished training run; evaluating it", file=sys.stderr)
    else:
        resume = checkpoint.checkpoint_dirs(out) if out.is_dir() else []
        code = train_main([*train_argv, "--resume"] if resume and "--resume" not in train_argv else train_argv)
        if code:
            return code
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-process training: the main process evaluates
        return 0
    import torch

    model, adapter = (str(out), None) if config.method == "fft" else (config.base_model, str(out))
    results = {}
    for task in tasks:
        task_argv = [task, "--adapter", adapter] if adapter else [task]
        task_argv += ["--output-dir", str(out / "eval" / task),
                      "--dtype", "bfloat16" if torch.cuda.is_available() else "float32"]
        if model:
            task_argv += ["--model", model]
        for key, flag in (("limit", "--limit"), ("data_dir", "--data-dir"), ("batch_size", "--batch-size"),
                          ("n_samples", "--n-samples"), ("max_new_tokens", "--max-new-tokens")):
            if key in own:
                task_argv += [flag, own[key]]
        code = eval_main(task_argv)
        if code:
            return code
        results[task] = json.loads((out / "eval" / task / "summary.json").read_text())
    content, table = report(config, results)
    (out / "reproduce.json").write_text(json.dumps(content, indent=2) + "\n")
    (out / "reproduce.md").write_text(table)
    print(table)
    print(f"results: {out / 'reproduce.md'}  {out / 'reproduce.json'}  per benchmark: {out / 'eval'}")
    return 0
