"""`rasa-lora analyze` and `rasa-lora compress`.

    rasa-lora analyze BASE TUNED --out OUT            # dW of a full fine-tune
    rasa-lora analyze BASE --perturb-seed 0 --out OUT # a seeded stand-in fine-tune of BASE (CPU checks)
    rasa-lora analyze --adapter DIR --out OUT         # dW of a LoRA or RaSA adapter
    rasa-lora analyze --synthetic llama3-8b --out OUT # seeded layer-correlated matrices of real shapes
    rasa-lora compress BASE TUNED --r 8 --rasa-k 1 --out ADAPTER

Each fit runs three starts ("auto": the shared pool from the stacked deltas' singular vectors, Theorem 3.1's
construction, and a seeded random one; the best is kept), each until the error falls by less than --tol
(relative) per iteration on average over the last 5 iterations, or --iters iterations ran; --restarts N adds
N-1 random starts and reports the spread.

BASE/TUNED: a checkpoint directory, a hub name, a .gguf file, or "smollm2" (the embedded SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rasa-lora analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", help="base checkpoint (with TUNED or --perturb-seed)")
    parser.add_argument("tuned", nargs="?", help="fine-tuned checkpoint of the same architecture")
    parser.add_argument("--adapter", help="a LoRA or RaSA adapter directory instead of two checkpoints")
    parser.add_argument("--adapter-base", help="base model of --adapter (default: the adapter config's)")
    parser.add_argument("--synthetic", help="shape preset of seeded synthetic matrices: llama3-8b, smollm2-135m, tiny")
    parser.add_argument("--num-layers", type=int, help="layers per group for --synthetic (default: the preset's)")
    parser.add_argument("--perturb-seed", type=int, help="analyse a seeded synthetic perturbation of BASE")
    parser.add_argument("--perturb-scale", type=float, default=0.01, help="||dW|| / ||W|| of the perturbation")
    parser.add_argument("--targets", help="comma-separated module names (e.g. q_proj,v_proj); default all")
    parser.add_argument("--r", type=int, default=8)
    _fit_arguments(parser)
    parser.add_argument("--variant", choices=["fast", "exact"], default="fast")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--k-sweep", default="all", help="k values for Figure 3: all (0..r), none, 0-4, 0,1,8")
    parser.add_argument("--sweep-iters", type=int, help="iteration limit per sweep point (default: --iters)")
    parser.add_argument("--svd-tol", type=float, default=3e-5, help="fast variant's private-step tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output directory")
    return parser


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    """--rasa-k (and its deprecated alias --k), --iters, --tol, --init, --restarts: shared by analyze and compress."""
    from rasa_lora.analysis.defaults import DEFAULT_INIT, DEFAULT_MAX_ITERS, DEFAULT_TOL, DEFAULT_WINDOW, INITS

    parser.add_argument("--rasa-k", type=int, help="shared ranks per layer (k; default 1)")
    parser.add_argument("--k", type=int, dest="old_k", help=argparse.SUPPRESS)  # deprecated spelling of --rasa-k
    parser.add_argument("--iters", type=int, default=DEFAULT_MAX_ITERS,
                        help=f"most coordinate-descent iterations per start (default {DEFAULT_MAX_ITERS})")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL,
                        help=f"stop once the error falls by less than this fraction per iteration, on average over "
                             f"the last {DEFAULT_WINDOW} (default {DEFAULT_TOL:g}; 0 runs every iteration)")
    parser.add_argument("--init", choices=("auto",) + INITS, default=DEFAULT_INIT,
                        help="start: auto (stacked, theorem and random, the best kept), stacked, theorem, random")
    parser.add_argument("--restarts", type=int, default=1,
                        help="N: add N-1 random starts, keep the best, report the spread (default 1)")


def _rasa_k(args: argparse.Namespace, command: str) -> int:
    """--rasa-k, or the deprecated --k with a note (both given: they must agree)."""
    if args.old_k is None:
        return 1 if args.rasa_k is None else args.rasa_k
    if args.rasa_k is not None and args.rasa_k != args.old_k:
        raise ValueError(f"--k {args.old_k} and --rasa-k {args.rasa_k} disagree; give --rasa-k only.")
    print(f"{command}: --k is deprecated, use --rasa-k (the name of `rasa-lora train` and `compress`)",
          file=sys.stderr)
    return args.old_k


def _groups(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(iterable of groups, number of groups or None, source description)."""
    from rasa_lora.analysis import sources

    targets = args.targets.split(",") if args.targets else None
    chosen = [bool(args.adapter), bool(args.synthetic), args.base is not None]
    if sum(chosen) != 1:
        parser.error("give exactly one source: BASE TUNED, BASE --perturb-seed N, --adapter DIR or --synthetic NAME")
    if args.synthetic:
        layers, shapes = sources.preset_shapes(args.synthetic)
        layers = args.num_layers or layers
        return (sources.synthetic_groups(shapes, layers, args.seed), len(shapes),
                {"synthetic": args.synthetic, "num_layers": layers, "seed": args.seed})
    if args.adapter:
        groups = sources.adapter_groups(args.adapter, args.adapter_base)
        return groups, len(groups), {"adapter": args.adapter}
    if args.perturb_seed is not None:
        if args.tuned:
            parser.error("give TUNED or --perturb-seed, not both")
        groups = sources.perturbation_groups(args.base, args.perturb_seed, args.perturb_scale, targets)
        return (groups, len(groups),
                {"base": args.base, "perturb_seed": args.perturb_seed, "perturb_scale": args.perturb_scale})
    if args.tuned is None:
        parser.error("TUNED is missing: give BASE TUNED, or BASE --perturb-seed N")
    groups = sources.checkpoint_groups(args.base, args.tuned, targets)
    return groups, len(groups), {"base": args.base, "tuned": args.tuned}


