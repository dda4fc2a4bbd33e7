"""Host time and step time of a training step, eager against torch.compile: frozen base, PEFT LoRA r=8, RaSA r=8
(issue 24's targets; `docs/performance.md`, "torch.compile and the device seed").

On the GPU machine (random weights of each shape; bf16; gradient checkpointing; dropout 0.05):
    PYTHONPATH=src python benchmarks/host_time.py --out $OUT/host_time.json
    PYTHONPATH=src python benchmarks/host_time.py --shapes llama-8b --modes eager,compile  (one shape)
    PYTHONPATH=src python benchmarks/host_time.py --shapes smollm2 --modes eager,compile:reduce-overhead
    PYTHONPATH=src python benchmarks/host_time.py --shapes llama-8b --methods frozen,rasa --processes 5
A mode is `eager`, `compile` (with `--compile-mode`, default inductor's default) or `compile:MODE`
(`compile:reduce-overhead`: inductor's CUDA graphs; the device seed's state is marked static, each step begins with
`torch.compiler.cudagraph_mark_step_begin()`, and `cg_skips` counts the graphs inductor ran without CUDA graphs).
`--processes N` runs the whole measurement in N fresh processes, one after another, and reports each process's
ratios and, per method and mode, their range and how many met `--target` (the issue's "in every one of >= 5
processes").
Old tree against new: run the same command with PYTHONPATH naming the old tree's src/ (its `compile` rows measure
torch.compile with the RaSA layers as graph breaks). On the CPU, a smoke run of the logic:
    PYTHONPATH=src python benchmarks/host_time.py --small --out /tmp/host_time.json

Each variant (method x mode) runs `--warmup` steps (compilation happens there), then `--steps` timed steps of forward,
backward and an SGD update of the trainable parameters (the frozen base back-propagates to its input embeddings).
Per step: `step_ms`, the wall time with the device synchronized at both ends; `host_ms`, the wall time until the
host has queued the whole step (backward and update returned; where the GPU keeps up, the host's own cost, else an
upper bound); `cpu_ms`, the process's CPU time over the same span (all threads: autograd's device thread too).
Medians over the timed steps; ratios to the frozen base and to PEFT LoRA of the same mode. Peak GPU memory in GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

# (hidden, intermediate, layers, heads, kv heads, vocab), (batch, sequence) of the issue's targets
SHAPES = {
    "smollm2": ((576, 1536, 30, 9, 3, 49152), (16, 512)),
    "llama-1b": ((2048, 8192, 16, 32, 8, 128256), (8, 1024)),
    "llama-8b": ((4096, 14336, 32, 32, 8, 128256), (1, 4096)),
    "tiny": ((64, 160, 4, 4, 2, 256), (2, 32)),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    (hidden, inter, layers, heads, kv, vocab), _ = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, torch_dtype=dtype)


def adapt(model, method: str, dropout: float):
    """The model with `method`'s adapter: "frozen" (none), "lora" (PEFT LoRA r=8, alpha 16), "rasa" (r=8, k=1) on
    the fused path, "rasa-ref" (the same on the layer's reference path: plain PyTorch eq. 5, no fused ops)."""
    if method == "frozen":
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()  # checkpointing needs a tensor requiring grad into each block
        return model
    from peft import LoraConfig, get_peft_model

    import rasa_lora

    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=PROJECTIONS)
    else:
        config = rasa_lora.RasaConfig(r=8, rasa_k=1, rasa_alpha=16, rasa_dropout=dropout, target_modules=PROJECTIONS)
    return get_peft_model(model, config)


