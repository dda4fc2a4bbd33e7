"""Experiment: the adapter's token-sized passes folded into the base GEMMs, against cuBLAS plus our kernels.

    PYTHONPATH=src python3 benchmarks/gemm_epilogue.py --out $OUT/gemm.json [--tokens 4096,16384]

Why: on one H200 the fused layer's own kernels move ~5 T (K + N) bf16 values per projection and training step
(`benchmarks/RESULTS.md`, session 3), >= 130 ms a step at 16384 tokens on the Llama-3.1-8B shape, while issue 6
allows 79 ms over the frozen step. Two of those passes exist only because the base GEMMs run in cuBLAS:

    forward   y = x W^T, then y += u C^T          (`up_`: y read and written again, 2 T N)
    backward  dx = g W, then dx += keep * (gu A)   (`gx`: dx read and written again, 2 T K)

A Triton GEMM can add the rank-R term in its epilogue, on the accumulator, for no extra pass. That pays only if
the Triton GEMM itself is about as fast as cuBLAS on these shapes. This script measures, per projection shape,
GPU time (CUDA-graph replay, median): cuBLAS alone, cuBLAS + our pass (what runs today), the Triton GEMM alone
and the Triton GEMM with the epilogue, over a few launch shapes, and prints the best Triton result against
today's path. It changes nothing in the library.

A CPU check of the kernels' results (Triton's interpreter, float32, tiny shapes):
    TRITON_INTERPRET=1 GEMM_DRY_RUN=1 PYTHONPATH=src python3 benchmarks/gemm_epilogue.py --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch
import triton
import triton.language as tl

from rasa_lora.ops import dropout, kernels
from rasa_lora.ops.kernels import _keep

DRY = os.environ.get("GEMM_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16
SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate_proj/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}  # (K in, N out)
CONFIGS = [dict(BM=bm, BN=bn, BK=64, GROUP=8, warps=w, stages=s)
           for bm, bn, w, s in itertools.product((128,), (128, 256), (4, 8), (3, 4)) if not (bn == 256 and w == 4)]


@triton.jit
def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Grouped tile order (consecutive programs share rows of the left operand in L2)."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(tiles_m - first_m, GROUP)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit(do_not_specialize=["seed_h", "thr"])
def _gemm_kernel(a_ptr, b_ptr, out_ptr, u_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, som, seed_h, thr,
                 R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                 EPILOGUE: tl.constexpr, C_TRANSPOSED: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr):
    """out = a @ b (+ u @ c^T, or + keep * (u @ c) with C_TRANSPOSED and DROPOUT: the backward's form).

    Forward:  a = x (M, K), b = W^T (K, N) as strides, u = u (M, R), c = C (N, R):  out = x W^T + u C^T.
    Backward: a = g (M, N), b = W (N, K), u = gu (M, R), c = A (R, K):             out = g W + keep * (gu A).
    """
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak, mask=(rm < M)[:, None] & (kk < K)[None, :],
                    other=0.0)
        b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk < K)[:, None] & (rn < N)[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if EPILOGUE:
        rr = tl.arange(0, R)
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        if C_TRANSPOSED:  # c (R, N): the packed A of the backward
            c = tl.load(c_ptr + rr[:, None] * N + rn[None, :], mask=(rn < N)[None, :], other=0.0)
        else:  # c (N, R): the packed C of the forward
            c = tl.trans(tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0))
        if IEEE:
            update = tl.dot(u.to(c.dtype), c, input_precision="ieee")
        else:
            update = tl.dot(u.to(c.dtype), c)
        if DROPOUT:
            update = tl.where(_keep(rm, pid_n * BN, seed_h, thr, BN), update, 0.0)
        acc += update
    tl.store(out_ptr + rm[:, None] * som + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def gemm(a, b, u=None, c=None, backward=False, seed_h=0, thr=0, dropout_on=False, cfg=None):
    """a @ b (b given with any strides) with the optional rank-R epilogue; returns a new (M, N) tensor."""
    cfg = cfg or CONFIGS[0]
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    R = c.shape[0] if backward else (c.shape[1] if c is not None else 16)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _gemm_kernel[grid](a, b, out, u if u is not None else a, c if c is not None else a, M, N, K, a.stride(0),
                       a.stride(1), b.stride(0), b.stride(1), out.stride(0), seed_h, thr, R=R, BM=cfg["BM"],
                       BN=cfg["BN"], BK=cfg["BK"], GROUP=cfg["GROUP"], EPILOGUE=u is not None, C_TRANSPOSED=backward,
                       DROPOUT=dropout_on, IEEE=a.dtype == torch.float32, num_warps=cfg["warps"],
                       num_stages=cfg["stages"])
    return out


def case(M, K, N, R=64, n=39, p=0.05):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    t = {"x": torch.randn(M, K, device=DEVICE, dtype=DTYPE, generator=g),
         "W": torch.randn(N, K, device=DEVICE, dtype=DTYPE, generator=g) * 0.02,
         "g": torch.randn(M, N, device=DEVICE, dtype=DTYPE, generator=g),
         "u": torch.randn(M, R, device=DEVICE, generator=g),
         "gu": torch.randn(M, R, device=DEVICE, generator=g),
         "C": torch.randn(N, R, device=DEVICE, dtype=DTYPE, generator=g) * 0.02,
         "A": torch.randn(R, K, device=DEVICE, dtype=DTYPE, generator=g) * 0.02}
    t["C"][:, n:] = 0
    t["A"][n:] = 0
    return t, dropout.seed_hash(7), dropout.threshold(p)


def check(M=96, K=80, N=72, R=16):
    """The kernels against PyTorch (float32 under the interpreter, bf16 on the GPU)."""
    t, seed_h, thr = case(M, K, N, R, n=11)
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    cfg = dict(BM=32, BN=32, BK=16, GROUP=2, warps=4, stages=1) if DRY else CONFIGS[0]
    keep = dropout.keep_mask(M, K, 7, 0.05, DEVICE)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    fwd = gemm(t["x"], t["W"].t(), t["u"], t["C"], cfg=cfg)
    fwd_ref = t["x"].double() @ t["W"].double().t() + t["u"].double() @ t["C"].double().t()
    bwd = gemm(t["g"], t["W"], t["gu"], t["A"], backward=True, seed_h=seed_h, thr=thr, dropout_on=True, cfg=cfg)
    bwd_ref = t["g"].double() @ t["W"].double() + keep * (t["gu"].double() @ t["A"].double())
    errors = {"forward": rel(fwd, fwd_ref), "backward": rel(bwd, bwd_ref)}
    assert all(e <= tol for e in errors.values()), errors
    return errors


def measure(M, name, K, N):
    """GPU us of each way to run this projection's base GEMM with its rank-R pass, forward and backward."""
    from triton.testing import do_bench_cudagraph

    def bench(fn):
        return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3

    t, seed_h, thr = case(M, K, N)
    y, gx = t["x"] @ t["W"].t(), t["g"] @ t["W"]
    gx_args = (t["gu"], t["A"], gx, M, K, gx.stride(0), seed_h, thr, 64, 64, 128, True, False)  # R, BM, BK
    row = {"tokens": M, "shape": name, "K": K, "N": N}
    row["fwd cuBLAS"] = bench(lambda: torch.nn.functional.linear(t["x"], t["W"]))
    row["fwd cuBLAS + up_"] = row["fwd cuBLAS"] + bench(lambda: kernels.up_(y, t["u"], t["C"]))
    row["bwd cuBLAS"] = bench(lambda: t["g"] @ t["W"])
    row["bwd cuBLAS + gx"] = row["bwd cuBLAS"] + bench(
        lambda: kernels._GX((triton.cdiv(K, 128), triton.cdiv(M, 64)), gx_args, 4, 1))
    variants = {
        "fwd Triton": lambda c: gemm(t["x"], t["W"].t(), cfg=c),
        "fwd Triton + epilogue": lambda c: gemm(t["x"], t["W"].t(), t["u"], t["C"], cfg=c),
        "bwd Triton": lambda c: gemm(t["g"], t["W"], cfg=c),
        "bwd Triton + epilogue": lambda c: gemm(t["g"], t["W"], t["gu"], t["A"], True, seed_h, thr, True, cfg=c),
    }
    for label, call in variants.items():
        timed = []
        for cfg in CONFIGS:
            try:
                timed.append((bench(functools.partial(call, cfg)), cfg))
            except Exception as error:  # e.g. out of shared memory
                print(f"  {label} {cfg}: failed ({type(error).__name__})", flush=True)
        row[label], row[label + " config"] = min(timed, key=lambda item: item[0])
    print(f"M={M:<6} {name:<18} fwd: cuBLAS {row['fwd cuBLAS']:8.1f}  +up_ {row['fwd cuBLAS + up_']:8.1f}  "
          f"Triton {row['fwd Triton']:8.1f}  +epilogue {row['fwd Triton + epilogue']:8.1f} us | bwd: cuBLAS "
          f"{row['bwd cuBLAS']:8.1f}  +gx {row['bwd cuBLAS + gx']:8.1f}  Triton {row['bwd Triton']:8.1f}  "
          f"+epilogue {row['bwd Triton + epilogue']:8.1f} us", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="4096,16384")
    args = parser.parse_args()
    out = {"check": check()}
    print("check (relative error against float64):", out["check"], flush=True)
    if DRY:
        with open(args.out, "w") as handle:
            json.dump(out, handle, indent=1)
        return
    rows = [measure(M, name, K, N) for M, (name, (K, N)) in
            itertools.product([int(v) for v in args.tokens.split(",")], SHAPES.items())]
    out["rows"] = rows
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
