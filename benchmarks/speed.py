"""Training-step speed and memory of RaSA against the frozen base, PEFT LoRA and an authors'-style RaSA.

Run on the GPU machine (one H200):
    PYTHONPATH=src python3 benchmarks/speed.py --out $OUT/speed.json [--smollm2 /tmp/smollm2.gguf]
On the CPU, for a smoke run:  PYTHONPATH=src python3 benchmarks/speed.py --small --out /tmp/speed.json

Every variant runs the same training step: forward, backward (gradient checkpointing, non-reentrant) and a
Lion update of the trainable parameters (none for the frozen base, which back-propagates to its inputs only).
Variants: frozen base; PEFT LoRA r=8 with dropout 0.05 and 0; an authors'-style RaSA module written here
(it concatenates private and shared factors on every call, dropout 0.05); our RaSA r=8 k=1, r=16 k=2,
r=32 k=4 (dropout 0.05) through `peft.get_peft_model`. Also forward-only inference of the base model and of
the merged RaSA model. Prints a table with median step time, tokens/s, peak memory and the ratios to the
frozen base and to PEFT LoRA r=8 (dropout 0.05), and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import time

import torch
from torch import nn

from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ


class AuthorsRasaLinear(nn.Module):
    """RaSA as the authors' code computes it: concatenate [A~; A_S] and [B~ B_S] on every call."""

    def __init__(self, base: nn.Linear, shared_A: nn.Parameter, shared_B: nn.Parameter, r: int, k: int,
                 num_layers: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        private = r - k
        self.A = nn.Parameter(torch.empty(private, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, private, device=base.weight.device))
        D = torch.cat([torch.full((private,), alpha / (2 * private)),
                       torch.full((num_layers * k,), alpha / (2 * num_layers * k))])
        self.D = nn.Parameter(D.to(base.weight.device))
        object.__setattr__(self, "shared", (shared_A, shared_B))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        shared_A, shared_B = self.shared
        A = torch.cat([self.A, shared_A], dim=0)
        B = torch.cat([self.B, shared_B], dim=1)
        update = ((self.dropout(x).to(A.dtype) @ A.t()) * self.D) @ B.t()
        return self.base(x) + update.to(x.dtype)


def apply_authors_rasa(model, r=8, k=1, alpha=16.0, dropout=0.05):
    """Swap every projection for `AuthorsRasaLinear`; returns (pools module, restore function)."""
    layers = model.model.layers
    pools = nn.ParameterList()
    originals = []
    for name in ALL_PROJ:
        parents = [layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp for layer in layers]
        first = getattr(parents[0], name)
        shared_A = nn.Parameter(torch.empty(len(layers) * k, first.in_features, device=first.weight.device))
        nn.init.kaiming_uniform_(shared_A, a=math.sqrt(5))
        shared_B = nn.Parameter(torch.zeros(first.out_features, len(layers) * k, device=first.weight.device))
        pools.extend([shared_A, shared_B])
        for parent in parents:
            base = getattr(parent, name)
            originals.append((parent, name, base))
            setattr(parent, name, AuthorsRasaLinear(base, shared_A, shared_B, r, k, len(layers), alpha, dropout))

    def restore():
        for parent, name, base in originals:
            setattr(parent, name, base)

    return pools, restore


class Lion:
    """Lion with foreach kernels (update sign(b1*m + (1-b1)*g), momentum lerp with b2)."""

    def __init__(self, params, lr=5e-4, betas=(0.9, 0.95)):
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.b1, self.b2) = lr, betas
        self.momentum = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        if not self.params:
            return
        grads = [p.grad for p in self.params]
        update = torch._foreach_lerp(grads, self.momentum, self.b1)
        torch._foreach_sign_(update)
        torch._foreach_add_(self.params, update, alpha=-self.lr)
        torch._foreach_lerp_(self.momentum, grads, 1 - self.b2)
        for p in self.params:
            p.grad = None


OUR_KERNELS = ("_down_pack_kernel", "_up_rows_kernel", "_bwd_up_kernel", "_gx_rows_kernel", "_ga_finalize_kernel",
               "_keep_mask_kernel")  # the last: the cuBLAS backend's dropout mask


