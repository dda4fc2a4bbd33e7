"""Where the adapter's time goes: a torch.profiler trace of one training step, and micro-benchmarks.

    PYTHONPATH=src python3 benchmarks/profile_step.py --out $OUT/profile.txt

Builds a Llama-3.1-8B-wide model with few layers (bf16, CUDA), profiles one step of the frozen base, PEFT
LoRA r=8 and RaSA r=8 k=1 (dropout 0.05), and times the thin GEMMs the adapter launches at N = 7 and 8.
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


def profile_variant(model, label, lines):
    ids = torch.randint(0, model.config.vocab_size, (2, 2048), device="cuda")
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
    args = parser.parse_args()
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
    profile_variant(model, "frozen", lines)
    if not args.no_lora:
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                      target_modules=ALL_PROJ))
        profile_variant(peft_model, "peft lora r8 d0.05", lines)
        model = peft_model.unload()
    config = rasa_lora.RasaConfig(r=8, rasa_k=1, rasa_alpha=16, rasa_dropout=0.05, target_modules=ALL_PROJ)
    peft_model = get_peft_model(model, config)
    profile_variant(peft_model, "rasa r8k1 d0.05", lines)
    text = "\n".join(lines)
    open(args.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