def analyze_main(argv: list[str]) -> int:
    parser = _analyze_parser()
    args = parser.parse_args(argv)
    from rasa_lora.analysis.analyze import AnalysisConfig, parse_k_list, report_table, run_analysis
    try:
        config = AnalysisConfig(r=args.r, k=_rasa_k(args, "rasa-lora analyze"), iters=args.iters, init=args.init,
                                variant=args.variant, dtype=args.dtype, device=args.device,
                                sweep=parse_k_list(args.k_sweep), sweep_iters=args.sweep_iters, seed=args.seed,
                                svd_tol=args.svd_tol, tol=args.tol, restarts=args.restarts)
        groups, count, source = _groups(args, parser)
        report = run_analysis(groups, config, args.out, source, count)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"rasa-lora analyze: {error}", file=sys.stderr)
        return 2
    print(report_table(report))
    print(f"wrote {', '.join(str(Path(args.out) / name) for name in report['files'])} "
          f"in {report['wall_time_s']:.1f} s")
    return 0


def compress_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rasa-lora compress",
                                     description="Fit a RaSA adapter to a full fine-tune's weight deltas.")
    parser.add_argument("base", help="base checkpoint (directory, hub name, .gguf, or smollm2)")
    parser.add_argument("tuned", help="the full fine-tune of BASE")
    parser.add_argument("--r", type=int, default=8)
    _fit_arguments(parser)
    parser.add_argument("--targets", help="comma-separated module names; default every layer's linear weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="adapter directory to write")
    args = parser.parse_args(argv)
    import torch

    from rasa_lora.analysis.compress import compress

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    targets = args.targets.split(",") if args.targets else None
    try:
        k = _rasa_k(args, "rasa-lora compress")
        summary = compress(args.base, args.tuned, args.out, args.r, k, args.iters, args.init, targets,
                           device, seed=args.seed, tol=args.tol, restarts=args.restarts)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"rasa-lora compress: {error}", file=sys.stderr)
        return 2
    print(f"{'group':<40} {'LoRA r=' + str(args.r):>12} {'RaSA k=' + str(k):>12}   (relative error)"
          f" {'start':>8} {'iters':>6}")
    for name, g in summary["groups"].items():
        iters = f"{g['iterations']}{'' if g['converged'] else '*'}"
        print(f"{name:<40} {g['lora_relative_error']:>12.4f} {g['rasa_relative_error']:>12.4f}"
              f"{'':>20} {g['rasa_start']:>8} {iters:>6}")
    print(f"{'all groups':<40} {summary['lora_relative_error']:>12.4f} {summary['rasa_relative_error']:>12.4f}")
    print(f"saved the RaSA adapter to {args.out} (load it with PeftModel.from_pretrained after `import rasa_lora`)")
    return 0