def gpu_busy(one_step):
    """(GPU kernel time of one step, of which in our Triton kernels), in ms, from a CUDA-only torch.profiler trace
    (CUPTI records the kernels; no CPU-side tracing, so the host is barely slowed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one_step()
        torch.cuda.synchronize()
    total = ours = 0.0
    per_kernel: dict[str, list] = {}  # name -> [ms, launches]
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0)) / 1e3
        total += ms
        entry = per_kernel.setdefault(event.key[:90], [0.0, 0])
        entry[0] += ms
        entry[1] += event.count
        if event.key.startswith(OUR_KERNELS):
            ours += ms
    return total, ours, per_kernel


def timed_steps(model, batch, seq, vocab, steps, warmup, device, train=True, busy=False, host_profile=0):
    """Median seconds of a step, peak GiB, with `busy` (CUDA) (GPU ms, our kernels' ms, per-kernel [ms, launches])
    of one more step, and (fastest, slowest) step seconds."""
    # Training steps in training mode: transformers checkpoints only a module in training mode, and the adapters'
    # dropout is off in eval mode. (`from_pretrained` returns a model in eval mode: until 2026-11-29 session 4 the
    # SmolLM2 rows were measured that way, without checkpointing or dropout.)
    model.train(train)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    optimizer = Lion(model.parameters()) if train else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def one_step():
        if train:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(input_ids=ids)

    times, host, collecting = [], [], []
    stats = torch.cuda.memory_stats if device.type == "cuda" else dict
    before = {}
    if GC_FREEZE:
        gc.collect()
        gc.freeze()  # the model and everything alive now is never scanned again by the cyclic collector
    clock = _GcClock()
    gc.callbacks.append(clock)
    try:
        for step in range(warmup + steps):
            sync()
            if step == warmup:  # the allocator's counters from the first timed step on (warm-up allocates)
                before = stats()
            clock.total = 0.0
            start = time.perf_counter()
            one_step()
            issued = time.perf_counter()  # the host has queued the whole step (or waited in a synchronizing call)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
                host.append(issued - start)
                collecting.append(clock.total)
    finally:
        gc.callbacks.remove(clock)
    after = stats()
    # the caching allocator's calls into the driver during the timed steps (cudaMalloc / cudaFree; a cudaFree waits
    # for the GPU) and its retries after a failed allocation: none once warm, else a step may wait
    ALLOCATOR_EVENTS.update({key: after.get(key, 0) - before.get(key, 0)
                             for key in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                         "num_sync_all_streams")})
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    gpu = gpu_busy(one_step) if busy and device.type == "cuda" else (None, None, None)
    if host_profile and train:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(one_step)
        sync()
        pstats.Stats(profile).sort_stats("tottime").print_stats(host_profile)
    STEPS.update(step_ms=[t * 1e3 for t in times], host_ms=[t * 1e3 for t in host],
                 gc_ms=[t * 1e3 for t in collecting])
    return statistics.median(times), peak, gpu, (min(times), max(times), statistics.median(host),
                                                 statistics.median(collecting), max(collecting))


def host_probe(ops: int = 20000) -> float:
    """Microseconds per call of a fixed host workload (an in-place add on a tiny CPU tensor: Python, torch's
    dispatcher and the allocator-free kernel path), median of five rounds: how fast this host runs the kind of
    work a host-bound step is made of. The GPU machine's host varied from call to call (a RaSA step's host time
    417-554 ms at 4096 tokens for the same code, sessions 5-7) while a GPU-bound row cannot show it; rows of one
    run, and runs, can be compared by this."""
    x = torch.zeros(8)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(ops // 5):
            x.add_(1.0)
        rounds.append((time.perf_counter() - start) / (ops // 5) * 1e6)
    return statistics.median(rounds)


GC_FREEZE = False  # --gc-freeze
ALLOCATOR_EVENTS: dict = {}  # of the last timed_steps call
STEPS: dict = {}  # the last timed_steps call's timed steps, one by one: step_ms, host_ms, gc_ms


class _GcClock:
    """A `gc.callbacks` hook adding up the time Python's cyclic collector runs (`total`, seconds)."""

    def __init__(self) -> None:
        self.total, self.started = 0.0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.total += time.perf_counter() - self.started
            self.started = None


