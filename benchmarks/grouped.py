"""Experiment: projections that read the same input (q/k/v, gate/up) as one group, against one at a time.

    PYTHONPATH=src python3 benchmarks/grouped.py --out $OUT/grouped.json [--tokens 4096,16384]
    TRITON_INTERPRET=1 GROUPED_DRY_RUN=1 PYTHONPATH=src python3 benchmarks/grouped.py --out /tmp/g.json   (CPU check)

Why: at 16384 tokens on the Llama-3.1-8B shape the RaSA step is 1.07x the frozen base's (`benchmarks/RESULTS.md`,
session 7) and the adapter's kernels, even without dropout, pass over the token-sized tensors more often than
1.05x allows. In a Llama block q/k/v read the same x, as do gate/up; one at a time, each member reads x in `down`
(forward) and in `ga` (dA), writes its own dL/dx part in `gx`, and autograd then adds the members' dL/dx. As a
group of G members:

    forward   u_i = (keep_i * x) A_i^T  for every member i            one read of x instead of G
    backward  dx += sum_i keep_i * (gu_i A_i)                          one read and write of dx instead of G writes
                                                                       and G - 1 autograd adds
              dA_i = gu_i^T (keep_i * x)  for every member i           one read of x instead of G

each member keeping its own dropout mask (its own seed: the same masks as one at a time, so the same results).
This times, per group shape and token count (GPU time, CUDA-graph replay, median), the library's kernels run one
member at a time as the layer runs them (`down_and_pack` each; `bwd_down` each writing its dL/dx part, then the
adds) against experimental group kernels written here (the packs, one group `down`; one group `gx` adding into dL/dx,
which the base GEMMs are assumed to have written, one group `ga`, the members' small dB/dD launches), after checking
that both give the same u, dL/dx and dA. The base GEMMs are the same in both and left out. It changes nothing in
the library: if the group pays, building it means running a block's projections as one autograd node.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

DRY = os.environ.get("GROUPED_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16
GROUPS = {  # name: (K in, N out of each member)
    "q/k/v": (4096, (4096, 1024, 1024)),
    "gate/up": (4096, (14336, 14336)),
}
N_RANKS, N_PRIVATE = 39, 7  # r = 8, k = 1 over 32 layers: 7 private and 32 shared ranks, packed to R = 64

try:
    import triton
    import triton.language as tl

    from rasa_lora.ops.kernels import _col_hash, _dot, _keep_h, _keep_w, _row_hash, _store_or_add, _write_or_add
except ImportError:  # pragma: no cover
    triton = None

_LOOSE = ["s0", "s1", "s2", "thr"]

if triton is not None:

    @triton.jit
    def _member_down(x, a_ptr, rr, rk, in_k, K, h, k0, s, thr, BK: tl.constexpr, DROPOUT: tl.constexpr,
                     IEEE: tl.constexpr):
        """One member's (keep * x) A^T over the x tile at columns rk (rows hashed h, seed hash s)."""
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=in_k, other=0.0)
        if DROPOUT:
            x = tl.where(_keep_h(h, k0, s, thr, BK), x, 0.0)
        return _dot(x, tl.trans(a), IEEE)

    @triton.jit
    def _member_gx(gu, a_ptr, rr, rk, in_k, K, h, k0, s, thr, BK: tl.constexpr, DROPOUT: tl.constexpr,
                   IEEE: tl.constexpr):
        """One member's keep * (gu A) at columns rk."""
        part = _dot(gu, tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=in_k, other=0.0), IEEE)
        if DROPOUT:
            part = tl.where(_keep_h(h, k0, s, thr, BK), part, 0.0)
        return part

    @triton.jit
    def _member_ga(x, gu_ptrs, rows, rm, hc, s, thr, DROPOUT: tl.constexpr, IEEE: tl.constexpr):
        """One member's gu^T (keep * x) over the x tile of rows rm (its columns hashed hc)."""
        if DROPOUT:
            x = tl.where(_keep_w(_row_hash(rm, s), hc) >= thr, x, 0.0)
        return _dot(tl.trans(tl.load(gu_ptrs, mask=rows, other=0.0)), x, IEEE)

    @triton.jit
    def _member_gu(gu_ptr, rm, rr, rows, R: tl.constexpr, dtype: tl.constexpr):
        return tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=rows, other=0.0).to(dtype)

    @triton.jit
    def _store_members(p0, p1, p2, offsets, acc0, acc1, acc2, mask, G: tl.constexpr, ATOMIC: tl.constexpr):
        """Each of the G members' results written (or added) at the same offsets of its own tensor."""
        _store_or_add(p0 + offsets, acc0, mask, ATOMIC)
        if G > 1:
            _store_or_add(p1 + offsets, acc1, mask, ATOMIC)
        if G > 2:
            _store_or_add(p2 + offsets, acc2, mask, ATOMIC)

    @triton.jit(do_not_specialize=_LOOSE)
    def _group_down_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, u0_ptr, u1_ptr, u2_ptr, M, K, sxm, s0, s1, s2, thr,
                           k_per_split, row_blocks, R: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                           BK: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        """u_i = (keep_i * x) A_i^T for the G (<= 3) members: each x tile read once, masked once per member."""
        pid = tl.program_id(0)
        rm = (pid % row_blocks) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        k_lo = (pid // row_blocks) * k_per_split
        acc0 = tl.zeros((BM, R), dtype=tl.float32)
        acc1 = tl.zeros((BM, R), dtype=tl.float32)
        acc2 = tl.zeros((BM, R), dtype=tl.float32)
        h0, h1, h2 = _row_hash(rm, s0), _row_hash(rm, s1), _row_hash(rm, s2)  # per row: hoisted out of the loop
        for k0 in range(k_lo, k_lo + k_per_split, BK):
            rk = k0 + tl.arange(0, BK)
            in_k = (rk < K)[None, :]
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & in_k, other=0.0)
            acc0 += _member_down(x, a0_ptr, rr, rk, in_k, K, h0, k0, s0, thr, BK, DROPOUT, IEEE)
            if G > 1:
                acc1 += _member_down(x, a1_ptr, rr, rk, in_k, K, h1, k0, s1, thr, BK, DROPOUT, IEEE)
            if G > 2:
                acc2 += _member_down(x, a2_ptr, rr, rk, in_k, K, h2, k0, s2, thr, BK, DROPOUT, IEEE)
        rows = (rm < M)[:, None]
        offsets = rm[:, None] * R + rr[None, :]
        _store_members(u0_ptr, u1_ptr, u2_ptr, offsets, acc0, acc1, acc2, rows, G, ATOMIC)

    @triton.jit(do_not_specialize=_LOOSE)
    def _group_gx_kernel(gu0_ptr, gu1_ptr, gu2_ptr, a0_ptr, a1_ptr, a2_ptr, gx_ptr, g16_ptr, M, K, sgxm, s0, s1, s2,
                         thr, k_per_split, R: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                         DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr):
        """dx (+)= sum_i keep_i * (gu_i A_i), a block of rows a program (its gu rows read once); the first program
        of each row block also writes the members' gu in A's dtype, side by side (M, G R), for the group `ga`."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        rows = (rm < M)[:, None]
        dtype = a0_ptr.dtype.element_ty
        gu0 = _member_gu(gu0_ptr, rm, rr, rows, R, dtype)
        gu1 = gu0
        gu2 = gu0
        if G > 1:
            gu1 = _member_gu(gu1_ptr, rm, rr, rows, R, dtype)
        if G > 2:
            gu2 = _member_gu(gu2_ptr, rm, rr, rows, R, dtype)
        if tl.program_id(1) == 0:
            side = g16_ptr + rm[:, None] * (G * R) + rr[None, :]
            tl.store(side, gu0, mask=rows)
            if G > 1:
                tl.store(side + R, gu1, mask=rows)
            if G > 2:
                tl.store(side + 2 * R, gu2, mask=rows)
        h0, h1, h2 = _row_hash(rm, s0), _row_hash(rm, s1), _row_hash(rm, s2)
        k_lo = tl.program_id(1) * k_per_split
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BK):
            rk = k0 + tl.arange(0, BK)
            in_k = (rk < K)[None, :]
            update = _member_gx(gu0, a0_ptr, rr, rk, in_k, K, h0, k0, s0, thr, BK, DROPOUT, IEEE)
            if G > 1:
                update += _member_gx(gu1, a1_ptr, rr, rk, in_k, K, h1, k0, s1, thr, BK, DROPOUT, IEEE)
            if G > 2:
                update += _member_gx(gu2, a2_ptr, rr, rk, in_k, K, h2, k0, s2, thr, BK, DROPOUT, IEEE)
            _write_or_add(gx_ptr + rm[:, None] * sgxm + rk[None, :], update, rows & in_k, ACCUMULATE)

    @triton.jit(do_not_specialize=_LOOSE)
    def _group_ga_kernel(x_ptr, g16_ptr, ga0_ptr, ga1_ptr, ga2_ptr, M, K, sxm, s0, s1, s2, thr, m_per_split, k_blocks,
                         R: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DROPOUT: tl.constexpr,
                         ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        """dA_i = gu_i^T (keep_i * x) for the G members (R x K each, float32): each x tile read once."""
        pid = tl.program_id(0)
        col0 = (pid % k_blocks) * BK
        rk = col0 + tl.arange(0, BK)
        rr = tl.arange(0, R)
        in_k = (rk < K)[None, :]
        acc0 = tl.zeros((R, BK), dtype=tl.float32)
        acc1 = tl.zeros((R, BK), dtype=tl.float32)
        acc2 = tl.zeros((R, BK), dtype=tl.float32)
        # the program's columns, hashed once per member
        c0, c1, c2 = _col_hash(col0, s0, BK), _col_hash(col0, s1, BK), _col_hash(col0, s2, BK)
        m_lo = (pid // k_blocks) * m_per_split
        for m0 in range(m_lo, m_lo + m_per_split, BM):
            rm = m0 + tl.arange(0, BM)
            rows = (rm < M)[:, None]
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=rows & in_k, other=0.0)
            side = g16_ptr + rm[:, None] * (G * R) + rr[None, :]
            acc0 += _member_ga(x, side, rows, rm, c0, s0, thr, DROPOUT, IEEE)
            if G > 1:
                acc1 += _member_ga(x, side + R, rows, rm, c1, s1, thr, DROPOUT, IEEE)
            if G > 2:
                acc2 += _member_ga(x, side + 2 * R, rows, rm, c2, s2, thr, DROPOUT, IEEE)
        offsets = rr[:, None] * K + rk[None, :]
        _store_members(ga0_ptr, ga1_ptr, ga2_ptr, offsets, acc0, acc1, acc2, in_k, G, ATOMIC)


# launch shapes of the group kernels (swept below on the GPU; the first entry is the default)
GROUP_CONFIGS = {
    "down": [dict(BM=BM, BK=64, warps=w, stages=s, programs=528) for BM in (64, 32) for w in (4, 8) for s in (3, 2)],
    "gx": [dict(BM=BM, BK=BK, warps=w, stages=2, programs=264) for BM in (64, 32) for BK in (64, 128) for w in (4, 8)],
    "ga": [dict(BM=BM, BK=BK, warps=w, stages=s, programs=528) for BM in (64, 32) for BK in (64, 32) for w in (8, 4)
           for s in (3, 2)],
}
if DRY:  # the interpreter: one small shape each
    GROUP_CONFIGS = {key: [dict(value[0], BM=16, BK=16)] for key, value in GROUP_CONFIGS.items()}


def _three(items: list, fill):
    return list(items) + [fill] * (3 - len(items))


def group_down(x, As, seeds_h, thr, dropout, cfg) -> list:
    from rasa_lora.ops import kernels

    M, K = x.shape
    R, G = As[0].shape[0], len(As)
    row_blocks = kernels._cdiv(M, cfg["BM"])
    splits, per_split = kernels._split_plan(row_blocks, K, cfg["BK"], {"splits": 0, "programs": cfg["programs"]})
    make = torch.zeros if splits > 1 else torch.empty
    us = [make((M, R), dtype=torch.float32, device=x.device) for _ in range(G)]
    _group_down_kernel[(row_blocks * splits,)](
        x, *_three(As, As[0]), *_three(us, us[0]), M, K, x.stride(0), *_three(seeds_h, 0), thr, per_split,
        row_blocks, R, G, cfg["BM"], cfg["BK"], dropout, splits > 1, x.dtype == torch.float32,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    return us


def group_gx(gus, As, dx, g16, seeds_h, thr, dropout, accumulate, cfg) -> None:
    from rasa_lora.ops import kernels

    M, K = dx.shape
    R, G = As[0].shape[0], len(As)
    blocks = kernels._cdiv(M, cfg["BM"])
    splits, per_split = kernels._split_plan(blocks, K, cfg["BK"], {"splits": 0, "programs": cfg["programs"]})
    _group_gx_kernel[(blocks, splits)](
        *_three(gus, gus[0]), *_three(As, As[0]), dx, g16, M, K, dx.stride(0), *_three(seeds_h, 0), thr, per_split,
        R, G, cfg["BM"], cfg["BK"], dropout, accumulate, dx.dtype == torch.float32,
        num_warps=cfg["warps"], num_stages=cfg["stages"])


def group_ga(x, g16, gas, seeds_h, thr, dropout, cfg) -> None:
    """gas: the members' zeroed float32 (R, K) dA."""
    from rasa_lora.ops import kernels

    M, K = x.shape
    R, G = gas[0].shape[0], len(gas)
    k_blocks = kernels._cdiv(K, cfg["BK"])
    splits, per_split = kernels._split_plan(k_blocks, M, cfg["BM"], {"splits": 0, "programs": cfg["programs"]})
    _group_ga_kernel[(k_blocks * splits,)](
        x, g16, *_three(gas, gas[0]), M, K, x.stride(0), *_three(seeds_h, 0), thr, per_split, k_blocks, R, G,
        cfg["BM"], cfg["BK"], dropout, splits > 1, x.dtype == torch.float32,
        num_warps=cfg["warps"], num_stages=cfg["stages"])


