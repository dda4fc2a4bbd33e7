"""Tables and figures of the replication study (docs/replication.md) from its raw runs.

    python3 benchmarks/replication_report.py [--root benchmarks/results/replication] [--out docs/replication]

Reads what `benchmarks/replication.py` left per run (config.json, summary.json, metrics.jsonl, and
eval/epoch-N/<task>/summary.json once `score` has run) and writes `OUT/tables.md` (markdown, every number with its
seed count and spread), `OUT/loss.png` (the paper's Fig. 4: training loss by step, mean of the seeds with a band
from their minimum to their maximum, held-out loss as markers), `OUT/epochs.png` (GSM8K accuracy and forgetting by
epoch) and `OUT/study.json` (the same numbers, for other tools). A full fine-tune's `rasa-lora analyze` output
(`fft-*/analysis*/analysis.json`) adds the Figs. 2-3 table of its real deltas to tables.md.

A difference between two cells is called real only when their seeds' ranges do not overlap (every seed of one
beats every seed of the other); with 3 seeds that is the rule the issue asks for, and it says nothing finer.

RaSA is compared with LoRA twice: at the same r and alpha (the paper's comparison), and at the same update size
(docs/replication.md, "Why RaSA trains slower here"): under LionW every trainable entry moves by lr a step, so a
step moves dW by a norm proportional to the scales the ranks carry, LoRA's alpha/r on r ranks (alpha / sqrt(r)),
RaSA's eq. 6 alpha/(2(r-k)) on r-k private ranks and alpha/(2Lk) on the L*k pooled ones
((alpha/2) * sqrt(1/(r-k) + 1/(Lk)); the library's `rasa_lora.step_size`). `update_size` gives it in units of
LoRA alpha 8's at the same r (RaSA alpha 8 at r=8, k=1, L=30: 0.594; `benchmarks/update_size.py` measured
0.591-0.600); a RaSA cell and a LoRA cell with the same r and learning rate whose update sizes agree within 2% are a
matched pair (RaSA alpha 16 and LoRA alpha 9.5).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

from rasa_lora.step_size import update_scale

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^(?P<cell>.+)-s(?P<seed>\d+)$")
FORGETTING = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc"}
TAIL_STEPS = 20  # the training loss of a run: the mean of its last 20 steps (one step's loss is one batch's)
LAYERS = 30  # SmolLM2-135M's decoder layers: L of eq. 6 (the pool of a projection type has L*k ranks)
MATCH_TOLERANCE = 0.02  # update sizes that agree within 2% are "the same"


def update_size(method: str, r: int, alpha: float, k: int | None = None, layers: int = LAYERS) -> float:
    """How far one LionW step moves dW, relative to LoRA at the same r with alpha 8 (the library's rule,
    `rasa_lora.step_size.update_scale`)."""
    return update_scale(method, r, alpha, k if method == "rasa" else None, layers) / update_scale("lora", r, 8.0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: Path) -> dict:
    rows = read_jsonl(path / "metrics.jsonl")
    steps = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_loss" in row]
    summary = read_json(path / "summary.json")
    from rasa_lora.train.config import read_run_recipe  # a full fine-tune's config.json is its model's

    config = read_run_recipe(path) or {}
    epochs: dict[int, dict] = {}
    for folder in sorted((path / "eval").glob("epoch-*")):
        epoch = int(folder.name.split("-")[1])
        scores = {}
        gsm8k = read_json(folder / "gsm8k" / "summary.json")
        if gsm8k:
            scores["gsm8k"] = gsm8k["accuracy"]
            scores["gsm8k_minerva"] = gsm8k.get("accuracy_minerva")
        for task, metric in FORGETTING.items():
            result = read_json(folder / task / "summary.json")
            if result:
                scores[task] = result[metric]
        if all(task in scores for task in FORGETTING):
            scores["forgetting_mean"] = statistics.mean(scores[task] for task in FORGETTING)
        epochs[epoch] = scores
    steps_per_epoch = None
    if len(steps) > 1 and steps[0]["epoch"] > 0:
        steps_per_epoch = round(steps[0]["step"] / steps[0]["epoch"])
    held_out = {}
    for row in evals:
        if steps_per_epoch and row["step"] % steps_per_epoch == 0:
            held_out[row["step"] // steps_per_epoch] = row["eval_loss"]
    return {"name": path.name, "config": config, "summary": summary, "steps": steps, "held_out": held_out,
            "epochs": epochs, "done": summary is not None}


def load_study(root: Path) -> dict[str, list[dict]]:
    """cell -> its runs (seeds), for every run folder under root; `base` is the untrained model."""
    cells: dict[str, list[dict]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        match = NAME.match(path.name)
        if path.name == "base":
            cells["base"] = [load_run(path)]
        elif match:
            cells.setdefault(match["cell"], []).append(load_run(path))
    return cells


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if stat is None:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean'] * scale:.{digits}f} (1 seed)"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f} (n={stat['n']})"


def tail_loss(run: dict) -> float | None:
    losses = [row["loss"] for row in run["steps"][-TAIL_STEPS:]]
    return statistics.mean(losses) if losses and run["done"] else None


def by_seed(runs: list[dict], value) -> dict[str, float]:
    """seed -> value(run) for the runs where it exists."""
    found = {}
    for run in runs:
        match, number = NAME.match(run["name"]), value(run)
        if match and number is not None:
            found[match["seed"]] = number
    return found


def cell_numbers(runs: list[dict]) -> dict:
    epochs = sorted({epoch for run in runs for epoch in run["epochs"]} | {e for run in runs for e in run["held_out"]})
    config = runs[0]["config"]
    summary = runs[0]["summary"] or {}
    numbers = {
        "method": config.get("method"), "r": config.get("r"), "alpha": config.get("alpha"),
        "rasa_k": summary.get("rasa_k", config.get("rasa_k")), "learning_rate": config.get("learning_rate"),
        "seeds": [NAME.match(run["name"])["seed"] if NAME.match(run["name"]) else "-" for run in runs],
        "done": sum(run["done"] for run in runs),
        "trainable_params": (runs[0]["summary"] or {}).get("trainable_params"),
        "train_loss": spread([tail_loss(run) for run in runs]),
        "train_time_s": spread([(run["summary"] or {}).get("train_time_s") for run in runs]),
        "tokens_per_s": spread([(run["summary"] or {}).get("tokens", 0) / (run["summary"] or {}).get("train_time_s", 1)
                                if run["summary"] else None for run in runs]),
        "by_epoch": {},
        "per_seed": {"train_loss": by_seed(runs, tail_loss)},
    }
    for epoch in epochs:
        row = {"held_out_loss": spread([run["held_out"].get(epoch) for run in runs])}
        for key in ("gsm8k", "gsm8k_minerva", *FORGETTING, "forgetting_mean"):
            row[key] = spread([run["epochs"].get(epoch, {}).get(key) for run in runs])
        numbers["by_epoch"][epoch] = row
        numbers["per_seed"][f"held_out_loss@{epoch}"] = by_seed(runs, lambda run, e=epoch: run["held_out"].get(e))
        for key in ("gsm8k", "forgetting_mean"):
            numbers["per_seed"][f"{key}@{epoch}"] = by_seed(runs, lambda run, e=epoch, k=key:
                                                            run["epochs"].get(e, {}).get(k))
    gsm = [[run["epochs"][e]["gsm8k"] for e in sorted(run["epochs"]) if "gsm8k" in run["epochs"][e]] for run in runs]
    numbers["gsm8k_last"] = spread([values[-1] for values in gsm if values])
    numbers["gsm8k_best"] = spread([max(values) for values in gsm if values])
    return numbers


def paired(a: dict[str, float], b: dict[str, float], scale: float = 1.0, digits: int = 4) -> str:
    """Per-seed differences a - b over the seeds both have (the same seed: the same data subset, order and init)."""
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        return "-"
    diffs = [a[seed] - b[seed] for seed in seeds]
    sign = " (all > 0)" if all(d > 0 for d in diffs) else " (all < 0)" if all(d < 0 for d in diffs) else ""
    return ", ".join(f"s{seed}: {d * scale:+.{digits}f}" for seed, d in zip(seeds, diffs)) + sign


def real_difference(a: dict | None, b: dict | None) -> str:
    """'a' or 'b' when every seed of one is above every seed of the other (higher wins), else 'no'."""
    if not a or not b or a["n"] < 2 or b["n"] < 2:
        return "n/a (needs >= 2 seeds each)"
    if a["min"] > b["max"]:
        return "yes: first higher"
    if b["min"] > a["max"]:
        return "yes: second higher"
    return "no (ranges overlap)"


def comparison_rows(label: str, a: dict, b: dict) -> list[str]:
    """Table rows comparing cell `a` (RaSA) with cell `b` (LoRA): training loss, and at the last epoch both have,
    held-out loss, GSM8K and forgetting; then GSM8K BEST."""
    measures = [("training loss", a["train_loss"], b["train_loss"], 1, 4, "train_loss")]
    last = max(set(a["by_epoch"]) & set(b["by_epoch"]), default=None)
    if last is not None:
        for key, name, scale, digits in (("held_out_loss", "held-out loss", 1, 4), ("gsm8k", "GSM8K %", 100, 2),
                                         ("forgetting_mean", "forgetting mean %", 100, 2)):
            measures.append((f"{name}, epoch {last}", a["by_epoch"][last][key], b["by_epoch"][last][key],
                             scale, digits, f"{key}@{last}"))
    measures += [("GSM8K BEST %", a["gsm8k_best"], b["gsm8k_best"], 100, 2, None)]
    rows = []
    for name, x, y, scale, digits, seed_key in measures:
        diff = f"{(x['mean'] - y['mean']) * scale:+.{digits}f}" if x and y else "-"
        pairs_text = "-"
        if seed_key:
            pairs_text = paired(a["per_seed"].get(seed_key, {}), b["per_seed"].get(seed_key, {}), scale, digits)
        rows.append(f"| {label} | {name} | {fmt(x, scale, digits)} | {fmt(y, scale, digits)} | {diff} | "
                    f"{real_difference(x, y)} | {pairs_text} |")
    return rows


def matched_pairs(study: dict[str, dict]) -> list[dict]:
    """(RaSA cell, LoRA cell) with the same r and learning rate and update sizes within MATCH_TOLERANCE, other than
    the same-alpha pairs (those have their own table unless the update sizes also agree, which eq. 6 rules out)."""
    def size(numbers: dict) -> float | None:
        if numbers.get("method") not in ("lora", "rasa") or numbers.get("r") is None or numbers.get("alpha") is None:
            return None
        return update_size(numbers["method"], int(numbers["r"]), float(numbers["alpha"]), numbers.get("rasa_k"))

    found = []
    for rasa, a in study.items():
        for lora, b in study.items():
            if a.get("method") != "rasa" or b.get("method") != "lora" or a.get("r") != b.get("r") \
                    or a.get("learning_rate") != b.get("learning_rate"):
                continue
            size_a, size_b = size(a), size(b)
            if size_a and size_b and abs(size_a / size_b - 1) <= MATCH_TOLERANCE:
                found.append({"rasa": rasa, "lora": lora, "rasa_alpha": float(a["alpha"]),
                              "lora_alpha": float(b["alpha"]), "rasa_update_size": size_a, "lora_update_size": size_b})
    return found


def write_tables(study: dict[str, dict], out: Path, root: Path) -> str:
    shown = root.resolve().relative_to(REPO) if root.resolve().is_relative_to(REPO) else root
    lines = ["# Replication study: tables", "",
             f"Generated by `python3 benchmarks/replication_report.py --root {shown}` from the raw runs there; "
             "mean ± standard deviation over seeds (n = seeds).", ""]
    lines += ["## Training (Fig. 4's measure) and cost", "",
              f"| cell | seeds done | trainable params | training loss (mean of last {TAIL_STEPS} steps) | "
              "training time s | tokens/s |", "|---|---|---|---|---|---|"]
    for cell, numbers in study.items():
        if cell == "base":
            continue
        params = numbers["trainable_params"]
        lines.append(f"| {cell} | {numbers['done']}/{len(numbers['seeds'])} | "
                     f"{params:,} | " if params else f"| {cell} | {numbers['done']}/{len(numbers['seeds'])} | - | ")
        lines[-1] += (f"{fmt(numbers['train_loss'], digits=4)} | {fmt(numbers['train_time_s'], digits=0)} | "
                      f"{fmt(numbers['tokens_per_s'], digits=0)} |")
    lines += ["", "## By epoch: held-out loss, GSM8K test accuracy (math-verify, %), forgetting (%)", "",
              "| cell | epoch | held-out loss | GSM8K | ARC-C acc_norm | WinoGrande acc "
              "| HellaSwag acc_norm (first 1,000) | forgetting mean |", "|---|---|---|---|---|---|---|---|"]
    for cell, numbers in study.items():
        for epoch, row in sorted(numbers["by_epoch"].items()):
            lines.append(f"| {cell} | {epoch} | {fmt(row['held_out_loss'], digits=4)} | {fmt(row['gsm8k'], 100, 2)} | "
                         f"{fmt(row['arc_challenge'], 100, 2)} | {fmt(row['winogrande'], 100, 2)} | "
                         f"{fmt(row['hellaswag'], 100, 2)} | {fmt(row['forgetting_mean'], 100, 2)} |")
    lines += ["", "## GSM8K, the paper's LAST and BEST columns (%)", "", "| cell | LAST | BEST |", "|---|---|---|"]
    for cell, numbers in study.items():
        if cell != "base":
            lines.append(f"| {cell} | {fmt(numbers['gsm8k_last'], 100, 2)} | {fmt(numbers['gsm8k_best'], 100, 2)} |")
    pairs = [(a, b) for a in study for b in study if a.startswith("rasa-") and b == a.replace("rasa-", "lora-", 1)]
    header = ["| pair | measure | RaSA | LoRA | difference (RaSA - LoRA) | beyond the spread | paired by seed |",
              "|---|---|---|---|---|---|---|"]
    if pairs:
        lines += ["", "## RaSA against LoRA at the same r: is the difference beyond the seed spread?", ""] + header
        for rasa, lora in pairs:
            lines += comparison_rows(f"{rasa} vs {lora}", study[rasa], study[lora])
    matched = matched_pairs(study)
    if matched:
        lines += ["", "## RaSA against LoRA at the same update size (LionW: RaSA's eq. 6 step is 0.59x LoRA's at "
                  "equal alpha)", "",
                  "Update size: how far one step moves dW, in units of LoRA alpha 8's at the same r (the rule in "
                  f"this script's docstring, L = {LAYERS}); pairs agree within {MATCH_TOLERANCE:.0%}.", ""] + header
        for pair in matched:
            label = (f"{pair['rasa']} (alpha {pair['rasa_alpha']:g}, size {pair['rasa_update_size']:.3f}) vs "
                     f"{pair['lora']} (alpha {pair['lora_alpha']:g}, size {pair['lora_update_size']:.3f})")
            lines += comparison_rows(label, study[pair["rasa"]], study[pair["lora"]])
    lines += analysis_rows(root)
    text = "\n".join(lines) + "\n"
    (out / "tables.md").write_text(text)
    return text


def analysis_rows(root: Path) -> list[str]:
    """Figs. 2-3 on the real deltas: a table for each `rasa-lora analyze` output under a full fine-tune's run
    (`RUN/analysis*/analysis.json`): per module type LoRA's minimum error, RaSA's error over it at iteration 10 and
    at the end, the first iteration below it, and the k sweep over it."""
    lines = []
    for path in sorted(root.glob("fft-*/analysis*/analysis.json")):
        result = json.loads(path.read_text())
        config = result.get("config", {})
        shown = path.relative_to(root)
        lines += ["", f"## Reconstruction of the real deltas (Figs. 2-3): `{shown}`", "",
                  f"r = {config.get('r')}, k = {config.get('k')}, start {config.get('init')}, at most "
                  f"{config.get('iters')} iterations (tolerance {config.get('tol')}); errors relative to ||dW||, "
                  "RaSA's over LoRA's minimum e_lora (< 1: RaSA fits better).", "",
                  "| module type | shape (b x a) | e_lora | RaSA it. 10 / e_lora | RaSA final / e_lora | iterations | "
                  "first below e_lora | k sweep / e_lora | best k |", "|---|---|---|---|---|---|---|---|---|"]
        for group, fit in result["groups"].items():
            lora, curve = fit["lora_relative_error"], fit["rasa_relative_error_curve"]
            sweep = fit.get("k_sweep_relative") or {}
            sweep_text = ", ".join(f"{k}: {value / lora:.4f}" for k, value in sweep.items()) or "-"
            below, best = fit.get("first_iteration_below_lora"), fit.get("best_k")
            at_10 = f"{curve[10] / lora:.4f}" if len(curve) > 10 else "-"
            lines.append(f"| {group.split('.*.')[-1]} | {' x '.join(map(str, fit['shape']))} | {lora:.4f} | {at_10} | "
                         f"{fit['rasa_relative_error'] / lora:.4f} | {fit.get('iterations', '-')} | "
                         f"{'-' if below is None else below} | {sweep_text} | {'-' if best is None else best} |")
    return lines


def plot_losses(cells: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for cell, runs in cells.items():
        runs = [run for run in runs if run["done"]] or [run for run in runs if run["steps"]]  # finished ones
        if cell == "base" or not runs:
            continue
        color = next(colors)
        length = min(len(run["steps"]) for run in runs)
        window = 10
        smooth = []
        for run in runs:
            losses = [row["loss"] for row in run["steps"][:length]]
            smooth.append([statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(length)])
        steps = [row["step"] for row in runs[0]["steps"][:length]]
        mean = [statistics.mean(column) for column in zip(*smooth)]
        unfinished = "" if all(run["done"] for run in runs) else ", unfinished"
        axis.plot(steps, mean, color=color, label=f"{cell} (n={len(runs)}{unfinished}, training, {window}-step mean)")
        axis.fill_between(steps, [min(c) for c in zip(*smooth)], [max(c) for c in zip(*smooth)], color=color,
                          alpha=0.2, linewidth=0)
        per_epoch = sorted({e for run in runs for e in run["held_out"]})
        spe = round(runs[0]["steps"][0]["step"] / runs[0]["steps"][0]["epoch"]) if runs[0]["steps"][0]["epoch"] else 1
        held = [spread([run["held_out"].get(e) for run in runs]) for e in per_epoch]
        axis.errorbar([e * spe for e in per_epoch], [h["mean"] for h in held],
                      yerr=[[h["mean"] - h["min"] for h in held], [h["max"] - h["mean"] for h in held]],
                      color=color, marker="o", linestyle="--", capsize=3, label=f"{cell} held-out")
    axis.set(xlabel="optimizer step", ylabel="loss (response tokens)",
             title="SmolLM2-135M on GSM8K: training and held-out loss (band: min-max over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=110)
    plt.close(figure)


def plot_epochs(study: dict[str, dict], out: Path) -> bool:
    """epochs.png, when some accuracy or forgetting was measured; returns whether it was written."""
    if not any(row.get(key) for numbers in study.values() for row in numbers["by_epoch"].values()
               for key in ("gsm8k", "forgetting_mean")):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("gsm8k", "GSM8K test accuracy %"), ("forgetting_mean", "forgetting: mean of ARC-C, WinoGrande, "
                                                                    "HellaSwag %")]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (key, label) in zip(axes, keys):
        for cell, numbers in study.items():
            points = [(e, row[key]) for e, row in sorted(numbers["by_epoch"].items()) if row.get(key)]
            if cell == "base" and points:
                axis.axhline(points[0][1]["mean"] * 100, color="gray", linestyle=":", label="base model")
                continue
            if not points:
                continue
            axis.errorbar([e for e, _ in points], [s["mean"] * 100 for _, s in points],
                          yerr=[[(s["mean"] - s["min"]) * 100 for _, s in points],
                                [(s["max"] - s["mean"]) * 100 for _, s in points]],
                          marker="o", capsize=3, label=cell)
        axis.set(xlabel="epoch", ylabel=label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("By epoch (bars: min-max over seeds)")
    figure.tight_layout()
    figure.savefig(out / "epochs.png", dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(REPO / "benchmarks" / "results" / "replication"))
    parser.add_argument("--out", default=str(REPO / "docs" / "replication"))
    args = parser.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = load_study(root)
    study = {cell: cell_numbers(runs) for cell, runs in cells.items()}
    print(write_tables(study, out, root))
    plot_losses(cells, out)
    epochs_written = plot_epochs(study, out)
    (out / "study.json").write_text(json.dumps({**study, "matched_pairs": matched_pairs(study)}, indent=1,
                                               default=str) + "\n")
    print(f"wrote {out / 'tables.md'}, loss.png, {'epochs.png, ' if epochs_written else ''}study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
