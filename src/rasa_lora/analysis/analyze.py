"""Run the reconstruction analysis over groups and write `analysis.json`, `convergence.png`, `k_sweep.png`.

One group at a time (so only one group's deltas sit on the device): LoRA's optimum once, RaSA's coordinate
descent at (r, k) with the curve, then the k sweep reusing LoRA's solution (k = 0 is e_lora itself; the
requested k reuses the main fit when the sweep runs as many iterations). A tqdm bar counts coordinate-descent
iterations over all groups and sweep points.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rasa_lora.analysis.reconstruction import fit_rasa, lora_solution
from rasa_lora.analysis.sources import Group


@dataclass
class AnalysisConfig:
    """Settings of one analysis run (see `rasa-lora analyze --help`)."""

    r: int = 8
    k: int = 1
    iters: int = 20
    init: str = "random"
    variant: str = "fast"
    dtype: str = "float32"
    device: str = "auto"
    sweep: Sequence[int] | None = None  # k values; None = 0..r; [] = no sweep
    sweep_iters: int | None = None  # default: iters
    seed: int = 0
    svd_tol: float = 3e-5

    def __post_init__(self) -> None:
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


def analyze_group(group: Group, config: AnalysisConfig, bar=None) -> dict:
    """Everything `analysis.json` holds for one group."""
    started = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    M = group.deltas.to(device=config.torch_device(), dtype=dtype)
    fit_args = dict(init=config.init, variant=config.variant, dtype=dtype, seed=config.seed)
    if config.variant == "fast":
        fit_args["svd_tol"] = config.svd_tol
    lora = lora_solution(M, config.r, config.variant, seed=config.seed)

    def tick(_iteration: int, _error: float) -> None:
        if bar is not None:
            bar.update(1)

    main = fit_rasa(M, config.r, config.k, config.iters, lora=lora, progress=tick, **fit_args)
    sweep_iters = config.iters if config.sweep_iters is None else config.sweep_iters
    sweep: dict[str, float] = {}
    for k in config.sweep_values:
        if k == 0:
            sweep["0"] = lora.error
        elif k == config.k and sweep_iters == config.iters:
            sweep[str(k)] = main.final_error
        else:
            sweep[str(k)] = fit_rasa(M, config.r, k, sweep_iters, lora=lora, progress=tick, **fit_args).final_error
    return _record(group, config, main, lora, sweep, time.perf_counter() - started)


def _record(group: Group, config: AnalysisConfig, main, lora, sweep: dict[str, float], wall: float) -> dict:
    total = main.total_energy or 1.0
    below = [t + 1 for t, e in enumerate(main.error_curve) if e < main.lora_error]
    return {
        "modules": group.modules, "num_layers": len(group.modules), "shape": list(group.deltas.shape[1:]),
        "r": config.r, "k": config.k, "total_energy": main.total_energy,
        "lora_error": main.lora_error, "lora_relative_error": main.lora_error / total,
        "lora_solver_estimate": lora.tol_reached,
        "rasa_initial_error": main.initial_error, "rasa_error_curve": main.error_curve,
        "rasa_relative_error_curve": [e / total for e in main.error_curve],
        "rasa_final_error": main.final_error, "rasa_relative_error": main.final_error / total,
        "rasa_over_lora": main.final_error / main.lora_error if main.lora_error else None,
        "first_iteration_below_lora": below[0] if below else None,
        "k_sweep": sweep, "k_sweep_relative": {k: e / total for k, e in sweep.items()},
        "best_k": int(min(sweep, key=sweep.get)) if sweep else None,
        "svd_estimate": main.svd_estimate, "gram_fallbacks": main.gram_fallbacks, "passes_over_M": main.passes,
        "wall_time_s": wall,
    }


def run_analysis(groups: Iterable[Group], config: AnalysisConfig, out_dir: str | Path, source: dict,
                 num_groups: int | None = None, plots: bool = True) -> dict:
    """Analyse every group, write OUT/analysis.json (and the two PNGs); return the JSON object."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sweep_iters = config.iters if config.sweep_iters is None else config.sweep_iters
    reused = {0, config.k} if sweep_iters == config.iters else {0}
    extra = [k for k in config.sweep_values if k not in reused]
    per_group = config.iters + sweep_iters * len(extra)
    results: dict[str, dict] = {}
    with tqdm(total=per_group * num_groups if num_groups else None, unit="it", desc="analysis") as bar:
        for index, group in enumerate(groups):
            bar.set_description(f"group {index + 1}{'/' + str(num_groups) if num_groups else ''} {group.name}")
            results[group.name] = analyze_group(group, config, bar)
    if not results:
        raise ValueError("No group to analyse: the source yielded no matrices; check the targets.")
    report = {"config": asdict(config) | {"device": str(config.torch_device())}, "source": source,
              "torch": torch.__version__, "wall_time_s": time.perf_counter() - started, "groups": results}
    (out / "analysis.json").write_text(json.dumps(report, indent=1))
    if plots:
        from rasa_lora.analysis.plots import plot_convergence, plot_k_sweep

        plot_convergence(results, out / "convergence.png")
        if any(record["k_sweep"] for record in results.values()):
            plot_k_sweep(results, out / "k_sweep.png")
    return report