def case(M, K, Ns, p=0.05):
    """A group's tensors (x, each member's factors, output gradient and packed A, C), and the two paths as calls."""
    from rasa_lora.ops import dropout, kernels

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, generator=g)
    thr, scale = dropout.threshold(p), 1.0 / (1.0 - dropout.effective_p(p))
    members = []
    for i, N in enumerate(Ns):
        f = {"A_p": torch.randn(N_PRIVATE, K, device=DEVICE, generator=g) * 0.02,
             "B_p": torch.randn(N, N_PRIVATE, device=DEVICE, generator=g) * 0.02,
             "D": torch.rand(N_RANKS, device=DEVICE, generator=g),
             "A_s": torch.randn(N_RANKS - N_PRIVATE, K, device=DEVICE, generator=g) * 0.02,
             "B_s": torch.randn(N, N_RANKS - N_PRIVATE, device=DEVICE, generator=g) * 0.02}
        seed_h = dropout.seed_hash(1000 + i)
        A, C = kernels.pack(f["A_p"], f["B_p"], f["D"], f["A_s"], f["B_s"], DTYPE, scale)
        R = A.shape[0]
        zeros = {name: torch.zeros(*shape, device=DEVICE) for name, shape in (
            ("gc", (N, R)), ("gap", (N_PRIVATE, K)), ("gas", (N_RANKS - N_PRIVATE, K)), ("gd", (N_RANKS,)),
            ("gbp", (N, N_PRIVATE)), ("gbs", (N, N_RANKS - N_PRIVATE)))}
        gu = torch.randn(M, R, device=DEVICE, generator=g) * 0.1
        gu[:, N_RANKS:] = 0.0  # what bwd_up leaves past the n ranks (C is zero there)
        members.append({"f": f, "seed_h": seed_h, "A": A, "C": C, "gu": gu, "N": N, **zeros})
    seeds = [m["seed_h"] for m in members]
    As = [m["A"] for m in members]
    R = As[0].shape[0]
    base = torch.randn(M, K, device=DEVICE, dtype=DTYPE, generator=g)  # the base GEMMs' sum of g_i W_i
    dx = base.clone()
    g16 = torch.empty(M, len(members) * R, device=DEVICE, dtype=DTYPE)
    gas = [torch.zeros(R, K, device=DEVICE) for _ in members]

    def separate_forward():
        return [kernels.down_and_pack(x, *(m["f"][k] for k in ("A_p", "B_p", "D", "A_s", "B_s")), scale, m["seed_h"],
                                      thr, True)[0] for m in members]

    def separate_backward():
        parts = []
        for m in members:
            part = torch.empty(M, K, device=DEVICE, dtype=DTYPE)  # written by gx; the GEMM adds g_i W_i (left out)
            kernels.bwd_down(x, m["gu"], m["A"], part, m["gap"], m["gas"], m["gc"], m["f"]["B_p"], m["f"]["B_s"],
                             m["f"]["D"], m["gd"], m["gbp"], m["gbs"], scale, m["seed_h"], thr, True,
                             accumulate=False)
            parts.append(part)
        total = parts[0] + parts[1]  # autograd adds the members' dL/dx
        for part in parts[2:]:
            total += part
        return total

    def grouped_forward(cfg):
        for m in members:  # the packs, as the layer makes them (small launches)
            kernels.pack(*(m["f"][k] for k in ("A_p", "B_p", "D", "A_s", "B_s")), DTYPE, scale)
        return group_down(x, As, seeds, thr, True, cfg)

    def grouped_backward(cfg_gx, cfg_ga):
        group_gx([m["gu"] for m in members], As, dx, g16, seeds, thr, True, True, cfg_gx)
        group_ga(x, g16, gas, seeds, thr, True, cfg_ga)
        for m in members:  # dB and dD from dC, as `bwd_down`'s extra programs do one at a time
            BN = kernels._rows_for_width(64, R)
            kernels._FINALIZE((kernels._cdiv(m["N"], BN),), (
                m["gc"], m["f"]["B_p"], m["f"]["B_s"], m["f"]["D"], m["gbp"], m["gbs"], m["gd"], m["N"], N_PRIVATE,
                N_RANKS - N_PRIVATE, scale, R, BN), 4, 1)

    state = {"x": x, "members": members, "base": base, "dx": dx, "gas": gas, "g16": g16}
    return state, separate_forward, separate_backward, grouped_forward, grouped_backward


