"""Host (Python) time the adapter adds to a training step, measured on the CPU with the GPU kernels stubbed out.

    PYTHONPATH=src python benchmarks/host_overhead.py [--profile] [--out FILE.json]

At 4096 tokens a step of the Llama-3.1-8B shape on one H200, the host, not the GPU, sets the pace of our
RaSA step (`benchmarks/RESULTS.md`): the kernels take ~50 ms of GPU time over the frozen base, the step
~120 ms. This measures the host side alone, on any machine: a tiny Llama (4 layers, 28 projections, bf16,
gradient checkpointing, training mode, dropout 0.05) runs full training steps on the CPU while every Triton
kernel launch of the fused path is replaced by a no-op (the tensors are tiny, so what remains is Python,
autograd and dispatcher time). It prints the step time of the frozen base, PEFT LoRA and our RaSA (fused
path, Triton backend stubbed) and the host time each adds per adapted projection per step; with --profile, the
functions that cost the most. Absolute numbers depend on the CPU; compare rows of one run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` returns a compiled kernel whose launcher does nothing,
    so later calls take `kernels._Launcher`'s cached path with all its host-side work."""

    class run:  # noqa: N801 - a Triton 3.x CUDA launcher without scratch memory: its C `launch` is called directly
        launch = staticmethod(lambda *args: None)
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False

    function = 0
    packed_metadata = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self


def stub_kernels():
    from rasa_lora.ops import kernels

    for launcher in vars(kernels).values():
        if isinstance(launcher, kernels._Launcher):
            launcher.fn = _NoLaunch()
            launcher.compiled.clear()
    kernels._cacheable = lambda kernel, device: True
    kernels._current_stream = lambda device: 0


def step_time(model, ids, steps):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    import rasa_lora
    from rasa_lora.models import LLAMA_PROJECTIONS, tiny_llama
    from rasa_lora.ops import set_fused_backend, set_kernel_backend

    torch.manual_seed(0)
    torch.set_num_threads(1)
    stub_kernels()
    set_kernel_backend("triton")
    set_fused_backend(True)
    model = tiny_llama().to(torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    projections = sum(1 for name, _ in model.named_modules() if name.split(".")[-1] in LLAMA_PROJECTIONS)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    rows = {}
    rows["frozen"], _ = step_time(model, ids, args.steps)
    lora = get_peft_model(model, LoraConfig(r=8, lora_dropout=0.05, target_modules=LLAMA_PROJECTIONS))
    rows["peft-lora r8 d0.05"], _ = step_time(lora, ids, args.steps)
    model = lora.unload()
    rasa = get_peft_model(model, rasa_lora.RasaConfig(r=8, rasa_k=1, rasa_dropout=0.05,
                                                      target_modules=LLAMA_PROJECTIONS))
    rows["rasa r8k1 d0.05 (kernels stubbed)"], rasa_step = step_time(rasa, ids, args.steps)
    print(f"{projections} adapted projections, median of {args.steps} steps")
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