def build_llama(small: bool, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


VARIANTS = ("lora", "lora0", "authors", "rasa8", "rasa8acc", "rasa8nokeep", "rasa8d0", "rasa16", "rasa32", "merged")
# rasa8acc: RaSA r8 k1 d0.05 with the adapter's kernels adding into the base GEMMs' outputs
# (`set_base_gemm_adds(False)`, the layout before 2026-11-29 session 4) instead of the GEMMs adding into them
# rasa8nokeep: RaSA r8 k1 d0.05 with checkpointing's recomputation computing u again (`set_keep_u(False)`, the
# layer before 2026-11-29 session 6) instead of taking the u its forward kept


def run_variants(model, shapes, steps, warmup, device, label, variants=VARIANTS, busy=False, host_profile=0):
    """Measure the frozen base and the chosen `variants` (keys of VARIANTS) on `model`, shape by shape: every
    variant at the first shape, then every variant at the next, so the rows compared with each other run close
    in time. (Variant by variant, RaSA's 4096-token row ran right after PEFT LoRA's 16384-token row; in session
    5 it once came out 1.43x the frozen step against 1.14-1.17x in five other runs: cause not found.)"""
    results = []
    for shape in shapes:
        results += _run_variants_at(model, [shape], steps, warmup, device, label, variants, busy, host_profile)
    return results


def _run_variants_at(model, shapes, steps, warmup, device, label, variants, busy, host_profile):
    wanted = set(variants).__contains__
    from peft import LoraConfig, get_peft_model

    import rasa_lora
    from rasa_lora import ops

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    vocab = model.config.vocab_size
    results = []
    frozen_kernels = {}

    def measure(name, net, train=True):
        for batch, seq in shapes:
            started = time.time()
            probe_before = host_probe()
            seconds, peak, (gpu_ms, ours_ms, per_kernel), (fastest, slowest, host, gc_s, gc_max_s) = timed_steps(
                net, batch, seq, vocab, steps, warmup, device, train=train, busy=busy, host_profile=host_profile)
            row = {"model": label, "variant": name, "batch": batch, "seq": seq, "tokens": batch * seq,
                   "step_ms": seconds * 1e3, "tokens_per_s": batch * seq / seconds, "peak_gib": peak,
                   "gpu_busy_ms": gpu_ms, "our_kernels_ms": ours_ms,
                   "min_ms": fastest * 1e3, "max_ms": slowest * 1e3, "host_ms": host * 1e3,
                   "gc_ms": gc_s * 1e3, "gc_max_ms": gc_max_s * 1e3,  # Python's cyclic GC within a step
                   "unix_start": started, "unix_end": time.time(),  # to match against a clock/power log
                   "allocator": dict(ALLOCATOR_EVENTS),
                   "host_probe_us": [probe_before, host_probe()],  # this host's speed just before and after
                   "steps": dict(STEPS)}  # every timed step (is a slow median a slow host minute or a few stalls?)
            results.append(row)
            busy_text = f"  GPU busy {gpu_ms:7.1f} ms (our kernels {ours_ms:5.1f})" if gpu_ms is not None else ""
            events = " ".join(f"{k[4:]} {v}" for k, v in ALLOCATOR_EVENTS.items() if v)
            print(f"  {label:<10} {name:<24} {batch}x{seq:<5} {row['step_ms']:9.1f} ms (min {row['min_ms']:.1f}, max "
                  f"{row['max_ms']:.1f}, host {row['host_ms']:.1f}, GC {row['gc_ms']:.1f}/{row['gc_max_ms']:.1f}, "
                  f"probe {row['host_probe_us'][0]:.2f}/{row['host_probe_us'][1]:.2f} us)  "
                  f"{peak:6.2f} GiB{busy_text}{'  allocator: ' + events if events else ''}", flush=True)
            if per_kernel is not None:
                if name.startswith("frozen"):
                    frozen_kernels[(name, batch, seq)] = per_kernel
                elif train and ("frozen", batch, seq) in frozen_kernels:
                    # where the GPU time over the frozen base goes: kernels by added time, this step vs frozen's
                    base = frozen_kernels[("frozen", batch, seq)]
                    zero = [0.0, 0]
                    delta = {k: (per_kernel.get(k, zero)[0] - base.get(k, zero)[0],
                                 per_kernel.get(k, zero)[1] - base.get(k, zero)[1])
                             for k in set(per_kernel) | set(base)}
                    top = sorted(delta.items(), key=lambda item: -abs(item[1][0]))[:12]
                    row["kernel_delta_ms"] = {k: ms for k, (ms, _) in top}
                    row["kernel_delta_launches"] = {k: n for k, (_, n) in top}
                    for kernel_name, (ms, launches) in top:  # more time in as many launches: slower kernels
                        print(f"      {ms:+8.2f} ms {launches:+6d} launches  {kernel_name}", flush=True)

    measure("frozen", model)
    measure("frozen (inference)", model, train=False)
    for dropout, key in ((0.05, "lora"), (0.0, "lora0")):
        if wanted(key):
            config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=ALL_PROJ)
            peft_model = get_peft_model(model, config)
            measure(f"peft-lora r8 d{dropout}", peft_model)
            model = peft_model.unload()
    if wanted("authors"):
        pools, restore = apply_authors_rasa(model)
        measure("authors-rasa r8k1 d0.05", model)
        restore()
        del pools
    for r, k, dropout, key in ((8, 1, 0.05, "rasa8"), (8, 1, 0.0, "rasa8d0"), (16, 2, 0.05, "rasa16"),
                               (32, 4, 0.05, "rasa32")):
        if not (wanted(key) or (key == "rasa8" and (wanted("merged") or wanted("rasa8acc")
                                                    or wanted("rasa8nokeep")))):
            continue
        config = rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=16, rasa_dropout=dropout, target_modules=ALL_PROJ)
        peft_model = get_peft_model(model, config)
        if wanted(key):
            measure(f"rasa r{r}k{k} d{dropout}", peft_model)
        for variant, switch, what in (("rasa8acc", ops.set_base_gemm_adds, "adapter adds"),
                                      ("rasa8nokeep", ops.set_keep_u, "u recomputed")):
            if key == "rasa8" and wanted(variant):  # the same model with one of the layer's switches off
                switch(False)
                try:
                    measure(f"rasa r8k1 d0.05 ({what})", peft_model)
                finally:
                    switch(None)
        if key == "rasa8" and wanted("merged"):
            peft_model.merge_adapter()
            measure("rasa r8k1 merged (inference)", peft_model, train=False)
            peft_model.unmerge_adapter()
        model = peft_model.unload()
    return results


