"""Where the adapter's time goes: a torch.profiler trace of one training step, and micro-benchmarks.

    PYTHONPATH=src python3 benchmarks/experiments/profile_step.py --out $OUT/profile.txt
    PYTHONPATH=src python3 benchmarks/experiments/profile_step.py --out $OUT/p.txt --layers 32 --shape 4x4096 \
        --no-lora --no-thin

Builds a Llama-3.1-8B-wide model with few layers (bf16, CUDA), profiles one step of the frozen base, PEFT
LoRA r=8 and RaSA r=8 k=1 (dropout 0.05), and times the thin GEMMs the adapter launches at N = 7 and 8. Last,
the GPU time of each variant's step by kind of kernel (our Triton kernels, GEMMs, attention, the rest) and what
each kind adds over the frozen base, with the kernels of "the rest" that add the most.
"""

from __future__ import annotations

import argparse
import time

import torch
from speed import ALL_PROJ, Lion, build_llama  # noqa: E402
from torch.profiler import ProfilerActivity, profile


def thin_gemm_times(lines):
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for n in (7, 8, 32, 39, 40):
        A = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(4096, n, device="cuda", dtype=torch.bfloat16)
        for label, fn in (("x@A^T", lambda: x @ A.t()), ("g^T@x", lambda: g.t() @ x), ("g@A", lambda: g @ A)):  # noqa: B023
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            lines.append(f"thin gemm {label:<6} n={n:<3} {1e6 * (time.perf_counter() - start) / 50:8.1f} us")


OURS = ("_down_pack_kernel", "_up_kernel", "_up_rows_kernel", "_bwd_up_kernel", "_gu_kernel", "_gc_kernel",
        "_bwd_down_kernel", "_gx_kernel", "_gx_rows_kernel", "_ga_finalize_kernel", "_finalize_kernel")


def kind(name: str) -> str:
    """Our Triton kernels, GEMMs, attention, or the rest (elementwise, reductions, copies, fills)."""
    lowered = name.lower()
    if name.startswith(OURS):
        return "ours"
    if any(word in lowered for word in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "gemm"
    if any(word in lowered for word in ("flash", "fmha", "attention", "attn")):
        return "attention"
    return "rest"


def kernel_times(averages) -> dict:
    """GPU time (ms) of each kernel of a profile, by name (events that ran on the device themselves)."""
    times = {}
    for event in averages:  # only the device's own events: an op's "self" device time repeats its kernels'
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        device = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
        times[event.key] = times.get(event.key, 0.0) + device / 1e3
    return times


def breakdown(profiles: dict, lines: list) -> None:
    """Per variant, GPU ms by kind and the difference to the frozen base; the rest's largest differences."""
    base = profiles.get("frozen", {})
    kinds = ("ours", "gemm", "attention", "rest")
    lines.append("\n===== GPU ms of one step by kind of kernel (difference to the frozen base)")
    for label, times in profiles.items():
        by = {k: sum(t for name, t in times.items() if kind(name) == k) for k in kinds}
        ref = {k: sum(t for name, t in base.items() if kind(name) == k) for k in kinds}
        cells = "  ".join(f"{k} {by[k]:8.1f} ({by[k] - ref[k]:+7.1f})" for k in kinds)
        total, ref_total = sum(by.values()), sum(ref.values())
        lines.append(f"{label:<20} total {total:8.1f} ({total - ref_total:+7.1f})  {cells}")
        if label == "frozen":
            continue
        for k in ("gemm", "rest"):  # the kernels whose time moved most, both ways
            names = {name for name in (*times, *base) if kind(name) == k}
            diffs = sorted(((times.get(name, 0.0) - base.get(name, 0.0), name) for name in names),
                           key=lambda item: -abs(item[0]))[:6]
            for diff, name in diffs:
                lines.append(f"    {k:<4} {diff:+7.2f} ms  {name[:100]}")


def profile_variant(model, label, lines, shape=(2, 2048), profiles=None):
    ids = torch.randint(0, model.config.vocab_size, shape, device="cuda")
    optimizer = Lion(model.parameters())
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    if profiles is not None:
        profiles[label] = kernel_times(averages)
    busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages) / 1e3
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    lines.append(f"\n===== {label}: wall {wall * 1e3:.1f} ms (profiled), GPU kernel time {busy:.1f} ms "
                 f"({busy / (wall * 1e3):.0%} busy), {launches} kernel launches")
    lines.append(averages.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--no-thin", action="store_true")
    parser.add_argument("--shape", default="2x2048", help="batch x sequence of the profiled step")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    profiles: dict = {}
    from peft import LoraConfig, get_peft_model

    import rasa_lora

    lines: list[str] = []
    if not args.no_thin:
        thin_gemm_times(lines)
    model = build_llama(False, torch.device("cuda"))
    model.model.layers = model.model.layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    profile_variant(model, "frozen", lines, shape, profiles)
    if not args.no_lora:
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                      target_modules=ALL_PROJ))
        profile_variant(peft_model, "peft lora r8 d0.05", lines, shape, profiles)
        model = peft_model.unload()
    config = rasa_lora.RasaConfig(r=8, rasa_k=1, rasa_alpha=16, rasa_dropout=0.05, target_modules=ALL_PROJ)
    peft_model = get_peft_model(model, config)
    profile_variant(peft_model, "rasa r8k1 d0.05", lines, shape, profiles)
    breakdown(profiles, lines)
    text = "\n".join(lines)
    open(args.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