def measure(model, batch: int, seq: int, vocab: int, steps: int, warmup: int, device: torch.device,
            compiled: bool, compile_backend: str, compile_mode: str | None) -> dict:
    from torch._dynamo.utils import counters

    graphs = compiled and compile_mode == "reduce-overhead"
    skips_before = counters["inductor"]["cudagraph_skips"]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if compiled:
        from rasa_lora import settings
        from rasa_lora.ops import dropout as _dropout

        for name in ("FUSED", "KEEP_U", "KERNELS", "DEVICE_SEED"):  # an older tree lacks some
            switch = getattr(settings, name, None)
            if switch is not None:
                switch()  # the environment read before tracing (the trainer's `compile_model` does the same)
        if hasattr(_dropout, "device_state"):
            state = _dropout.device_state(device)
            if device.type == "cuda":  # advanced in place each forward: a static input of the CUDA graphs
                torch._dynamo.mark_static_address(state)
        if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
            # as `rasa-lora train` sets it: else the checkpointed layers run eagerly (docs/performance.md)
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        model.compile(backend=compile_backend, **({"mode": compile_mode} if compile_mode else {}))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def one_step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-6)
        model.zero_grad(set_to_none=True)

    step_ms, host_ms, cpu_ms = [], [], []
    compile_start = time.perf_counter()
    for step in range(warmup + steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        one_step()
        issued, cpu_issued = time.perf_counter(), time.process_time()
        sync()
        end = time.perf_counter()
        if step == warmup - 1:
            warm_s = end - compile_start
        if step >= warmup:
            step_ms.append((end - start) * 1e3)
            host_ms.append((issued - start) * 1e3)
            cpu_ms.append((cpu_issued - cpu_start) * 1e3)
    return {"step_ms": statistics.median(step_ms), "host_ms": statistics.median(host_ms),
            "cpu_ms": statistics.median(cpu_ms), "steps_ms": step_ms, "warmup_s": warm_s if warmup else 0.0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "tokens_per_s": batch * seq / (statistics.median(step_ms) / 1e3),
            "cg_skips": counters["inductor"]["cudagraph_skips"] - skips_before if graphs else None}


def graph_breaks(model, batch: int, seq: int, vocab: int, device: torch.device) -> tuple[int, list[str]]:
    """torch._dynamo.explain's break count of one training forward and each break's reason and place (RaSA's
    layers add none; gradient checkpointing in transformers breaks the graph for every model alike)."""
    ids = torch.randint(0, vocab, (batch, seq)).to(device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    reasons = [f"{r.reason.splitlines()[0]} @ {r.user_stack[-1].filename}:{r.user_stack[-1].lineno}"
               if r.user_stack else r.reason.splitlines()[0] for r in explanation.break_reasons]
    return explanation.graph_break_count, reasons


def add_ratios(rows: list[dict]) -> None:
    index = {(r["shape"], r["method"], r["mode"]): r for r in rows}
    for row in rows:
        for base, key in (("frozen", "x_frozen"), ("lora", "x_lora")):
            other = index.get((row["shape"], base, row["mode"]))
            row[key] = row["step_ms"] / other["step_ms"] if other else None
        frozen = index.get((row["shape"], "frozen", row["mode"]))
        row["mem_vs_frozen"] = (row["peak_gib"] / frozen["peak_gib"]
                                if frozen and row["peak_gib"] and frozen["peak_gib"] else None)


def print_table(rows: list[dict]) -> None:
    width = max([8] + [len(r["mode"]) for r in rows])
    print(f"{'proc':>4} {'shape':9} {'method':8} {'mode':{width}} {'tokens':>7} {'step ms':>9} {'host ms':>9} "
          f"{'cpu ms':>9} {'x frozen':>8} {'x LoRA':>7} {'mem/frozen':>10} {'breaks':>6} {'cg_skips':>8}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{fmt(r.get('process'), '4d')} {r['shape']:9} {r['method']:8} {r['mode']:{width}} {r['tokens']:7d} "
              f"{r['step_ms']:9.2f} {r['host_ms']:9.2f} {r['cpu_ms']:9.2f} {fmt(r['x_frozen'], '8.3f')} "
              f"{fmt(r['x_lora'], '7.3f')} {fmt(r['mem_vs_frozen'], '10.4f')} {fmt(r.get('graph_breaks'), '6d')} "
              f"{fmt(r.get('cg_skips'), '8d')}")


def print_processes(rows: list[dict], target: float) -> list[dict]:
    """Per (shape, method, mode) over the processes: the range of the ratio to the frozen base and how many
    processes met `target`."""
    groups: dict = {}
    for r in rows:
        if r["method"] != "frozen" and r.get("x_frozen") is not None:
            groups.setdefault((r["shape"], r["method"], r["mode"]), []).append(r["x_frozen"])
    summary = []
    for (shape, method, mode), ratios in groups.items():
        met = sum(ratio <= target for ratio in ratios)
        summary.append({"shape": shape, "method": method, "mode": mode, "processes": len(ratios),
                        "x_frozen_min": min(ratios), "x_frozen_max": max(ratios), "met": met, "target": target})
        print(f"{shape} {method} {mode}: x frozen {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} processes, "
              f"<= {target} in {met}")
    return summary


def run_processes(args, argv: list[str]) -> int:
    """The measurement in `args.processes` fresh processes, one after another; rows tagged with the process index.
    The JSON is rewritten after each process, so a run cut short keeps what finished."""
    import subprocess
    import tempfile

    rows, summary = [], []
    forwarded = []
    skip = False
    for item in argv:  # the same arguments, less --processes and --out
        if skip:
            skip = False
            continue
        if item in ("--processes", "--out"):
            skip = True
            continue
        if item.startswith(("--processes=", "--out=")):
            continue
        forwarded.append(item)
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.processes):
            path = os.path.join(tmp, f"{index}.json")
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded, "--out", path])
            if done.returncode != 0:
                print(f"process {index} failed (exit {done.returncode})", file=sys.stderr)
                continue
            with open(path) as f:
                rows.extend(dict(row, process=index) for row in json.load(f)["rows"])
            print_table(rows)
            summary = print_processes(rows, args.target)
            if args.out:
                write_json(args.out, {"args": vars(args), "rows": rows, "summary": summary})
    return 0 if rows else 1


