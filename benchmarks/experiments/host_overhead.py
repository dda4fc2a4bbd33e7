"""Host (Python) time the adapter adds to a training step, measured on the CPU with the GPU kernels stubbed out.

    PYTHONPATH=src python benchmarks/experiments/host_overhead.py [--rounds 20] [--steps 4] [--profile] [--out F]
    PYTHONPATH=src python benchmarks/experiments/host_overhead.py --layer  (one layer call alone: for A/B of edits)
    PYTHONPATH=src python benchmarks/experiments/host_overhead.py --gc     (Python's cyclic collector, gc.freeze())

At 4096 tokens a step of the Llama-3.1-8B shape on one H200, the host, not the GPU, sets the pace of our
RaSA step (`benchmarks/RESULTS.md`): the kernels take ~50 ms of GPU time over the frozen base, the step
~120 ms. This measures the host side alone, on any machine: a tiny Llama (4 layers, 28 projections, bf16,
gradient checkpointing, training mode, dropout 0.05) runs full training steps on the CPU while every Triton
kernel launch of the fused path is replaced by a no-op (the tensors are tiny, so what remains is Python,
autograd and dispatcher time). It prints the step time of the frozen base, PEFT LoRA and our RaSA (fused
path, Triton backend stubbed; also with checkpointing's recomputation computing u again, `set_keep_u(False)`) and
the host time each adds per adapted projection per step; with --profile, the functions that cost the most. The
variants take turns in rounds (`interleaved`), so a slow spell of a shared machine touches them alike. Absolute
numbers depend on the CPU; compare rows of one run (on the 2-core VM, rows of one run still move by ~+-30 us per
projection from run to run).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import time

import torch


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` returns a compiled kernel whose launcher does nothing,
    so later calls take `launch.Launcher`'s cached path with all its host-side work."""

    class run:  # noqa: N801 - a Triton 3.x CUDA launcher without scratch memory: its C `launch` is called directly
        launch = staticmethod(lambda *args: None)
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False

    function = 0
    packed_metadata = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self


def stub_kernels():
    from rasa_lora.ops import launch

    for launcher in vars(launch).values():
        if isinstance(launcher, launch.Launcher):
            launcher.fn = _NoLaunch()
            launcher.compiled.clear()
    launch.cacheable = lambda kernel, device: True
    launch.current_stream = lambda device: 0


def stub_triton_path() -> None:
    """One torch thread, every Triton launch stubbed (`stub_kernels`), the fused path on the Triton backend."""
    from rasa_lora.ops import set_fused_backend, set_kernel_backend

    torch.set_num_threads(1)
    stub_kernels()
    set_kernel_backend("triton")
    set_fused_backend(True)


def training_models(**sizes) -> dict:
    """The frozen base, PEFT LoRA r8 d0.05 and RaSA r8 k1 d0.05, each on its own `tiny_llama(**sizes)` in bf16,
    training mode, non-reentrant gradient checkpointing, base weights frozen."""
    from peft import LoraConfig, get_peft_model

    import rasa_lora
    from rasa_lora.models import LLAMA_PROJECTIONS, tiny_llama

    def base():
        model = tiny_llama(**sizes).to(torch.bfloat16).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    return {"frozen": base(),
            "peft-lora r8 d0.05": get_peft_model(base(), LoraConfig(r=8, lora_dropout=0.05,
                                                                    target_modules=LLAMA_PROJECTIONS)),
            "rasa r8k1 d0.05": get_peft_model(base(), rasa_lora.RasaConfig(r=8, rasa_k=1, rasa_dropout=0.05,
                                                                           target_modules=LLAMA_PROJECTIONS))}


def stepper(model, ids):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def interleaved(variants: dict, rounds: int, steps: int) -> dict:
    """Median seconds a step of each variant, measured in `rounds` rounds of `steps` steps, the variants taking turns
    within each round (in a rotating order): a slow spell of a shared machine then touches every variant alike,
    where measuring them one after the other let it land on one (session 6 saw 290-873 us per projection for the
    same code run after run). variants: name -> (step function, context manager factory or None)."""
    for step, context in variants.values():
        with context() if context else contextlib.nullcontext():
            for _ in range(5):
                step()
    per_step = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, context = variants[name]
            with context() if context else contextlib.nullcontext():
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                per_step[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(times) for name, times in per_step.items()}


@contextlib.contextmanager
def u_recomputed():
    from rasa_lora.ops import set_keep_u

    set_keep_u(False)
    try:
        yield
    finally:
        set_keep_u(None)