def check(M, K, Ns) -> dict:
    """The group kernels against the one-at-a-time path: u, dL/dx and dA (largest relative error each)."""
    state, sep_f, sep_b, grp_f, grp_b = case(M, K, Ns)
    cfg = {key: value[0] for key, value in GROUP_CONFIGS.items()}
    u_sep, u_grp = sep_f(), grp_f(cfg["down"])
    dx_sep = sep_b()
    for t in state["gas"]:
        t.zero_()
    state["dx"].zero_()  # (the base GEMMs' part left out: in bf16 it would swamp the adapter's in the comparison)
    grp_b(cfg["gx"], cfg["ga"])

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))

    # one at a time: the layer's gap/gas were added into by sep_b once (zeroed by case): compare with the group's rows
    errors = {"u": max(rel(a, b) for a, b in zip(u_grp, u_sep)),
              "dx": rel(state["dx"], dx_sep),
              "dA": max(max(rel(ga[:N_PRIVATE], m["gap"]), rel(ga[N_PRIVATE:N_RANKS], m["gas"]))
                        for ga, m in zip(state["gas"], state["members"]))}
    return errors


def _gpu_time(fn) -> float:
    if DRY:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=20, return_mode="median")


def measure(M, name) -> dict:
    K, Ns = GROUPS[name]
    _, sep_f, sep_b, grp_f, grp_b = case(M, K, Ns)
    best = {}
    for key in ("down", "gx", "ga"):
        times = []
        for cfg in GROUP_CONFIGS[key]:
            fixed = {k: GROUP_CONFIGS[k][0] for k in ("gx", "ga")}
            fixed[key] = cfg
            if key == "down":
                fn = lambda cfg=cfg: grp_f(cfg)  # noqa: E731
            else:
                fn = lambda fixed=fixed: grp_b(fixed["gx"], fixed["ga"])  # noqa: E731
            try:
                times.append((_gpu_time(fn), cfg))
            except Exception as error:  # a shape that does not fit (shared memory, registers): skip it
                print(f"  {name} M={M} {key} {cfg}: {type(error).__name__}", flush=True)
        best[key] = min(times, key=lambda item: item[0])[1]
        GROUP_CONFIGS[key].remove(best[key])
        GROUP_CONFIGS[key].insert(0, best[key])
    row = {"group": name, "tokens": M, "members": len(Ns),
           "separate_forward_ms": _gpu_time(sep_f), "grouped_forward_ms": _gpu_time(lambda: grp_f(best["down"])),
           "separate_backward_ms": _gpu_time(sep_b),
           "grouped_backward_ms": _gpu_time(lambda: grp_b(best["gx"], best["ga"])), "configs": best}
    print(f"{name:<8} M={M:<6} forward: one at a time {row['separate_forward_ms'] * 1e3:7.1f} us, grouped "
          f"{row['grouped_forward_ms'] * 1e3:7.1f} us | backward (dx, dA, dB, dD; adds incl.): one at a time "
          f"{row['separate_backward_ms'] * 1e3:7.1f} us, grouped {row['grouped_backward_ms'] * 1e3:7.1f} us",
          flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="64" if DRY else "4096,16384")
    args = parser.parse_args()
    if triton is None:
        raise SystemExit("needs triton (and a GPU, or TRITON_INTERPRET=1 GROUPED_DRY_RUN=1 for the CPU check)")
    out = {"device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__,
           "checks": {}, "rows": []}
    scale_down = 64 if DRY else 1
    for name, (K, Ns) in GROUPS.items():
        shape = (K // scale_down, tuple(N // scale_down for N in Ns))
        errors = check(96 if DRY else 4096, *shape)
        out["checks"][name] = errors
        print(f"check {name}: largest relative error u {errors['u']:.1e}, dx {errors['dx']:.1e}, "
              f"dA {errors['dA']:.1e}", flush=True)
        if DRY:
            GROUPS[name] = shape
    for M in (int(v) for v in args.tokens.split(",")):
        for name in GROUPS:
            out["rows"].append(measure(M, name))
    # per decoder layer (one q/k/v group, one gate/up group) and per 32-layer step; under gradient checkpointing the
    # forward's `down` runs once (the recomputation takes the kept u), the backward once
    for M in sorted({row["tokens"] for row in out["rows"]}):
        rows = [row for row in out["rows"] if row["tokens"] == M]
        saved = sum(r["separate_forward_ms"] - r["grouped_forward_ms"] + r["separate_backward_ms"]
                    - r["grouped_backward_ms"] for r in rows)
        out.setdefault("saved_per_layer_ms", {})[M] = saved
        print(f"M={M}: grouping saves {saved * 1e3:.1f} us a decoder layer, {saved * 32:.1f} ms a 32-layer step",
              flush=True)
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
