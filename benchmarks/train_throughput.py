"""Tokens/s of `rasa-lora train`'s own optimizer step with the adapter and with it removed (issue 24's trainer target:
RaSA within 15% of the frozen base's tokens/s), eager or compiled as the recipe says.

    PYTHONPATH=src python benchmarks/train_throughput.py --variants frozen,rasa,lora --steps 10 --warmup 3 \\
        --out $OUT/train_throughput.json -- --base-model /tmp/smollm2.gguf --dataset .data/gsm8k/train.jsonl \\
        --micro-batch-size 32 --global-batch-size 32 --dropout 0.05
    (append `--compile true --compile-mode reduce-overhead --pad-to-multiple-of 64` after `--` for CUDA graphs)

After `--`: a recipe as `rasa-lora train` takes it (a YAML path and/or `--key value` overrides). Each variant runs
the trainer's functions, not a copy of them: `prepare_run` (data, tokenization), `build_model` (the method's adapter,
gradient checkpointing), `build_optimizer`, `distributed.prepare_training`, `compile_model` when the recipe compiles,
and `train_step` for `--warmup` untimed, then `--steps` timed optimizer steps, the same steps (same data, same
order) for every variant, with Python's collector frozen as in a run. "frozen" is the base model with every weight
frozen and its input embeddings' output requiring grad (the backward runs through every layer, as an adapter's
needs), and one unused trainable scalar so the optimizer has a parameter; "rasa" and "lora" are the methods of the
recipe's rank. Prints tokens/s (tokens counted as the trainer counts them: non-padding tokens), the median step
time, peak GPU memory and each ratio to the frozen base, by tokens/s and by median step (the variants run the same
steps, so the ratio of median steps is the ratio of their rates without the outliers: the first variant to meet a
batch shape pays for it: benchmarks/RESULTS.md, "the trainer's tokens/s");
writes the rows, with every step's time, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch


def frozen_model(config, device):
    """The recipe's base model, frozen, without an adapter (see the module's docstring)."""
    from rasa_lora.models import load_model
    from rasa_lora.train import methods

    dtype = config.model_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    model = load_model(config.base_model, dtype=dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    model.register_parameter("throughput_unused", torch.nn.Parameter(torch.zeros(1)))
    if config.gradient_checkpointing:
        methods.enable_gradient_checkpointing(model, config.use_reentrant)
    model.enable_input_require_grads()
    return model.to(device).train()


def measure(values: dict, variant: str, steps: int, warmup: int) -> dict:
    from rasa_lora.ops import dropout
    from rasa_lora.train import distributed, trainer
    from rasa_lora.train.config import build_config

    with tempfile.TemporaryDirectory() as out:
        method = "rasa" if variant == "frozen" else variant
        config = build_config({**values, "method": method, "output_dir": out, "max_steps": warmup + steps})
        torch.manual_seed(config.seed)
        run = trainer.prepare_run(config)
        run.accelerator = distributed.make_accelerator()
        run.device = run.accelerator.device
        trainer.check_cuda_graphs(config, run.device)
        run.model = (frozen_model(config, run.device) if variant == "frozen"
                     else trainer.build_model(config, run.total_steps, run.device))
        run.optimizer = trainer.build_optimizer(run.model, config)
        run.scheduler = trainer.build_scheduler(run.optimizer, run.total_steps, config)
        if config.compile:
            dropout.reseed(run.device)
        run.model, run.optimizer, run.scheduler = distributed.prepare_training(
            run.accelerator, run.model, run.optimizer, run.scheduler, config.use_reentrant, config.micro_batch_size)
        if config.compile:
            trainer.compile_model(run)
        autocast = trainer.use_bf16(config, run.device)
        cuda = run.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, counts = [], []
        with trainer.collector_spares_setup():
            for step in range(warmup + steps):
                sync()
                start = time.perf_counter()
                _, tokens = trainer.train_step(run, step, autocast)  # reads the loss: the step has ended
                sync()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
                    counts.append(tokens)
        return {"variant": variant, "steps": steps, "tokens": sum(counts), "seconds": sum(times),
                "tokens_per_s": sum(counts) / sum(times), "median_step_ms": statistics.median(times) * 1e3,
                "step_ms": [t * 1e3 for t in times], "step_tokens": counts,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "compile": config.compile, "compile_mode": config.compile_mode if config.compile else None,
                "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="frozen,rasa", help="comma-separated: frozen, rasa, lora")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there)")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the recipe after `--`)."""
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def main(argv=None) -> int:
    own, recipe = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    from rasa_lora.train.cli import recipe_values

    values = {"progress_bar": False, **recipe_values(recipe)}
    rows = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        rows.append(measure(values, variant, args.steps, args.warmup))
        print(f"{variant}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    frozen = next((r for r in rows if r["variant"] == "frozen"), None)
    print(f"{'variant':8} {'tokens/s':>9} {'step ms':>9} {'peak GiB':>9} {'/ frozen':>9} {'median/':>9}")
    for r in rows:
        r["vs_frozen"] = r["tokens_per_s"] / frozen["tokens_per_s"] if frozen else None
        # the rate ratio by median steps (same steps, same tokens): frozen's median step over this one's
        r["vs_frozen_median"] = frozen["median_step_ms"] / r["median_step_ms"] if frozen else None
        peak = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'-':>9}"
        ratios = "".join(f" {r[k]:9.3f}" if r[k] is not None else f" {'-':>9}"
                         for k in ("vs_frozen", "vs_frozen_median"))
        print(f"{r['variant']:8} {r['tokens_per_s']:9.0f} {r['median_step_ms']:9.1f} {peak}{ratios}")
    if args.out:
        from rasa_lora.atomic import write_atomic

        write_atomic(args.out, json.dumps({"args": vars(args), "recipe": values, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