def layer_call(calls: int = 2000, rounds: int = 7) -> None:
    """Microseconds of host time for one `rasa_linear` forward and backward (one node, bf16, dropout 0.05, the
    Triton backend with every launch stubbed, tiny tensors): the layer's own Python and torch calls without a
    model around them; medians of `rounds` rounds move by ~+-2 us on the 2-core VM, where whole steps move by 30."""
    from rasa_lora.ops.rasa_linear import rasa_linear

    torch.manual_seed(0)
    stub_triton_path()
    M, K, N, NP, NS = 8, 64, 64, 7, 32
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(N, K, dtype=torch.bfloat16)
    factors = [torch.randn(*shape, requires_grad=True) for shape in ((NP, K), (N, NP), (NP + NS,), (NS, K), (N, NS))]
    grad = torch.randn(M, N, dtype=torch.bfloat16)

    def call():
        rasa_linear(x, weight, None, *factors, 0.05, 1234, last_in_block=False).backward(grad)

    for _ in range(200):
        call()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    print(f"one rasa_linear forward + backward, kernels stubbed: {statistics.median(per_call):.1f} us "
          f"(rounds {min(per_call):.1f}-{max(per_call):.1f})")


def collector(out: str | None, steps: int = 40) -> None:
    """What Python's cyclic collector costs a training step (a 32-layer tiny Llama, bf16, checkpointing, kernels
    stubbed; frozen base, PEFT LoRA, RaSA), with everything alive before training scanned by its full collections
    and with it frozen (`gc.freeze()`, as `rasa_lora.train` does). A full collection walks every tracked object
    in the process (~0.5 M here: torch, transformers and the models); the speed benchmark saw them take ~0.3 s
    on the GPU machine's host, once in 10-20 steps. Prints mean and median step, the collector's time a step and
    the full collections counted."""
    import gc

    stub_triton_path()
    models = training_models(num_layers=32, hidden_size=64, intermediate_size=128)
    ids = torch.randint(0, 128, (1, 8))
    clock = {"start": 0.0, "total": 0.0, "full": 0}

    def hook(phase, info):
        if phase == "start":
            clock["start"] = time.perf_counter()
        else:
            clock["total"] += time.perf_counter() - clock["start"]
            clock["full"] += info["generation"] == 2

    gc.callbacks.append(hook)
    result = {}
    print(f"{len(gc.get_objects())} objects tracked by the collector; {steps} steps a row")
    try:
        for name, model in models.items():
            step = stepper(model, ids)
            for _ in range(3):
                step()
            for frozen in (False, True):
                gc.collect()
                if frozen:
                    gc.freeze()
                clock.update(total=0.0, full=0)
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                if frozen:
                    gc.unfreeze()
                row = {"mean_ms": statistics.mean(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
                       "gc_ms_per_step": clock["total"] / steps * 1e3, "full_collections": clock["full"]}
                result[f"{name}{' (gc.freeze)' if frozen else ''}"] = row
                print(f"{name:<20} {'gc.freeze ' if frozen else 'as is     '} step mean {row['mean_ms']:6.1f} ms, "
                      f"median {row['median_ms']:6.1f} ms; collector {row['gc_ms_per_step']:5.2f} ms a step, "
                      f"{row['full_collections']} full collections", flush=True)
    finally:
        gc.callbacks.remove(hook)
    if out:
        with open(out, "w") as handle:
            json.dump(result, handle, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4, help="steps a variant takes in each round")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--gc", action="store_true",
                        help="time Python's cyclic collector within training steps, with and without gc.freeze()")
    parser.add_argument("--layer", action="store_true",
                        help="time one rasa_linear forward and backward (bf16, dropout, kernels stubbed) instead")
    args = parser.parse_args()
    if args.layer:
        return layer_call()
    if args.gc:
        return collector(args.out)
    from rasa_lora.models import LLAMA_PROJECTIONS

    torch.manual_seed(0)
    stub_triton_path()
    frozen, lora, rasa = training_models().values()
    projections = sum(1 for name, _ in frozen.named_modules() if name.split(".")[-1] in LLAMA_PROJECTIONS)
    ids = torch.randint(0, frozen.config.vocab_size, (1, 8))
    rasa_step = stepper(rasa, ids)
    variants = {
        "frozen": (stepper(frozen, ids), None),
        "peft-lora r8 d0.05": (stepper(lora, ids), None),
        "rasa r8k1 d0.05 (kernels stubbed)": (rasa_step, None),
        "rasa r8k1 d0.05, u recomputed": (rasa_step, u_recomputed),
    }
    rows = interleaved(variants, args.rounds, args.steps)
    print(f"{projections} adapted projections, median of {args.rounds} rounds of {args.steps} steps, interleaved")
    result = {}
    for name, seconds in rows.items():
        added = (seconds - rows["frozen"]) / projections * 1e6
        result[name] = {"step_ms": seconds * 1e3, "added_us_per_projection": added}
        print(f"{name:<36} {seconds * 1e3:8.2f} ms/step   +{added:6.1f} us per projection per step")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            rasa_step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler).print_callers("named_modules|genexpr|\\(to\\)|empty|randint|addmm_")


if __name__ == "__main__":
    main()