def write_json(path: str, payload: dict) -> None:
    from rasa_lora.atomic import write_atomic

    write_atomic(path, json.dumps(payload, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama-1b,llama-8b", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--methods", default="frozen,lora,rasa",
                        help="comma-separated: frozen, lora, rasa (fused path), rasa-ref (the reference path)")
    parser.add_argument("--modes", default="eager,compile",
                        help="comma-separated: eager, compile (--compile-mode), compile:MODE (e.g. "
                             "compile:reduce-overhead)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: the shape's target)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the shape's target)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there)")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--explain", action="store_true", help="also count graph breaks (torch._dynamo.explain)")
    parser.add_argument("--small", action="store_true", help="CPU smoke run: the tiny shape, 2 x 32 tokens")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--processes", type=int, default=1, help="repeat the whole run in this many fresh processes")
    parser.add_argument("--target", type=float, default=1.10, help="ratio to the frozen base counted as met")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.processes > 1:
        return run_processes(args, list(sys.argv[1:] if argv is None else argv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ["tiny"] if args.small else args.shapes.split(",")
    import rasa_lora
    from rasa_lora.ops import set_fused_backend

    rows = []
    for shape in shapes:
        (_, _, _, _, _, vocab), (batch, seq) = SHAPES[shape]
        batch, seq = args.batch or batch, args.seq or seq
        for mode in args.modes.split(","):
            compile_mode = mode.split(":", 1)[1] if mode.startswith("compile:") else args.compile_mode
            for method in args.methods.split(","):
                torch._dynamo.reset()
                set_fused_backend(method != "rasa-ref")  # the fused path on the CPU too (CUDA's default)
                model = adapt(build(shape, device, dtype), method, args.dropout)
                row = {"shape": shape, "method": method, "mode": mode, "batch": batch, "seq": seq,
                       "tokens": batch * seq, "device": torch.cuda.get_device_name() if device.type == "cuda"
                       else "cpu", "torch": torch.__version__, "rasa_lora_src": os.path.dirname(rasa_lora.__file__)}
                if args.explain and mode.startswith("compile"):
                    from rasa_lora.ops import dropout as _dropout

                    if hasattr(_dropout, "device_state"):
                        _dropout.device_state(device)  # made before tracing, as `measure` and the trainer do
                    model.train()
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    row["graph_breaks"], row["break_reasons"] = graph_breaks(model, batch, seq, vocab, device)
                row.update(measure(model, batch, seq, vocab, args.steps, args.warmup, device,
                                   mode.startswith("compile"), args.compile_backend, compile_mode))
                rows.append(row)
                print(f"{shape} {method} {mode}: {row['step_ms']:.2f} ms a step, host {row['host_ms']:.2f} ms",
                      file=sys.stderr, flush=True)
                if args.out:  # after every row: a time limit that cuts the run keeps what was measured
                    write_json(args.out, {"args": vars(args), "rows": rows, "complete": False})
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    add_ratios(rows)
    print_table(rows)
    if args.out:
        write_json(args.out, {"args": vars(args), "rows": rows, "complete": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
