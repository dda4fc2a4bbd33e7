"""Speed of the reconstruction analysis (issue 3): fast variant against the exact full-SVD variant, same run.

    PYTHONPATH=src python3 benchmarks/analysis_speed.py $OUT/analysis_speed.json            # GPU, Llama-3.1-8B shapes
    PYTHONPATH=src python3 benchmarks/analysis_speed.py /tmp/speed.json --small             # CPU check, small shapes

Workload: all 7 projection groups of a Llama-3.1-8B-shaped synthetic delta (32 layers; q/o 4096x4096,
k/v 1024x4096, gate/up 14336x4096, down 4096x14336), full-rank (seeded layer-correlated low-rank parts plus
Gaussian noise), r = 8, k = 1, 20 coordinate-descent iterations, float32, "random" start. The fast time covers
LoRA's optimum (randomized) and the 20 iterations, with the final direct error check; the synthetic data is
generated on the device and not timed.

The exact variant (full SVD of every residual) is far too slow to run in full: it is timed on the first
`--exact-layers` layers of each group for `--exact-iters` iterations per start, and its full cost is
extrapolated linearly (its time is L SVDs of a b x a matrix per iteration, plus L SVDs for LoRA's optimum):
    exact_full = lora_svd_time * L / L_sub + iteration_time * (L / L_sub) * (iterations the fast run made)
               + exact start time (the "stacked" start's Gram eigen-decompositions, measured on the sub-run
                 and not scaled: an underestimate, so the speed-up is a lower bound on that part).
`--init` picks the start (default "random", the workload recorded in RESULTS.md; "auto" is the analysis'
default, two starts); `--tol` the convergence criterion (default 0: exactly `--iters` iterations per start).
Both the measured sub-run and the extrapolation are printed and written to the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rasa_lora.analysis.reconstruction import INITS, fit_rasa, lora_solution, stacked_factors
from rasa_lora.analysis.sources import PRESETS, synthetic_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, function, *args, **kwargs):
    _sync(device)
    started = time.perf_counter()
    value = function(*args, **kwargs)
    _sync(device)
    return value, time.perf_counter() - started


def _warm_up(device: torch.device) -> None:
    """First calls pay one-off costs (LAPACK/cuSOLVER set-up: 11 s for the first CPU SVD here); pay them untimed."""
    M = torch.randn(2, 64, 48, device=device)
    for variant in ("fast", "exact"):
        fit_rasa(M, 8, 1, 2, variant=variant, dtype=torch.float32)
    _sync(device)


def bench_group(M: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    L = M.shape[0]
    lora, fast_lora_s = _timed(device, lora_solution, M, args.r, "fast", seed=args.seed)
    fast, fast_fit_s = _timed(device, fit_rasa, M, args.r, args.k, args.iters, init=args.init, variant="fast",
                              lora=lora, seed=args.seed, tol=args.tol)
    fast_iterations = sum(start["iterations"] for start in fast.starts)
    sub = M[: args.exact_layers]
    exact_lora, exact_lora_s = _timed(device, lora_solution, sub, args.r, "exact")
    exact, exact_fit_s = _timed(device, fit_rasa, sub, args.r, args.k, args.exact_iters, init=args.init,
                                variant="exact", dtype=M.dtype, lora=exact_lora, seed=args.seed, tol=0)
    exact_start_s = 0.0
    if any(start["init"] == "stacked" for start in exact.starts):
        _, exact_start_s = _timed(device, stacked_factors, sub.double(), args.r, args.k, "exact")
    per_iteration = max(exact_fit_s - exact_start_s, 0.0) / (args.exact_iters * len(exact.starts))
    scale = L / sub.shape[0]
    exact_full_s = exact_lora_s * scale + per_iteration * scale * fast_iterations + exact_start_s
    fast_s = fast_lora_s + fast_fit_s
    return {
        "shape": list(M.shape), "fast_s": fast_s, "fast_lora_s": fast_lora_s, "fast_fit_s": fast_fit_s,
        "fast_passes_over_M": fast.passes, "fast_iterations": fast_iterations, "fast_start": fast.init,
        "fast_starts": [{key: start[key] for key in ("init", "iterations", "converged", "final_error")}
                        for start in fast.starts],
        "lora_relative_error": fast.lora_error / fast.total_energy,
        "rasa_relative_error": fast.final_error / fast.total_energy, "svd_estimate": fast.svd_estimate,
        "exact_measured": {"layers": sub.shape[0], "iters": args.exact_iters, "lora_svd_s": exact_lora_s,
                           "fit_s": exact_fit_s, "start_s": exact_start_s},
        "exact_extrapolated_s": exact_full_s, "speedup": exact_full_s / fast_s,
        "exact_sub_vs_fast_lora_error": exact_lora.error / lora_solution(sub, args.r, "fast").error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_path", help="where to write the results (JSON)")
    parser.add_argument("--small", action="store_true", help="SmolLM2 shapes, 8 layers, 5 iterations (CPU check)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--exact-layers", type=int, default=2)
    parser.add_argument("--exact-iters", type=int, default=1)
    parser.add_argument("--groups", help="comma-separated group suffixes (default: all 7)")
    parser.add_argument("--init", choices=("auto",) + INITS, default="random")
    parser.add_argument("--tol", type=float, default=0.0, help="convergence criterion (0: every iteration)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    preset = "smollm2-135m" if args.small else "llama3-8b"
    num_layers, shapes = PRESETS[preset]
    if args.small:
        num_layers, args.iters = 8, min(args.iters, 5)
    if args.groups:
        shapes = {name: shape for name, shape in shapes.items() if name.rsplit(".", 1)[-1] in args.groups.split(",")}
    device = torch.device(args.device)
    _warm_up(device)
    results: dict[str, dict] = {}
    for group in synthetic_groups(shapes, num_layers, args.seed, device=device):
        results[group.name] = bench_group(group.deltas, args, device)
        row = results[group.name]
        print(f"{group.name:<36} fast {row['fast_s']:7.2f} s   exact (extrapolated) "
              f"{row['exact_extrapolated_s']:9.1f} s   x{row['speedup']:.1f}", flush=True)
        del group
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fast_total = sum(row["fast_s"] for row in results.values())
    exact_total = sum(row["exact_extrapolated_s"] for row in results.values())
    report = {
        "preset": preset, "num_layers": num_layers, "r": args.r, "k": args.k, "iters": args.iters,
        "init": args.init, "tol": args.tol,
        "dtype": "float32", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "exact_note": "exact variant timed on a subset and extrapolated linearly "
        f"({args.exact_layers} layers x {args.exact_iters} iterations per group); see the script's docstring",
        "fast_total_s": fast_total, "exact_total_extrapolated_s": exact_total, "speedup": exact_total / fast_total,
        "groups": results,
    }
    Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_path).write_text(json.dumps(report, indent=1))
    print()
    print("| group | L x b x a | fast s | passes | LoRA rel | RaSA rel | exact s (extrap.) | x faster |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {'x'.join(map(str, row['shape']))} | {row['fast_s']:.2f} | {row['fast_passes_over_M']} | "
              f"{row['lora_relative_error']:.4f} | {row['rasa_relative_error']:.4f} | "
              f"{row['exact_extrapolated_s']:.1f} | {row['speedup']:.1f} |")
    print(f"| all {len(results)} groups | | {fast_total:.2f} | | | | {exact_total:.1f} | "
          f"{exact_total / fast_total:.1f} |")
    print(f"(exact: {report['exact_note']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
