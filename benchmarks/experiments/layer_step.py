"""One projection's whole training step (frozen base against the fused RaSA layer in each of its modes).

    PYTHONPATH=src python3 benchmarks/experiments/layer_step.py --out $OUT/layer_step.json [--tokens 4096,16384]

For each Llama-3.1-8B projection shape it times, as GPU time (the step replayed from a CUDA graph,
`triton.testing.do_bench_cudagraph`, median), what gradient checkpointing runs per projection and step:
a forward without autograd, the recomputed forward and the backward (`torch.autograd.grad` of the input and,
for RaSA, of the five factors). Variants:

    frozen        y = F.linear(x, W); the backward computes dL/dx only
    gemm-adds     fused RaSA r=8 k=1 (L=32, R=64), d0.05; the base GEMMs add into the adapter's term (cuBLAS beta=1)
    accumulate    the same; the adapter's kernels add into the base GEMMs' outputs (`set_base_gemm_adds(False)`)

It prints each variant's time, its excess over the frozen step, and the excess summed over one step of the
32-layer model (q, k, v, o, gate, up, down per layer), all measured in this one run.
A CPU dry run of the logic (Triton's interpreter, tiny shapes, float32, plain timing):
    TRITON_INTERPRET=1 LAYER_DRY_RUN=1 PYTHONPATH=src python3 benchmarks/experiments/layer_step.py \
        --out /tmp/l.json --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

DRY = os.environ.get("LAYER_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16
SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate_proj/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}  # (K in, N out)
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}
LAYERS = 32
VARIANTS = ("frozen", "gemm-adds", "accumulate")


def _timer():
    if DRY:
        def once(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return once
    from triton.testing import do_bench_cudagraph

    return lambda fn: do_bench_cudagraph(fn, rep=30, return_mode="median")


def case(M, K, N, private=7, shared=32, p=0.05):
    """The step of one projection, per variant, as a call."""
    from rasa_lora.ops import rasa_linear, set_base_gemm_adds, set_kernel_backend

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(True)
    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE, generator=g) * 0.02
    upstream = torch.randn(M, N, device=DEVICE, dtype=DTYPE, generator=g)
    factors = [(torch.randn(*shape, device=DEVICE, generator=g) * 0.02).requires_grad_(True)
               for shape in ((private, K), (N, private), (private + shared,), (shared, K), (N, shared))]

    def frozen():
        with torch.no_grad():
            F.linear(x, W)
        return torch.autograd.grad(F.linear(x, W), [x], upstream)

    def rasa(adds):
        def step():
            set_kernel_backend("triton")
            set_base_gemm_adds(adds)
            try:
                with torch.no_grad():
                    rasa_linear(x, W, None, *factors, dropout_p=p, seed=1234)
                return torch.autograd.grad(rasa_linear(x, W, None, *factors, dropout_p=p, seed=1234), [x, *factors],
                                           upstream)
            finally:
                set_kernel_backend(None)
                set_base_gemm_adds(None)

        return step

    return {"frozen": frozen, "gemm-adds": rasa(True), "accumulate": rasa(False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="4096,16384")
    args = parser.parse_args()
    timer = _timer()
    rows = []
    for M in (int(t) for t in args.tokens.split(",")):
        totals = dict.fromkeys(VARIANTS, 0.0)
        for name, (K, N) in SHAPES.items():
            if DRY:
                K, N = K // 64, N // 64
            calls = case(M, K, N)
            times = {variant: timer(calls[variant]) for variant in VARIANTS}
            for variant in VARIANTS:
                totals[variant] += times[variant] * PER_LAYER[name] * LAYERS
            rows.append({"tokens": M, "shape": name, "K": K, "N": N, **{f"{v}_ms": times[v] for v in VARIANTS}})
            extra = {v: "" if v == "frozen" else f" (+{(times[v] - times['frozen']) * 1e3:6.1f})" for v in VARIANTS}
            print(f"M={M:<6} {name:<18} " + "  ".join(f"{v} {times[v] * 1e3:8.1f} us{extra[v]}" for v in VARIANTS),
                  flush=True)
        rows.append({"tokens": M, "shape": "model step (32 layers)", **{f"{v}_ms": totals[v] for v in VARIANTS}})
        print(f"M={M:<6} 32-layer step: " + "  ".join(
            f"{v} {totals[v]:7.1f} ms" + ("" if v == "frozen" else f" (x{totals[v] / totals['frozen']:.3f}, "
                                                                   f"+{totals[v] - totals['frozen']:.1f} ms)")
            for v in VARIANTS), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
