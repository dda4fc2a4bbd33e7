"""Run the reconstruction analysis over groups and write `analysis.json`, `convergence.png`, `k_sweep.png`.

One group at a time (so only one group's deltas sit on the device): LoRA's optimum once, RaSA's coordinate
descent at (r, k) with the curve, then the k sweep reusing LoRA's solution (k = 0 is e_lora itself; the
requested k reuses the main fit when the sweep has the same iteration limit). Every fit runs each start of
`start_plan` until the convergence criterion (`tol`) or the iteration limit. A tqdm bar counts iterations
against the limit over all groups, sweep points and starts (a start that converges early advances the bar by
the iterations it did not need), so its total is an upper bound known from the start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rasa_lora.analysis.reconstruction import (
    DEFAULT_INIT,
    DEFAULT_MAX_ITERS,
    DEFAULT_TOL,
    DEFAULT_WINDOW,
    FitResult,
    fit_rasa,
    lora_solution,
    start_plan,
)
from rasa_lora.analysis.sources import Group
from rasa_lora.atomic import write_atomic


@dataclass
class AnalysisConfig:
    """Settings of one analysis run (see `rasa-lora analyze --help`)."""

    r: int = 8
    k: int = 1
    iters: int = DEFAULT_MAX_ITERS  # the most iterations per start
    init: str = DEFAULT_INIT
    variant: str = "fast"
    dtype: str = "float32"
    device: str = "auto"
    sweep: Sequence[int] | None = None  # k values; None = 0..r; [] = no sweep
    sweep_iters: int | None = None  # default: iters
    seed: int = 0
    svd_tol: float = 3e-5
    tol: float = DEFAULT_TOL  # convergence criterion: mean relative decrease per iteration over `window` ones
    window: int = DEFAULT_WINDOW
    restarts: int = 1

    def __post_init__(self) -> None:
        start_plan(self.init, self.restarts)  # refuses an unknown init or restarts < 1
        if self.iters < 0 or (self.sweep_iters is not None and self.sweep_iters < 0):
            raise ValueError(f"iters={self.iters}, sweep_iters={self.sweep_iters}: choose limits >= 0.")
        if not self.tol >= 0:
            raise ValueError(f"tol={self.tol} is invalid; choose tol >= 0 (0 runs every iteration).")
        if not 0 <= self.k <= self.r:
            raise ValueError(f"k={self.k} is invalid for r={self.r}; choose 0 <= k <= r.")
        bad = [k for k in (self.sweep or []) if not 0 <= k <= self.r]
        if bad:
            raise ValueError(f"k sweep values {bad} lie outside 0..r={self.r}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r}; choose float32 or float64.")

    @property
    def sweep_values(self) -> list[int]:
        return list(range(self.r + 1)) if self.sweep is None else sorted(set(self.sweep))

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _fit_summary(result: FitResult) -> dict:
    return {"init": result.init, "iterations": result.iterations, "converged": result.converged,
            "start_spread": result.start_spread}


def analyze_group(group: Group, config: AnalysisConfig, bar=None) -> dict:
    """Everything `analysis.json` holds for one group."""
    started = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    M = group.deltas.to(device=config.torch_device(), dtype=dtype)
    fit_args = dict(init=config.init, variant=config.variant, dtype=dtype, seed=config.seed, tol=config.tol,
                    window=config.window, restarts=config.restarts)
    if config.variant == "fast":
        fit_args["svd_tol"] = config.svd_tol
    lora = lora_solution(M, config.r, config.variant, seed=config.seed)

    def fit(k: int, iters: int) -> FitResult:
        done = 0

        def tick(_iteration: int, _error: float) -> None:
            nonlocal done
            done += 1
            if bar is not None:
                bar.update(1)

        result = fit_rasa(M, config.r, k, iters, lora=lora, progress=tick, **fit_args)
        if bar is not None:  # the iterations a converged start did not need
            bar.update(iters * len(start_plan(config.init, config.restarts, config.seed, k)) - done)
        return result

    main = fit(config.k, config.iters)
    sweep_iters = config.iters if config.sweep_iters is None else config.sweep_iters
    sweep: dict[str, float] = {}
    sweep_fits: dict[str, dict] = {}
    for k in config.sweep_values:
        if k == 0:
            sweep["0"] = lora.error
            continue
        result = main if k == config.k and sweep_iters == config.iters else fit(k, sweep_iters)
        sweep[str(k)], sweep_fits[str(k)] = result.final_error, _fit_summary(result)
    return _record(group, config, main, lora, sweep, sweep_fits, time.perf_counter() - started)


def _record(group: Group, config: AnalysisConfig, main: FitResult, lora, sweep: dict[str, float],
            sweep_fits: dict[str, dict], wall: float) -> dict:
    total = main.total_energy or 1.0
    below = [t + 1 for t, e in enumerate(main.error_curve) if e < main.lora_error]
    return {
        "modules": group.modules, "num_layers": len(group.modules), "shape": list(group.deltas.shape[1:]),
        "r": config.r, "k": config.k, "total_energy": main.total_energy,
        "lora_error": main.lora_error, "lora_relative_error": main.lora_error / total,
        "lora_solver_estimate": lora.tol_reached,
        "rasa_start": main.init, "iterations": main.iterations, "converged": main.converged, "tol": config.tol,
        "window": config.window,
        "rasa_initial_error": main.initial_error, "rasa_error_curve": main.error_curve,
        "rasa_relative_error_curve": [e / total for e in main.error_curve],
        "rasa_final_error": main.final_error, "rasa_relative_error": main.final_error / total,
        "rasa_over_lora": main.final_error / main.lora_error if main.lora_error else None,
        "first_iteration_below_lora": below[0] if below else None,
        "starts": main.starts, "start_spread": main.start_spread,
        "k_sweep": sweep, "k_sweep_relative": {k: e / total for k, e in sweep.items()}, "k_sweep_fits": sweep_fits,
        "best_k": int(min(sweep, key=sweep.get)) if sweep else None,
        "svd_estimate": main.svd_estimate, "gram_fallbacks": main.gram_fallbacks, "passes_over_M": main.passes,
        "wall_time_s": wall,
    }


def planned_iterations(config: AnalysisConfig) -> int:
    """The iteration limit of one group's fits, all starts and sweep points: the progress bar's unit."""
    sweep_iters = config.iters if config.sweep_iters is None else config.sweep_iters

    def starts(k: int) -> int:
        return len(start_plan(config.init, config.restarts, config.seed, k))

    reused = {0, config.k} if sweep_iters == config.iters else {0}
    return config.iters * starts(config.k) + sum(sweep_iters * starts(k) for k in config.sweep_values
                                                 if k not in reused)


def run_analysis(groups: Iterable[Group], config: AnalysisConfig, out_dir: str | Path, source: dict,
                 num_groups: int | None = None, plots: bool = True) -> dict:
    """Analyse every group, write OUT/analysis.json (and the two PNGs); return the JSON object."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_group = planned_iterations(config)
    results: dict[str, dict] = {}
    with tqdm(total=per_group * num_groups if num_groups else None, unit="it", desc="analysis") as bar:
        for index, group in enumerate(groups):
            bar.set_description(f"group {index + 1}{'/' + str(num_groups) if num_groups else ''} {group.name}")
            results[group.name] = analyze_group(group, config, bar)
    if not results:
        raise ValueError("No group to analyse: the source yielded no matrices; check the targets.")
    files = ["analysis.json"]
    if plots:
        from rasa_lora.analysis.plots import plot_convergence, plot_k_sweep

        write_atomic(out / "convergence.png", lambda path: plot_convergence(results, path))
        files.append("convergence.png")
        if any(record["k_sweep"] for record in results.values()):
            write_atomic(out / "k_sweep.png", lambda path: plot_k_sweep(results, path))
            files.append("k_sweep.png")
    report = {"config": asdict(config) | {"device": str(config.torch_device())}, "source": source,
              "torch": torch.__version__, "wall_time_s": time.perf_counter() - started, "files": files,
              "groups": results}
    write_atomic(out / "analysis.json", json.dumps(report, indent=1))
    return report