def add_ratios(results):
    index = {(r["model"], r["variant"], r["tokens"], r["batch"]): r for r in results}
    for row in results:
        key = (row["model"], "frozen", row["tokens"], row["batch"])
        lora = index.get((row["model"], "peft-lora r8 d0.05", row["tokens"], row["batch"]))
        if "inference" in row["variant"]:
            key = (row["model"], "frozen (inference)", row["tokens"], row["batch"])
            lora = None
        base = index[key]
        row["x_frozen"] = row["step_ms"] / base["step_ms"]
        row["x_lora"] = row["step_ms"] / lora["step_ms"] if lora else None
        row["mem_vs_frozen"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] == base["peak_gib"] else None


def print_table(results):
    print(f"\n{'model':<10} {'variant':<28} {'tokens':>10} {'ms/step':>9} {'tok/s':>9} {'GiB':>7} "
          f"{'x frozen':>8} {'x LoRA':>7} {'mem/frozen':>10} {'GPU busy ms':>11} {'ours ms':>7}")
    for r in results:
        lora = f"{r['x_lora']:.3f}" if r["x_lora"] else "-"
        mem = f"{r['mem_vs_frozen']:.4f}" if r["mem_vs_frozen"] else "-"
        busy = f"{r['gpu_busy_ms']:11.1f} {r['our_kernels_ms']:7.1f}" if r.get("gpu_busy_ms") is not None else ""
        print(f"{r['model']:<10} {r['variant']:<28} {r['batch']:>3}x{r['seq']:<6} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:9.0f} {r['peak_gib']:7.2f} {r['x_frozen']:8.3f} {lora:>7} {mem:>10} {busy}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU (smoke run)")
    parser.add_argument("--smollm2", default=None, help="path of the SmolLM2 GGUF file to measure too")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shapes", default="8x512,2x2048,4x4096", help="batch x sequence list for the 8B shape")
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama-3.1-8B shape (measure SmolLM2 only)")
    parser.add_argument("--kernel-configs", default=None,
                        help="JSON of Triton launch shapes (from benchmarks/kernel_timing.py --configs-out) to apply")
    parser.add_argument("--busy", action="store_true",
                        help="also profile one extra step per row (CUDA kernels only) for the GPU's busy time")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.collect() and gc.freeze() before each row's steps (a diagnostic: are slow steps "
                             "Python GC pauses? The GC column shows the collector's time within a step)")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also run one more training step per row under cProfile and print its N costliest "
                             "functions by own time (a diagnostic: where the host's time goes)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: " + ",".join(VARIANTS) + " (the frozen base always runs)")
    args = parser.parse_args()
    global GC_FREEZE
    GC_FREEZE = args.gc_freeze
    shapes_in_use = contextlib.ExitStack()
    if args.kernel_configs:  # other launch shapes for this run (`plans.configs` restores them at exit)
        from rasa_lora.ops import plans

        with open(args.kernel_configs) as handle:
            shapes_in_use.enter_context(plans.configs(json.load(handle)))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = VARIANTS if args.variants is None else tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.small:
        shapes = [(2, 16), (1, 32)]
    results = []
    if not args.no_llama:
        results = run_variants(build_llama(args.small, device), shapes, args.steps, args.warmup, device,
                               "tiny" if args.small else "llama-8b", variants, args.busy, args.host_profile)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.smollm2:
        import os

        from transformers import AutoModelForCausalLM

        small = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(args.smollm2), gguf_file=os.path.basename(args.smollm2), dtype=torch.bfloat16
        ).to(device)
        results += run_variants(small, [(8, 512), (4, 4096)], args.steps, args.warmup, device, "smollm2", variants,
                                args.busy, args.host_profile)
    add_ratios(results)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "steps": args.steps, "warmup": args.warmup}
    from rasa_lora.ops import plans

    meta["kernel_configs"] = plans.CONFIGS
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "results": results}, handle, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
