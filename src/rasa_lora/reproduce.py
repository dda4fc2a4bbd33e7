"""`rasa-lora reproduce CONFIG.yaml [--key value ...]`: one of the paper's runs end to end, in one command.

Trains with the recipe (exactly `rasa-lora train CONFIG.yaml ...`), then evaluates the result as the paper did: the
domain's test set (MATH for a math run, HumanEval+ with 50 samples at temperature 0.2 for a code run) and the three
forgetting benchmarks (ARC-Challenge, HellaSwag, WinoGrande), each through `rasa-lora eval`, and writes
`OUTPUT_DIR/reproduce.json` and `reproduce.md`: every headline metric beside the paper's figure for the same run
where the paper reports one (Tables 1 and 2, "LAST": after the final epoch, which is what a run here ends with).
With `--every-epoch` the run keeps its adapter after each epoch (`save_epoch_adapters`), every one is evaluated too,
and the report adds the best epoch ("BEST") and `epochs.png`, the metrics epoch by epoch (forgetting: the paper's
Fig. 5).

Interrupted at any point, the same command goes on: a finished training (its `summary.json`) is not redone, an
interrupted one resumes from its newest checkpoint, and each benchmark skips the items it has already scored.

Options of this command (the others are the recipe's, as for `rasa-lora train`):
  --eval-tasks a,b,...     instead of the domain's (needed when the recipe's data is neither MetaMathQA nor Magicoder)
  --eval-limit N           the first N items of each benchmark (a quick look; the paper's figures are for all)
  --eval-data DIR          the benchmarks' files, in the layout of shared/data (default: ../shared/data or the hub)
  --eval-batch-size N      generation / scoring batch (default 16)
  --n-samples N            code: samples per problem (paper: 50)
  --max-new-tokens N       generation length (default 2048 for math, 512 for code)
  --every-epoch            keep and evaluate the adapter of every epoch: BEST beside LAST, and epochs.png
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rasa_lora.errors import ArgumentParser

FORGETTING = ("arc_challenge", "hellaswag", "winogrande")
DOMAINS = {"metamathqa": "math", "magicoder": "code"}  # dataset_format -> domain
DOMAIN_TASK = {"math": "math", "code": "humaneval+"}
# headline metrics by kind of task (lm-eval's choice for the multiple-choice ones: WinoGrande's is plain accuracy)
HEADLINE = {"math": ("accuracy",), "code": ("pass@1", "pass@10"), "choice": ("acc_norm",), "winogrande": ("acc",)}

_MODELS = {"meta-llama/Llama-3.1-8B": "llama", "mistralai/Mistral-7B-v0.3": "mistral",
           "meta-llama/Llama-3.1-70B": "llama-70b", "mistralai/Mixtral-8x7B-v0.1": "mixtral"}
# The paper's figures (%) for the methods `rasa-lora train` runs: (model, domain, method, r) -> {metric: (BEST, LAST)},
# BEST over the 8 epochs' checkpoints, LAST after the 8th. Table 1 (HumanEval+, PASS@1 and PASS@10) and Table 2
# (MATH accuracy); tests/train/test_reproduce.py reads them back from the paper's text.
_CODE = {  # method, r: (PASS@1 best, last), (PASS@10 best, last), for Llama-3.1-8B then Mistral-0.3-7B
    ("vera", 1024): (((48.8, 48.8), (66.5, 64.2)), ((42.5, 39.5), (57.3, 54.4))),
    ("lora", 8): (((56.1, 53.0), (71.2, 68.5)), ((42.6, 39.7), (57.7, 54.8))),
    ("rasa", 8): (((57.9, 56.9), (72.6, 69.6)), ((50.0, 49.0), (66.0, 64.2))),
    ("lora", 16): (((54.5, 53.4), (68.9, 67.6)), ((46.0, 40.6), (61.2, 54.9))),
    ("rasa", 16): (((57.3, 56.4), (72.1, 68.1)), ((53.6, 51.3), (68.5, 63.7))),
    ("lora", 32): (((57.9, 56.9), (69.8, 69.2)), ((50.2, 44.4), (64.4, 57.0))),
    ("rasa", 32): (((59.5, 56.2), (72.5, 71.4)), ((55.7, 55.7), (70.0, 65.7))),
    ("mora", 8): (((54.6, 52.1), (68.4, 66.9)), ((45.2, 38.6), (64.4, 48.6))),
    ("mora", 16): (((56.3, 52.9), (69.5, 65.6)), ((43.4, 41.0), (59.4, 56.0))),
    ("mora", 32): (((55.6, 53.0), (69.0, 68.3)), ((42.2, 42.2), (56.4, 56.0))),
}
_MATH = {  # method, r: (accuracy best, last) for Llama-3.1-8B, then Mistral-0.3-7B
    ("vera", 1024): ((27.4, 25.6), (19.9, 19.4)),
    ("lora", 8): ((28.3, 26.7), (20.1, 19.2)), ("olora", 8): ((28.4, 27.8), (22.5, 22.5)),
    ("adalora", 8): ((30.4, 28.9), (22.5, 21.6)), ("rasa", 8): ((30.3, 29.1), (24.3, 23.8)),
    ("lora", 16): ((28.8, 27.1), (20.9, 19.5)), ("olora", 16): ((28.6, 28.4), (22.5, 22.2)),
    ("adalora", 16): ((29.7, 29.4), (23.5, 23.2)), ("rasa", 16): ((31.4, 29.8), (25.9, 25.1)),
    ("lora", 32): ((28.9, 27.2), (21.8, 20.4)), ("olora", 32): ((29.0, 28.7), (23.8, 23.5)),
    ("adalora", 32): ((30.2, 29.4), (23.5, 23.5)), ("rasa", 32): ((31.7, 29.6), (26.1, 25.1)),
    ("mora", 8): ((29.2, 28.9), (21.4, 21.4)), ("prilora", 8): ((28.2, 29.5), (22.3, 22.3)),
    ("mora", 16): ((30.2, 26.5), (20.5, 19.4)), ("prilora", 16): ((28.6, 29.4), (22.7, 21.6)),
    ("mora", 32): ((28.6, 25.8), (18.4, 18.4)), ("prilora", 32): ((30.0, 28.8), (24.8, 24.2)),
}
PAPER: dict[tuple[str, str, str, int], dict[str, tuple[float, float]]] = {
    **{(model, "code", method, r): {"pass@1": figures[i][0], "pass@10": figures[i][1]}
       for (method, r), figures in _CODE.items() for i, model in enumerate(("llama", "mistral"))},
    **{(model, "math", method, r): {"accuracy": figures[i]}
       for (method, r), figures in _MATH.items() for i, model in enumerate(("llama", "mistral"))},
}
# Figure 6 (r = 4, 2 epochs, MATH LAST accuracy) is a chart; its text gives LoRA's two bars only (Sec. 4.4: "40.4%
# and 32.6%"), so RaSA's 70B and Mixtral runs have no paper figure here, and no run has a BEST.
FIGURE_6 = {("llama-70b", "math", "lora", 4): {"accuracy": (None, 40.4)},
            ("mixtral", "math", "lora", 4): {"accuracy": (None, 32.6)}}
_OWN = {"--eval-tasks": "tasks", "--eval-limit": "limit", "--eval-data": "data_dir", "--eval-batch-size": "batch_size",
        "--n-samples": "n_samples", "--max-new-tokens": "max_new_tokens", "--every-epoch": "every_epoch"}
_FLAGS = {"--every-epoch"}  # options without a value


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(this command's options, the recipe's arguments for `rasa-lora train`)."""
    own, rest, i = {}, [], 0
    while i < len(argv):
        flag, value = argv[i].split("=", 1) if argv[i].startswith("--") and "=" in argv[i] else (argv[i], None)
        if flag in _FLAGS:
            own[_OWN[flag]] = "true"
        elif flag in _OWN:
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