def parse_k_list(text: str) -> list[int] | None:
    """A list of k values as written on a command line: `all` -> None (0..r); `none` -> []; `0-8` or `0,1,2`."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text in ("none", ""):
        return []
    values: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        values += list(range(int(low), int(high or low) + 1))
    return values


def report_table(report: dict) -> str:
    """The per-group table of a `run_analysis` report, as printed by `rasa-lora analyze`."""
    lines = [f"{'group':<40} {'layers':>6} {'shape':>12} {'LoRA rel':>9} {'RaSA rel':>9} {'RaSA/LoRA':>9} "
             f"{'below@':>6} {'start':>8} {'iters':>6} {'spread':>7} {'best k':>6} {'time s':>7}"]
    for name, g in report["groups"].items():
        shape = "x".join(str(s) for s in g["shape"])
        ratio = f"{g['rasa_over_lora']:.4f}" if g["rasa_over_lora"] is not None else "-"
        iters = f"{g['iterations']}{'' if g['converged'] else '*'}"
        spread = f"{100 * g['start_spread']:.2f}%" if len(g["starts"]) > 1 else "-"
        lines.append(f"{name:<40} {g['num_layers']:>6} {shape:>12} {g['lora_relative_error']:>9.4f} "
                     f"{g['rasa_relative_error']:>9.4f} {ratio:>9} {str(g['first_iteration_below_lora']):>6} "
                     f"{g['rasa_start']:>8} {iters:>6} {spread:>7} {str(g['best_k']):>6} {g['wall_time_s']:>7.1f}")
    if any(not g["converged"] for g in report["groups"].values()):
        lines.append("* stopped at the iteration limit before the criterion (--tol) was met; raise --iters")
    return "\n".join(lines)
