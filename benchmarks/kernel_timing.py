"""Per-kernel times of the fused RaSA layer on the Llama-3.1-8B (or SmolLM2-135M) projection shapes, and a
launch-shape sweep.

Run on the GPU machine:
    PYTHONPATH=src python3 benchmarks/kernel_timing.py --out $OUT/kernels.json [--sweep] [--tokens 4096,16384]
    PYTHONPATH=src python3 benchmarks/kernel_timing.py --model smollm2 --tokens 8192 --refs --out $OUT/k135m.json

For each projection shape (M tokens, K in, N out; r=8 k=1 over the model's L layers, so 7 + L ranks packed to
R=64) it times,
with `triton.testing.do_bench` (L2 flushed between runs, median), every stage of one training step of the
layer: the base GEMMs a frozen model runs anyway (forward x W^T twice under gradient checkpointing,
backward g W) and the adapter's kernels (down_and_pack and up_ twice; the backward's pack, bwd_up, bwd_down, and
the zeroing of the workspace). It prints each kernel's time and achieved bandwidth and the adapter's share of
the layer's step time. With --sweep it first tries alternative launch shapes per kernel (each under
`plans.configs`) and keeps, for each kernel, the one with the least total time over the shapes;
`--configs-out FILE` saves them as JSON, which `benchmarks/speed.py --kernel-configs FILE` applies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

# A dry run of this script's logic on the CPU, under Triton's interpreter (tiny shapes, float32, two options per
# kernel): TRITON_INTERPRET=1 KERNELS_DRY_RUN=1 python benchmarks/kernel_timing.py --sweep --out /tmp/k.json --tokens 64
DRY = os.environ.get("KERNELS_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16

SHAPES = {  # name: (K in, N out); `--model` picks one of MODELS into it
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (4096, 1024),
    "gate_proj/up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}
MODELS = {  # name: (projection shapes, layers L); each layer of r=8 k=1 has 7 + L ranks
    "llama-8b": (dict(SHAPES), 32),
    "smollm2": ({"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate_proj/up_proj": (576, 1536),
                 "down_proj": (1536, 576)}, 30),
}
RANKS = [7 + 32]  # the layer's rank count n, set from --model


def make(M, K, N, R, n, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(0)
    bf = DTYPE
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


def _timers():
    if DRY:
        def once(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return once, once
    from triton.testing import do_bench, do_bench_cudagraph

    def host(fn):  # what one call costs with the host's launch time included (an idle GPU waits for it)
        return do_bench(fn, warmup=10, rep=40, return_mode="median")

    def gpu(fn):  # GPU time alone: the call replayed from a CUDA graph
        return do_bench_cudagraph(fn, rep=20, return_mode="median")

    return host, gpu


def layer_case(M, K, N, seed_h, thr, n=None, dropout=True):
    """One projection's tensors, and each adapter stage of a training step as a call on them, as the layer's
    default path runs them (the base GEMMs add into the adapter's terms: `up_` and the dL/dx part of `bwd_down`
    write their outputs without reading them; `rasa_linear.set_base_gemm_adds`)."""
    from rasa_lora.ops import plans
    from rasa_lora.ops import triton_backend as kernels

    n = RANKS[0] if n is None else n
    R = plans.packed_width(n)
    t = make(M, K, N, R, n)
    factors = [t[k] for k in ("A_p", "B_p", "D", "A_s", "B_s")]
    u, A, C = kernels.down_and_pack(t["x"], *factors, 1.05, seed_h, thr, dropout)
    y, gx = t["x"] @ t["W"].t(), t["g"] @ t["W"]
    NP, NS = t["A_p"].shape[0], t["A_s"].shape[0]
    gu, gc, gap, gas, gd, gbp, gbs = (torch.zeros(*shape, device=DEVICE)
                                      for shape in ((M, R), (N, R), (NP, K), (NS, K), (n,), (N, NP), (N, NS)))
    calls = {
        "down_and_pack": lambda: kernels.down_and_pack(t["x"], *factors, 1.05, seed_h, thr, dropout),
        "up_": lambda: kernels.up_(y, u, C, accumulate=False),
        "pack": lambda: kernels.pack(*factors, DTYPE, 1.05),
        "bwd_up": lambda: kernels.bwd_up(t["g"], C, u, gu, gc, n),
        "bwd_down": lambda: kernels.bwd_down(t["x"], gu, A, gx, gap, gas, gc, t["B_p"], t["B_s"], t["D"], gd, gbp,
                                             gbs, 1.05, seed_h, thr, dropout, accumulate=False),
    }
    # the dA part of bwd_down alone (no dL/dx): bwd_down minus this is the dL/dx kernel
    calls["ga"] = lambda: kernels.bwd_down(t["x"], gu, A, None, gap, gas, gc, t["B_p"], t["B_s"], t["D"], gd, gbp,
                                           gbs, 1.05, seed_h, thr, dropout)
    return t, R, calls


# bytes each stage must move through HBM (token-sized tensors only), for the GB/s columns
def _nbytes(M, K, N):
    return {"down_and_pack": M * K * 2, "up_": M * N * 2, "bwd_up": M * N * 2, "bwd_down": 2 * M * K * 2,
            "ga": M * K * 2, "ref read x": M * K * 2, "ref write y": M * N * 2, "ref copy x": 2 * M * K * 2}


def stage_times(M, K, N, p=0.05, n=None, dropout=True, refs=False):
    """Median ms of each stage for one layer shape, under the current plans.CONFIGS: (GPU, with host).
    With refs, also what PyTorch's own memory-bound kernels reach on the same sizes (a read of x, a write of y,
    a copy of x): the bandwidth our kernels could hope for."""
    from rasa_lora.ops import dropout as hashed

    host, gpu = _timers()
    n = RANKS[0] if n is None else n
    t, R, calls = layer_case(M, K, N, hashed.seed_hash(1234), hashed.threshold(p), n, dropout)
    total = M * R + N * R + R * K + R
    bench = {
        "base x W^T": lambda: torch.nn.functional.linear(t["x"], t["W"]),
        "base g W": lambda: t["g"] @ t["W"],
        **calls,
        "zeros": lambda: torch.zeros(total, device=DEVICE),
    }
    if refs:
        y, xc = torch.empty(M, N, device=DEVICE, dtype=DTYPE), torch.empty_like(t["x"])
        bench["ref read x"] = lambda: t["x"].sum(dtype=torch.float32)
        bench["ref write y"] = lambda: y.fill_(1.0)
        bench["ref copy x"] = lambda: xc.copy_(t["x"])
    nbytes = {k: v for k, v in _nbytes(M, K, N).items() if k in bench}
    times = {name: gpu(fn) for name, fn in bench.items()}
    with_host = {name: host(fn) for name, fn in bench.items()}
    gbs = {name: nbytes[name] / (times[name] * 1e-3) / 1e9 for name in nbytes}

    def step(tm):  # one training step of the layer under gradient checkpointing: forward twice, backward once
        base = 2 * tm["base x W^T"] + tm["base g W"]
        # (the backward takes the recomputation's pack: no "pack" of its own)
        # (a fixed yardstick since session 3: it counts `down` twice, though since session 6 the recomputation takes
        # the u its forward kept and runs `pack` instead, so it overstates the default path by one `down` less a
        # `pack` per projection, ~0.5 ms a layer at 16384 tokens on the Llama-3.1-8B shape)
        adapter = 2 * (tm["down_and_pack"] + tm["up_"]) + tm["zeros"] + tm["bwd_up"] + tm["bwd_down"]
        return base, adapter

    return times, with_host, gbs, step(times), step(with_host)


def _grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


SWEEP = {
    "down": [c for c in _grid(BM=(32, 64, 128, 256), BK=(64, 128), splits=(0,), warps=(4, 8), stages=(3,),
                              programs=(264, 528, 1056), pack=("fused", "separate")) if c["BM"] * c["BK"] <= 16384],
    "up": _grid(BM=(64, 128), BN=(64, 128), warps=(4, 8), stages=(2,), programs=(264, 528)),
    "bwd_up": _grid(BM=(128, 256), BN=(32, 64), splits=(0,), warps=(8,), stages=(3,), programs=(264, 528)),
    "gx": _grid(BM=(64, 128), BK=(64, 128), warps=(4, 8), stages=(2,), programs=(264, 528)),
    "ga": _grid(BM=(32, 64, 128), BK=(64, 128), splits=(0,), warps=(4, 8), stages=(3,),
                programs=(132, 264, 528, 1056)),
}


# --wide: deeper pipelines and longer tiles along the streamed dimension (more bytes in flight per SM).
WIDE = {
    "down": [c for c in _grid(BM=(64, 128), BK=(64, 128, 256), splits=(0,), warps=(4, 8), stages=(4, 5),
                              programs=(264, 528), pack=("separate",)) if c["BM"] * c["BK"] <= 16384],
    "up": [c for c in _grid(BM=(64, 128), BN=(128, 256), warps=(4, 8), stages=(2, 3), programs=(264, 528))
           if c["BM"] * c["BN"] <= 32768],
    "bwd_up": _grid(BM=(128, 256, 512), BN=(32, 64, 128), splits=(0,), warps=(8, 16), stages=(2, 4, 5),
                    programs=(132, 264, 528)),
    "gx": [c for c in _grid(BM=(64, 128), BK=(128, 256), warps=(4, 8), stages=(2, 3), programs=(264, 528))
           if c["BM"] * c["BK"] <= 32768],
    "ga": [c for c in _grid(BM=(32, 64), BK=(128, 256), splits=(0,), warps=(4, 8), stages=(4, 5),
                            programs=(264, 528)) if c["BM"] * c["BK"] <= 16384],
}


def sweep(tokens):
    """For each kernel, the launch shape with the least summed GPU time over the shapes (later kernels are swept
    with the earlier winners); every option runs under `plans.configs`, so the committed shapes come back."""
    from rasa_lora.ops import dropout, plans

    _, gpu = _timers()
    seed_h, thr = dropout.seed_hash(1), dropout.threshold(0.05)
    stage_of = {"down": "down_and_pack", "up": "up_", "bwd_up": "bwd_up", "gx": "bwd_down", "ga": "bwd_down"}
    cases = [layer_case(M, K, N, seed_h, thr)[2] for (K, N), M in itertools.product(SHAPES.values(), tokens)]
    best, report = {}, {}
    for name, options in SWEEP.items():
        scored = []
        for option in options:
            with plans.configs({**best, name: option}):
                try:
                    total = sum(gpu(c[stage_of[name]]) for c in cases)
                except Exception as error:  # e.g. out of shared memory for this shape
                    print(f"  {name} {option}: failed ({type(error).__name__})", flush=True)
                    continue
            scored.append((total, option))
        scored.sort(key=lambda item: item[0])
        best[name] = dict(scored[0][1])
        report[name] = {"best": scored[0][1], "best_ms": scored[0][0],
                        "top5": [{"ms": ms, "config": o} for ms, o in scored[:5]]}
        print(f"{name}: best {scored[0][1]} {scored[0][0]:.3f} ms summed over {len(cases)} shapes", flush=True)
    return best, report


def measure(M, label, dropout, refs):
    """Every stage on every projection shape at M tokens; prints a line per shape and one per layer."""
    rows, layer_base, layer_adapter = [], 0.0, 0.0
    tag = f"{label}{'' if dropout else ' no-dropout'}"
    for name, (K, N) in SHAPES.items():
        times, with_host, gbs, (base, adapter), (base_h, adapter_h) = stage_times(M, K, N, dropout=dropout,
                                                                                  refs=refs)
        rows.append({"tokens": M, "variant": label, "dropout": dropout, "shape": name, "K": K, "N": N,
                     "gpu_ms": times, "with_host_ms": with_host, "GB/s": gbs, "base_ms": base, "adapter_ms": adapter,
                     "adapter_with_host_ms": adapter_h})
        layer_base += PER_LAYER[name] * base
        layer_adapter += PER_LAYER[name] * adapter
        stages = "  ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items() if not k.startswith("base"))
        rates = " ".join(f"{k} {v:.0f}" for k, v in gbs.items())
        print(f"[{tag}] M={M:<6} {name:<18} base {base * 1e3:8.1f} us  adapter {adapter * 1e3:7.1f} us "
              f"({adapter / base:6.1%}; {adapter_h * 1e3:7.1f} us with host launch)  {stages}  | GB/s {rates}",
              flush=True)
    print(f"[{tag}] M={M:<6} one decoder layer's projections: base {layer_base:.3f} ms, adapter {layer_adapter:.3f} "
          f"ms = {layer_adapter / layer_base:.1%} of the projections' GEMMs", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-8b", choices=sorted(MODELS),
                        help="whose projection shapes and layer count (the shared pool's size)")
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-tokens", default="4096")
    parser.add_argument("--sweep-kernels", default=None,
                        help="comma-separated subset of the swept kernels (default all: " + ",".join(SWEEP) + ")")
    parser.add_argument("--wide", action="store_true",
                        help="sweep the deeper pipelines and longer tiles of WIDE as well (more bytes in flight)")
    parser.add_argument("--only-wide", action="store_true",
                        help="sweep only WIDE's options against the committed shape (a shorter run than --wide)")
    parser.add_argument("--configs-out", default=None)
    parser.add_argument("--configs", default=None, help="JSON of launch shapes to apply first")
    parser.add_argument("--refs", action="store_true",
                        help="also time PyTorch's own read / write / copy of the same sizes (the bandwidth to aim at)")
    parser.add_argument("--no-dropout", action="store_true",
                        help="also time every stage without the dropout mask (what the hash costs)")
    parser.add_argument("--compare", default=None,
                        help="JSON of launch shapes: time every stage under them as well, same run (old vs new)")
    return parser


def main():
    args = build_parser().parse_args()
    import contextlib

    from rasa_lora.ops import plans

    shapes_of, layers = MODELS[args.model]
    SHAPES.clear()
    SHAPES.update(shapes_of)
    RANKS[0] = 7 + layers
    if args.only_wide:  # WIDE's options and the committed shape, nothing else
        for key in SWEEP:
            SWEEP[key] = [dict(plans.CONFIGS[key])]
    if args.wide or args.only_wide:
        for key, options in WIDE.items():
            SWEEP[key] = SWEEP[key] + [c for c in options if c not in SWEEP[key]]
    if DRY:
        for key in SWEEP:
            SWEEP[key] = SWEEP[key][:1] + SWEEP[key][-1:]  # the first and the last (a --wide one with --wide)
        for key in SHAPES:
            SHAPES[key] = (SHAPES[key][0] // 64, SHAPES[key][1] // 64)
    shapes = contextlib.ExitStack()  # launch shapes in force for the rest of the run (restored at exit)
    if args.configs:
        with open(args.configs) as handle:
            shapes.enter_context(plans.configs(json.load(handle)))
    tokens = [int(v) for v in args.tokens.split(",")]
    out = {"device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__,
           "model": args.model, "ranks": RANKS[0]}
    if args.sweep:
        if args.sweep_kernels:
            for name in set(SWEEP) - set(args.sweep_kernels.split(",")):
                del SWEEP[name]
        best, report = sweep([int(v) for v in args.sweep_tokens.split(",")])
        shapes.enter_context(plans.configs(best))
        out["sweep"] = report
        if args.configs_out:
            with open(args.configs_out, "w") as handle:
                json.dump(best, handle, indent=1)
    out["configs"] = {key: dict(value) for key, value in plans.CONFIGS.items()}
    variants = [("committed" if not (args.sweep or args.configs) else "configs", {})]
    if args.compare:
        with open(args.compare) as handle:
            variants.append(("compare", json.load(handle)))
        out["compare_configs"] = {key: {**plans.CONFIGS[key], **value} for key, value in variants[-1][1].items()}
    rows = []
    for M in tokens:
        for label, changes in variants:
            with plans.configs(changes):
                for dropout in (True, False) if args.no_dropout else (True,):
                    rows += measure(M, label, dropout, args.refs and label == variants[0][0] and dropout)
    out["rows"] = rows
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=1)
    shapes.close()


if __name__ == "__main__":
    main()