def paper_figures(config) -> dict[str, tuple[float, float]]:
    """The paper's (BEST, LAST) figures for this recipe's run, by metric ({} when the paper has none for it)."""
    model = _MODELS.get(str(config.base_model))
    domain = DOMAINS.get(config.dataset_format)
    key = (model, domain, config.method, config.r)
    return (PAPER.get(key) or FIGURE_6.get(key, {})) if model and domain else {}


def headline(task: str, summary: dict) -> dict[str, float]:
    """The metrics a benchmark is reported by (math: math-verify accuracy; code: pass@1, pass@10; ARC-Challenge and
    HellaSwag: length-normalised accuracy; WinoGrande: accuracy)."""
    from rasa_lora.evaluation.tasks import task_spec

    keys = HEADLINE.get(task) or HEADLINE[task_spec(task).kind]
    return {key: summary[key] for key in keys if key in summary}


def report(config, last: dict[str, dict], epochs: dict[int, dict[str, dict]]) -> tuple[dict, str]:
    """reproduce.json's content and reproduce.md's table: each benchmark's headline metrics after training (LAST)
    and, with per-epoch results, the best epoch's (BEST), beside the paper's for the domain's benchmark."""
    paper = paper_figures(config)
    domain_task = DOMAIN_TASK.get(DOMAINS.get(config.dataset_format))
    title = f"# {config.method} r={config.r} on {config.base_model or 'smollm2'} ({config.dataset or 'arithmetic'})"
    header = "| benchmark | metric | LAST (%) | paper LAST (%) |" + (" BEST (%) | best epoch | paper BEST (%) |"
                                                                   if epochs else "")
    lines = [title, "", header, "|" + " --- |" * (header.count("|") - 1)]
    rows = []
    for task, summary in last.items():
        for metric, value in headline(task, summary).items():
            best, last_paper = paper.get(metric, (None, None)) if task == domain_task else (None, None)
            row = {"task": task, "metric": metric, "last": 100 * value, "paper_last": last_paper,
                   "items": summary["items"], "limit": summary.get("limit")}
            cells = f"| {task} ({summary['items']} items) | {metric} | {row['last']:.1f} | {_cell(last_paper)} |"
            if epochs:
                per_epoch = {e: 100 * r[task][metric] for e, r in epochs.items() if metric in r.get(task, {})}
                best_epoch = max(per_epoch, key=lambda e: (per_epoch[e], e))
                row.update(per_epoch=per_epoch, best=per_epoch[best_epoch], best_epoch=best_epoch, paper_best=best)
                cells += f" {row['best']:.1f} | {best_epoch} | {_cell(best)} |"
            rows.append(row)
            lines.append(cells)
    if any(r["limit"] for r in rows):
        lines += ["", "Limited to the first items of each benchmark (--eval-limit): not comparable with the paper."]
    content = {"method": config.method, "r": config.r, "base_model": config.base_model, "dataset": config.dataset,
               "results": rows}
    return content, "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_epochs(content: dict, path: Path) -> None:
    """Each benchmark's headline metric after each epoch (the domain's on the left, forgetting on the right, their
    mean in bold: the paper's Fig. 5), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [row for row in content["results"] if row.get("per_epoch")]
    forgetting = [row for row in rows if row["task"] in FORGETTING]
    domain = [row for row in rows if row["task"] not in FORGETTING]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, group, title in ((axes[0][0], domain, "task"), (axes[0][1], forgetting, "forgetting benchmarks")):
        for row in group:
            epochs = sorted(row["per_epoch"])
            ax.plot(epochs, [row["per_epoch"][e] for e in epochs], marker="o", label=f"{row['task']} {row['metric']}")
            if row.get("paper_best") is not None:
                ax.axhline(row["paper_best"], linestyle=":", color="grey", label="paper BEST")
        if len(group) > 1 and group is forgetting:
            epochs = sorted(set.intersection(*(set(row["per_epoch"]) for row in group)))
            mean = [sum(row["per_epoch"][e] for row in group) / len(group) for e in epochs]
            ax.plot(epochs, mean, linewidth=3, color="black", label="mean")
        ax.set(xlabel="epoch", ylabel="%", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if group:
            ax.legend(fontsize=8)
    figure.suptitle(f"{content['method']} r={content['r']} on {content['base_model'] or 'smollm2'}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _evaluate(task: str, model: str | None, adapter: str | None, out_dir: Path, own: dict[str, str]) -> dict:
    """`rasa-lora eval` of one benchmark into out_dir; its summary."""
    import torch

    from rasa_lora.evaluation.cli import main as eval_main

    argv = [task, "--output-dir", str(out_dir), "--dtype", "bfloat16" if torch.cuda.is_available() else "float32"]
    argv += ["--model", model] if model else []
    argv += ["--adapter", adapter] if adapter else []
    for key, flag in (("limit", "--limit"), ("data_dir", "--data-dir"), ("batch_size", "--batch-size"),
                      ("n_samples", "--n-samples"), ("max_new_tokens", "--max-new-tokens")):
        if key in own:
            argv += [flag, own[key]]
    if eval_main(argv):
        raise RuntimeError(f"rasa-lora eval {task} failed (its message is above)")
    return json.loads((out_dir / "summary.json").read_text())


def _same_weights(a: Path, b: Path) -> bool:
    files = [path / "adapter_model.safetensors" for path in (a, b)]
    return all(f.is_file() for f in files) and files[0].read_bytes() == files[1].read_bytes()


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from rasa_lora.train import checkpoint, cli
    from rasa_lora.train.config import build_config
    from rasa_lora.train.trainer import epoch_adapter_dirs

    try:
        own, train_argv = split_args(argv)
        check_options(own)
        every_epoch = own.pop("every_epoch", None) is not None
        values = cli.recipe_values(train_argv)
        if every_epoch:
            values["save_epoch_adapters"] = True
        config = build_config(cli.with_saved(values))
        tasks = eval_tasks(config, own.get("tasks"))
    except (ValueError, FileNotFoundError) as error:
        print(f"rasa-lora reproduce: error: {error}", file=sys.stderr)
        return 2
    out = Path(config.output_dir)
    if (out / "summary.json").is_file():
        print(f"rasa-lora reproduce: {out} holds a finished training run; evaluating it", file=sys.stderr)
        if every_epoch and not epoch_adapter_dirs(out):
            print(f"rasa-lora reproduce: error: --every-epoch, but {out} kept no adapter per epoch (it was trained "
                  "without save_epoch_adapters); evaluate without --every-epoch, or train again", file=sys.stderr)
            return 2
    else:
        if not config.resume and out.is_dir() and checkpoint.checkpoint_dirs(out):  # an interrupted run: go on
            try:
                config = build_config(cli.with_saved({**values, "resume": True}))
            except (ValueError, FileNotFoundError) as error:
                print(f"rasa-lora reproduce: error: {error}", file=sys.stderr)
                return 2
        code = cli.run(config)
        if code:
            return code
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-process training: the main process evaluates
        return 0
    model, adapter = (str(out), None) if config.method == "fft" else (config.base_model, str(out))
    try:
        last = {task: _evaluate(task, model, adapter, out / "eval" / task, own) for task in tasks}
        epochs = {}
        for epoch, folder in epoch_adapter_dirs(out) if every_epoch else []:
            if _same_weights(folder, out):  # the last epoch's adapter is the final one: scored above
                epochs[epoch] = last
                continue
            epochs[epoch] = {task: _evaluate(task, model, str(folder), out / "eval" / folder.name / task, own)
                             for task in tasks}
    except RuntimeError as error:
        print(f"rasa-lora reproduce: {error}", file=sys.stderr)
        return 2
    content, table = report(config, last, epochs)
    (out / "reproduce.json").write_text(json.dumps(content, indent=2) + "\n")
    (out / "reproduce.md").write_text(table)
    print(table)
    print(f"results: {out / 'reproduce.md'}  {out / 'reproduce.json'}  per benchmark: {out / 'eval'}")
    if epochs:
        plot_epochs(content, out / "epochs.png")
        print(f"per-epoch plot: {out / 'epochs.png'}")
    return 0


def compare_main(argv: list[str]) -> int:
    """`rasa-lora compare RUN_DIR [RUN_DIR ...] [--out FILE]`: the runs' reproduce.json side by side (one row per run
    and metric, the paper's figures beside them, as its Tables 1-2 put them) in FILE.md (default compare.md), and
    FILE.png: each run's domain metric against the paper's, bars by run."""
    parser = ArgumentParser(prog="rasa-lora compare", description=compare_main.__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of `rasa-lora reproduce`")
    parser.add_argument("--out", default="compare", help="FILE: writes FILE.md and FILE.png (default compare)")
    args = parser.parse_args(argv)
    out, dirs = Path(args.out).with_suffix(""), args.runs
    runs, missing = [], [path for path in dirs if not (Path(path) / "reproduce.json").is_file()]
    if missing:
        print(f"rasa-lora compare: no reproduce.json in {', '.join(missing)} (run `rasa-lora reproduce` there first)",
              file=sys.stderr)
        return 2
    for path in dirs:
        content = json.loads((Path(path) / "reproduce.json").read_text())
        if not all("last" in row for row in content.get("results", [])):
            print(f"rasa-lora compare: {path}/reproduce.json is in an older format; run the same `rasa-lora "
                  "reproduce` again there (it only rewrites the report)", file=sys.stderr)
            return 2
        runs.append((Path(path).name, content))
    lines = ["| run | method | r | benchmark | metric | LAST (%) | paper LAST | BEST (%) | paper BEST |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, content in runs:
        for row in content["results"]:
            lines.append(f"| {name} | {content['method']} | {content['r']} | {row['task']} | {row['metric']} | "
                         f"{row['last']:.1f} | {_cell(row.get('paper_last'))} | {_cell(row.get('best'))} | "
                         f"{_cell(row.get('paper_best'))} |")
    if any(row.get("limit") for _, content in runs for row in content["results"]):
        lines += ["", "Some runs were evaluated on the first items only (--eval-limit): not comparable with the paper."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot_compare(runs, out.with_suffix(".png"))
    print(f"table: {out.with_suffix('.md')}  plot: {out.with_suffix('.png')}")
    return 0


def _plot_compare(runs: list[tuple[str, dict]], path: Path) -> None:
    """Bars of each run's first domain metric (the first result row with a paper figure, else its first row), the
    paper's LAST beside it where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = []
    for name, content in runs:
        rows = content["results"]
        row = next((r for r in rows if r.get("paper_last") is not None), rows[0] if rows else None)
        if row is not None:
            picked.append((name, row))
    figure, ax = plt.subplots(figsize=(max(6, 1.2 * len(picked) + 2), 4))
    xs = range(len(picked))
    ours = ax.bar([x - 0.2 for x in xs], [row["last"] for _, row in picked], width=0.4, label="this run (LAST)")
    ax.bar_label(ours, fmt="%.1f", fontsize=8)  # a zero shows as "0.0", not as an empty plot
    paper = [(x, row["paper_last"]) for x, (_, row) in zip(xs, picked) if row.get("paper_last") is not None]
    if paper:
        theirs = ax.bar([x + 0.2 for x, _ in paper], [value for _, value in paper], width=0.4, label="paper (LAST)")
        ax.bar_label(theirs, fmt="%.1f", fontsize=8)
    values = [row["last"] for _, row in picked] + [value for _, value in paper]
    ax.set_ylim(0, max([*values, 1.0]) * 1.15)
    if values and not any(values):
        ax.text(0.5, 0.5, "every value is 0", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_xticks(list(xs), [f"{name}\n{row['task']} {row['metric']}" for name, row in picked], fontsize=8)
    ax.set_ylabel("%")
    ax.set_title("domain metric by run: this run's LAST beside the paper's")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
