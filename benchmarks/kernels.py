"""Per-kernel times of the fused RaSA layer on the Llama-3.1-8B projection shapes, and a launch-shape sweep.

Run on the GPU machine:
    PYTHONPATH=src python3 benchmarks/kernels.py --out $OUT/kernels.json [--sweep] [--tokens 4096,16384]

For each projection shape (M tokens, K in, N out; r=8 k=1 over 32 layers, so R=64 packed ranks) it times,
with `triton.testing.do_bench` (L2 flushed between runs, median), every stage of one training step of the
layer: the base GEMMs a frozen model runs anyway (forward x W^T twice under gradient checkpointing,
backward g W) and the adapter's kernels (pack and down and up twice, bwd_up, bwd_down, finalize, and the
zeroing of the workspaces). It prints each kernel's time and achieved bandwidth and the adapter's share of
the layer's step time. With --sweep it first tries alternative launch shapes per kernel and keeps, for each
kernel, the one with the least total time over the shapes; `--configs-out FILE` saves them as JSON, which
`benchmarks/speed.py --kernel-configs FILE` applies.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

SHAPES = {  # name: (K in, N out)
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (4096, 1024),
    "gate_proj/up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}


def make(M, K, N, R, n, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    t = {
        "x": torch.randn(M, K, device=device, dtype=bf, generator=g),
        "W": torch.randn(N, K, device=device, dtype=bf, generator=g) * 0.02,
        "g": torch.randn(M, N, device=device, dtype=bf, generator=g),
        "A_p": torch.randn(7, K, device=device, generator=g) * 0.02,
        "A_s": torch.randn(n - 7, K, device=device, generator=g) * 0.02,
        "B_p": torch.randn(N, 7, device=device, generator=g) * 0.02,
        "B_s": torch.randn(N, n - 7, device=device, generator=g) * 0.02,
        "D": torch.rand(n, device=device, generator=g),
    }
    return t


def stage_times(M, K, N, p=0.05, n=39):
    """Median ms of each stage for one layer shape, under the current kernels.CONFIGS."""
    from triton.testing import do_bench

    from rasa_lora.ops import dropout, kernels

    R = kernels.packed_width(n)
    t = make(M, K, N, R, n)
    seed_h, thr = dropout.seed_hash(1234), dropout.threshold(p)
    A, C = kernels.pack(t["A_p"], t["B_p"], t["D"], t["A_s"], t["B_s"], torch.bfloat16, 1 / (1 - p))
    u = kernels.down(t["x"], A, seed_h, thr, True)
    y = t["x"] @ t["W"].t()
    gx = t["g"] @ t["W"]
    gu = torch.zeros(M, R, device="cuda")
    gc = torch.zeros(N, R, device="cuda")
    ga = torch.zeros(R, K, device="cuda")
    gd = torch.zeros(R, device="cuda")
    total = M * R + N * R + R * K + R
    bench = {
        "base x W^T": lambda: torch.nn.functional.linear(t["x"], t["W"]),
        "base g W": lambda: t["g"] @ t["W"],
        "pack": lambda: kernels.pack(t["A_p"], t["B_p"], t["D"], t["A_s"], t["B_s"], torch.bfloat16, 1.05),
        "down": lambda: kernels.down(t["x"], A, seed_h, thr, True),
        "up_": lambda: kernels.up_(y, u, C),
        "zeros": lambda: torch.zeros(total, device="cuda"),
        "bwd_up": lambda: kernels.bwd_up(t["g"], C, u, gu, gc),
        "bwd_down": lambda: kernels.bwd_down(t["x"], gu, A, gx, ga, seed_h, thr, True),
        "finalize": lambda: kernels.finalize(gc, t["B_p"], t["B_s"], t["D"], gd, 1.05),
    }
    nbytes = {"down": M * K * 2, "up_": 2 * M * N * 2, "bwd_up": M * N * 2, "bwd_down": 3 * M * K * 2}
    times = {name: do_bench(fn, warmup=10, rep=40, return_mode="median") for name, fn in bench.items()}
    gbs = {name: nbytes[name] / (times[name] * 1e-3) / 1e9 for name in nbytes}
    # one training step of the layer under gradient checkpointing: forward twice, backward once
    base = 2 * times["base x W^T"] + times["base g W"]
    adapter = (2 * (times["pack"] + times["down"] + times["up_"]) + times["zeros"] + times["bwd_up"]
               + times["bwd_down"] + times["finalize"])
    return times, gbs, base, adapter


SWEEP = {
    "down": [dict(BM=bm, BK=bk, splits=0, warps=w, stages=3)
             for bm, bk, w in itertools.product((32, 64, 128), (64, 128), (4, 8))],
    "up": [dict(BM=bm, BN=bn, warps=w, stages=1)
           for bm, bn, w in itertools.product((64, 128, 256), (64, 128, 256), (4, 8)) if bm * bn <= 32768],
    "bwd_up": [dict(BM=bm, BN=bn, splits=0, warps=w, stages=3)
               for bm, bn, w in itertools.product((64, 128, 256), (32, 64, 128), (4, 8)) if bm * bn <= 16384],
    "bwd_down": [dict(BM=bm, BK=bk, splits=0, warps=w, stages=3)
                 for bm, bk, w in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)) if bm * bk <= 16384],
}


def sweep(tokens):
    """For each kernel, the config with the least summed time over the shapes (other kernels at defaults)."""
    from triton.testing import do_bench

    from rasa_lora.ops import dropout, kernels

    seed_h, thr = dropout.seed_hash(1), dropout.threshold(0.05)
    cases = []
    for (K, N), M in itertools.product(SHAPES.values(), tokens):
        t = make(M, K, N, 64, 39)
        A, C = kernels.pack(t["A_p"], t["B_p"], t["D"], t["A_s"], t["B_s"], torch.bfloat16, 1.05)
        u = kernels.down(t["x"], A, seed_h, thr, True)
        cases.append((M, K, N, t, A, C, u, (t["x"] @ t["W"].t()), t["g"] @ t["W"],
                      torch.zeros(M, 64, device="cuda"), torch.zeros(N, 64, device="cuda"),
                      torch.zeros(64, K, device="cuda")))
    calls = {
        "down": lambda c: kernels.down(c[3]["x"], c[4], seed_h, thr, True),
        "up": lambda c: kernels.up_(c[7], c[6], c[5]),
        "bwd_up": lambda c: kernels.bwd_up(c[3]["g"], c[5], c[6], c[9], c[10]),
        "bwd_down": lambda c: kernels.bwd_down(c[3]["x"], c[9], c[4], c[8], c[11], seed_h, thr, True),
    }
    best, report = {}, {}
    for name, options in SWEEP.items():
        default = dict(kernels.CONFIGS[name])
        scored = []
        for option in options:
            kernels.CONFIGS[name] = option
            try:
                total = sum(do_bench(lambda c=c, fn=calls[name]: fn(c), warmup=5, rep=20, return_mode="median")
                            for c in cases)
            except Exception as error:  # e.g. out of shared memory for this shape
                print(f"  {name} {option}: failed ({type(error).__name__})", flush=True)
                continue
            scored.append((total, option))
        scored.sort(key=lambda item: item[0])
        kernels.CONFIGS[name] = default
        default_total = next((s for s, o in scored if o == default), None)
        best[name] = scored[0][1]
        report[name] = {"best": scored[0][1], "best_ms": scored[0][0], "default_ms": default_total,
                        "top5": [{"ms": s, "config": o} for s, o in scored[:5]]}
        print(f"{name}: best {scored[0][1]} {scored[0][0]:.3f} ms (default {default_total})", flush=True)
    return best, report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-tokens", default="4096")
    parser.add_argument("--configs-out", default=None)
    parser.add_argument("--configs", default=None, help="JSON of launch shapes to apply first")
    args = parser.parse_args()
    from rasa_lora.ops import kernels

    if args.configs:
        with open(args.configs) as handle:
            kernels.CONFIGS.update(json.load(handle))
    tokens = [int(v) for v in args.tokens.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.sweep:
        best, report = sweep([int(v) for v in args.sweep_tokens.split(",")])
        kernels.CONFIGS.update(best)
        out["sweep"] = report
        if args.configs_out:
            with open(args.configs_out, "w") as handle:
                json.dump(best, handle, indent=1)
    out["configs"] = kernels.CONFIGS
    rows = []
    for M in tokens:
        layer_base = layer_adapter = 0.0
        for name, (K, N) in SHAPES.items():
            times, gbs, base, adapter = stage_times(M, K, N)
            rows.append({"tokens": M, "shape": name, "K": K, "N": N, "ms": times, "GB/s": gbs,
                         "base_ms": base, "adapter_ms": adapter})
            layer_base += PER_LAYER[name] * base
            layer_adapter += PER_LAYER[name] * adapter
            print(f"M={M:<6} {name:<18} base {base * 1e3:8.1f} us  adapter {adapter * 1e3:7.1f} us "
                  f"({adapter / base:6.1%})  " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items()
                                                           if not k.startswith("base"))
                  + "  | GB/s " + " ".join(f"{k} {v:.0f}" for k, v in gbs.items()), flush=True)
        print(f"M={M:<6} one decoder layer's projections: base {layer_base:.3f} ms, adapter {layer_adapter:.3f} ms "
              f"= {layer_adapter / layer_base:.1%} of the projections' GEMMs", flush=True)
    out["rows"] = rows
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
