r"""Triton kernels of the fused RaSA layer (see `rasa_linear.py` for the algebra and the PyTorch twin).

Notation: x (M, K) the input rows, g (M, N) the output gradient, A (R, K) and C (N, R) the packed factors
(R: n = r-k+Lk ranks rounded up to a power of two >= 16, zero beyond n; the dropout scale s and D folded into
C), u (M, R) and gu (M, R) the thin float32 intermediates, keep(i, j) the hash mask of `dropout.py`.
A training step of a layer runs these stages (the forward's twice under gradient checkpointing):

    forward   pack            the packed A and C from the raw factors (R + N/64 small programs)
              down            u = (keep * x) A^T                                    one read of x
              up_             y = u C^T (+ c), or y += u C^T                        one write (or read and write) of y
    backward  pack            A and C again (or the recomputation's: see `rasa_linear.py`)
              bwd_up          gu = g C,  dC = g^T u                                 one read of g
              bwd_down        dx = keep * (gu A), or dx += ...                      one write (or read and write) of dx
                              dA = gu^T (keep * x)                                  one read of x
                              + extra programs: dB = s dC D, dD = s sum_b(dC * B)

(The layer's default path writes y and dx and has cuBLAS add the base products into them; under gradient
checkpointing the recomputed forward takes the u its forward kept and runs no `down`: `rasa_linear.py`.)
`up_` and the dx part of `bwd_down` ("gx") run one tile a program or, the committed choice ("rows"), one block of
rows a program walking its share of the columns: the thin operand u (gu) is then read once a row block instead of
once a tile, which at BN = 128 was as many bytes as the tile written (H200, 16384 tokens: `up_` 57 -> 43 us on
q_proj, 2.3 -> 3.1 TB/s, near the 3.3 TB/s of PyTorch's own write; `benchmarks/RESULTS.md`, session 6); gx's row
blocks also hand `ga` gu in x's dtype, halving what it re-reads per column block.

`down_and_pack` runs the forward's pack and down as one launch (CONFIGS["down"]["pack"] = "fused": the rows
then read the raw, often float32, factors) or two ("separate", the H200 sweep's choice: the rows read the
packed bf16 A, twice as fast); `bwd_down` as one kernel or two ("split", the sweep's choice). Every pass over a
token-sized tensor happens once and the mask is drawn in registers where it is used. The split reductions (over
K in `down`, over M in `bwd_down` and `bwd_up`) add float32 partial sums atomically, so their last bits depend
on scheduling.

Host time matters as much as GPU time: Triton's own launch path costs ~15-25 us of host time a launch on the
H200's host, which made the step host-bound at 4096 tokens (`benchmarks/RESULTS.md`, session 2). `_Launcher`
keeps each compiled kernel after its first launch and calls its C launcher directly; the launch plans (tiles,
grids, splits) are derived from CONFIGS once per shape (`_plan`; `clear_plans()` after editing CONFIGS). The
launch shapes (`CONFIGS`) were chosen by `benchmarks/kernel_timing.py --sweep` on one H200; the kernels are correct
for any of them (tested with small and split shapes).
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import torch

from rasa_lora.ops.rasa_linear import env_flag

try:  # Triton ships with CUDA builds of torch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def available() -> bool:
    return triton is not None


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv: in Triton 3.6 that is a constexpr function costing ~5 us a call on the host
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block(cap: int, size: int) -> int:
    """A tile edge along a dimension of `size`: `cap`, or less for a small dimension (a power of two >= 16)."""
    return min(cap, max(16, _next_pow2(size)))


def packed_width(n: int) -> int:
    """R: the packed rank width (a power of two, at least 16, as `tl.dot` needs)."""
    width = 16
    while width < n:
        width *= 2
    return width


# Launch shapes per kernel; `benchmarks/kernel_timing.py` sweeps alternatives (it edits this dict in place).
CONFIGS = {  # winners of `benchmarks/kernel_timing.py --sweep`, R = 64, bf16 (benchmarks/RESULTS.md)
    "down": {"BM": 64, "BK": 64, "splits": 0, "warps": 4, "stages": 3, "programs": 528, "pack": "separate"},
    # up and gx: a row block a program (session 6, `--only-wide` at 16384 tokens: up_ 57 -> 43 us on q_proj);
    # bwd_up and ga: session 6's sweep over 4096 and 16384 tokens (run C)
    "up": {"mode": "rows", "BM": 64, "BN": 128, "warps": 4, "stages": 2, "programs": 264},
    "bwd_up": {"mode": "fused", "BM": 256, "BN": 64, "splits": 0, "warps": 8, "stages": 4, "programs": 264},
    "gu": {"BM": 128, "BN": 64, "splits": 0, "warps": 4, "stages": 3, "programs": 264},   # bwd_up's "split" mode
    "gc": {"BM": 64, "BN": 64, "splits": 0, "warps": 4, "stages": 3, "programs": 528},
    "bwd_down": {"mode": "split", "BM": 64, "BK": 64, "splits": 0, "warps": 8, "stages": 3, "programs": 1056},
    "gx": {"mode": "rows", "BM": 64, "BK": 64, "warps": 4, "stages": 2, "programs": 264},  # bwd_down's "split"
    "ga": {"BM": 64, "BK": 128, "splits": 0, "warps": 8, "stages": 4, "programs": 528},  # reads gu in x's dtype
    "pack": {"BK": 1024, "BN": 64},
}
# splits 0: enough splits of the reduction for about `programs` programs (TARGET_PROGRAMS when unset)
TARGET_PROGRAMS = 2 * 132  # about two programs per SM of an H100/H200; a floor elsewhere


def _rows_for_width(cap: int, R: int) -> int:
    """A tile edge for the packed-rank tiles (rows x R) of the small pack and finalize programs: `cap` up to
    R = 64, proportionally fewer rows for wider R (at least 16)."""
    return cap if R <= 64 else max(16, cap * 64 // R)


def _fit(name: str, R: int, itemsize: int) -> dict:
    """CONFIGS[name] shrunk for wide packed ranks or float32, so tiles fit in shared memory (the defaults
    are tuned for R = 64 in bf16)."""
    cfg = CONFIGS[name]
    factor = max(1, R * itemsize // 128)
    if factor == 1 and (itemsize <= 2 or cfg.get("stages", 1) <= 2):
        return cfg
    cfg = dict(cfg)
    for key in ("BM", "BN", "BK"):
        if key in cfg:
            cfg[key] = max(16, cfg[key] // factor)
    # float32 doubles every pipelined tile, the token-sized ones too (whatever R): at most two stages (bwd_up's
    # four stages of 256 x 64 float32 tiles need 254 KB of shared memory at R = 32, more than an H200 has)
    cfg["stages"] = min(cfg.get("stages", 1), 2)
    return cfg


def _splits(blocks: int, chunks: int, requested: int, programs: int = 0) -> int:
    """How many ways to split a reduction of `chunks` chunks, given `blocks` programs without splitting:
    `requested` if set, else enough for about `programs` (default TARGET_PROGRAMS) programs in all."""
    if requested:
        return max(1, min(requested, chunks))
    return max(1, min(chunks, -(-(programs or TARGET_PROGRAMS) // max(blocks, 1))))


# Arguments that change from call to call (the dropout seed's hash and threshold, the dropout scale): the kernels
# are compiled without specializing on their values, and the launch cache below leaves them out of its key.
_LOOSE = ["seed_h", "thr", "scale"]
_FAST_LAUNCH = env_flag("RASA_LORA_FAST_LAUNCH", True)


_DTYPE, _DATA_PTR = operator.attrgetter("dtype"), torch.Tensor.data_ptr


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


class _Launcher:
    """`kernel[grid](*args, num_warps=..., num_stages=...)` without Triton's per-call argument binding.

    Triton's launch path re-derives, from every argument on every call, which compiled variant to run, then
    reads its settings and hooks: ~15-25 us of host time a launch on the H200's host (`benchmarks/RESULTS.md`),
    and a training step launches ten a projection. After one ordinary launch this keeps the compiled kernel under a
    key holding what Triton specializes on (each tensor's dtype and 16-byte alignment, every integer and
    constexpr argument except those in `_LOOSE`, the launch options, the device), and later launches with that
    key call its C launcher directly. Arguments are positional, in the kernel's order, constexprs included.
    Off under Triton's interpreter (nothing to cache) and with RASA_LORA_FAST_LAUNCH=0. A kernel first launched
    while a Triton launch hook is installed is not cached, but cached kernels skip hooks installed later: set
    RASA_LORA_FAST_LAUNCH=0 when profiling with such hooks (proton).
    """

    __slots__ = ("fn", "loose", "tensors", "scalars", "compiled")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.loose = frozenset(i for i, name in enumerate(fn.arg_names) if name in _LOOSE)
        self.tensors = self.scalars = None  # itemgetters, set from the first call's arguments
        self.compiled: dict = {}

    def __call__(self, grid, args, warps: int, stages: int) -> None:
        if _FAST_LAUNCH:
            if self.tensors is None:
                kinds = [isinstance(a, torch.Tensor) for a in args]
                self.tensors = _picker([i for i, k in enumerate(kinds) if k])
                self.scalars = _picker([i for i, k in enumerate(kinds) if not k and i not in self.loose])
            tensors = self.tensors(args)
            device = tensors[0].get_device()
            key = (warps, stages, device, self.scalars(args), *map(_DTYPE, tensors))
            aligned = not functools.reduce(operator.or_, map(_DATA_PTR, tensors)) & 15
            entry = self.compiled.get(key)
            if entry is not None and aligned:
                launch, function, options, metadata = entry
                launch(grid[0], grid[1] if len(grid) > 1 else 1, 1, _current_stream(device), function, *options,
                       metadata, None, None, None, *args)
                return
        kernel = self.fn[grid](*args, num_warps=warps, num_stages=stages)
        # cached only when every tensor is 16-byte aligned (what Triton assumes when it compiles for aligned ones)
        if _FAST_LAUNCH and aligned and _cacheable(kernel, device):
            remember(self.compiled, key, _entry(kernel))


def _entry(kernel) -> tuple:
    """(launch, function, options, metadata) of a compiled kernel: with Triton 3.x's CUDA launcher and no scratch
    memory, its C `launch` itself (options: cooperative grid, PDL, two null scratch buffers), skipping the Python
    `__call__` around it (~2 us of host time a launch); otherwise that `__call__` (`kernel.run`)."""
    run = kernel.run
    direct = getattr(run, "launch", None)
    if (direct is not None and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0 and hasattr(run, "launch_cooperative_grid")
            and hasattr(run, "launch_pdl")):
        return direct, kernel.function, (run.launch_cooperative_grid, run.launch_pdl, None, None), \
            kernel.packed_metadata
    return run, kernel.function, (), kernel.packed_metadata


def _picker(indices: list[int]):
    """args -> the tuple of args at `indices` (itemgetter, which returns a bare item for one index)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda args: (args[index],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


def _cacheable(kernel, device: int) -> bool:
    """A compiled kernel (not the interpreter's None), for the current device, without Triton launch hooks."""
    if kernel is None or not hasattr(kernel, "packed_metadata") or getattr(kernel, "function", None) is None:
        return False
    if device != torch.cuda.current_device():
        return False
    hook = triton.knobs.runtime.launch_enter_hook
    return not getattr(hook, "calls", hook)  # an empty HookChain (or None): nothing would be skipped


if triton is not None:

    @triton.jit
    def _mix(v):
        v = v ^ (v >> 16)
        v = v * 0x21F0AAAD
        v = v ^ (v >> 15)
        v = v * 0x735A2D97
        return v ^ (v >> 15)

    @triton.jit
    def _row_hash(rows, seed_h):
        """The rows' odd hashes (hoisted out of loops over columns)."""
        return _mix(rows.to(tl.uint32) + seed_h.to(tl.uint32)) | 1

    @triton.jit
    def _col_hash(col0, seed_h, BK: tl.constexpr):
        """The odd hashes of the column pairs of columns [col0, col0 + BK) (col0 even)."""
        pairs = (col0 // 2 + tl.arange(0, BK // 2)).to(tl.uint32)
        return _mix((pairs * 0x61C88647) ^ seed_h.to(tl.uint32)) | 1

    @triton.jit
    def _keep_w(hr, hc):
        """Keep words of rows hashed `hr` x column pairs hashed `hc`: their product, xorshifted (`dropout.py`),
        split into the two columns' 16-bit halves (low half: the even column), to compare with the threshold."""
        v = hr[:, None] * hc[None, :]
        v = v ^ (v >> 16)
        return tl.interleave(v & 0xFFFF, v >> 16)

    @triton.jit
    def _keep_h(hr, col0, seed_h, thr, BK: tl.constexpr):
        """Keep decisions of the rows hashed `hr` x columns [col0, col0 + BK) (col0 even)."""
        return _keep_w(hr, _col_hash(col0, seed_h, BK)) >= thr

    @triton.jit
    def _keep(rows, col0, seed_h, thr, BK: tl.constexpr):
        """Keep decisions of rows x columns [col0, col0 + BK) (col0 even)."""
        return _keep_h(_row_hash(rows, seed_h), col0, seed_h, thr, BK)

    @triton.jit
    def _store_or_add(pointers, acc, mask, ATOMIC: tl.constexpr):
        """Write a reduction's result; added atomically when the reduction is split over several programs."""
        if ATOMIC:
            tl.atomic_add(pointers, acc, mask=mask, sem="relaxed")
        else:
            tl.store(pointers, acc, mask=mask)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _pack_a_row(ap_ptr, as_ptr, a_ptr, row, K, NP, NS, BK: tl.constexpr):
        """Row `row` of A = [A_p; A_s; 0], cast to A's dtype."""
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            vp = tl.load(ap_ptr + row * K + rk, mask=(rk < K) & (row < NP), other=0.0).to(tl.float32)
            vs = tl.load(as_ptr + (row - NP) * K + rk, mask=(rk < K) & (row >= NP) & (row < NP + NS),
                         other=0.0).to(tl.float32)
            tl.store(a_ptr + row * K + rk, (vp + vs).to(a_ptr.dtype.element_ty), mask=rk < K)

    @triton.jit
    def _pack_c_block(bp_ptr, bs_ptr, d_ptr, c_ptr, block, N, NP, NS, scale, R: tl.constexpr, BN: tl.constexpr):
        """Rows [block * BN, block * BN + BN) of C = s [B_p D_p, B_s D_s, 0]."""
        rn = block * BN + tl.arange(0, BN)
        rr = tl.arange(0, R)
        d = tl.load(d_ptr + rr, mask=rr < NP + NS, other=0.0).to(tl.float32)
        row_ok = (rn < N)[:, None]
        bp = tl.load(bp_ptr + rn[:, None] * NP + rr[None, :], mask=row_ok & (rr < NP)[None, :], other=0.0)
        bs = tl.load(bs_ptr + rn[:, None] * NS + (rr - NP)[None, :],
                     mask=row_ok & ((rr >= NP) & (rr < NP + NS))[None, :], other=0.0)
        c = (bp.to(tl.float32) + bs.to(tl.float32)) * d[None, :] * scale
        tl.store(c_ptr + rn[:, None] * R + rr[None, :], c.to(c_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit(do_not_specialize=_LOOSE)
    def _down_pack_kernel(x_ptr, ap_ptr, as_ptr, bp_ptr, bs_ptr, d_ptr, a_ptr, c_ptr, u_ptr, M, K, N, NP, NS,
                          sxm, seed_h, thr, k_per_split, scale, row_blocks, splits,
                          R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BK_PACK: tl.constexpr,
                          BN_PACK: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
                          PACKED: tl.constexpr):
        """u = (keep * x) A^T in the first `row_blocks * splits` programs, reading the raw factors (or, with
        PACKED, the packed A made by an earlier launch), and the packed A and C in R + cdiv(N, BN_PACK) more
        programs (none when the grid stops short of them; only those with `row_blocks = 0`). Programs past those
        zero rows of u, BN_PACK each (a pack-only launch before the rows' launch that adds into u)."""
        pid = tl.program_id(0)
        computing = row_blocks * splits
        if pid < computing:
            rm = (pid % row_blocks) * BM + tl.arange(0, BM)
            rr = tl.arange(0, R)
            k_lo = (pid // row_blocks) * k_per_split
            acc = tl.zeros((BM, R), dtype=tl.float32)
            private = (rr < NP)[:, None]
            shared = ((rr >= NP) & (rr < NP + NS))[:, None]
            if DROPOUT:
                hr = _row_hash(rm, seed_h)
            for k0 in range(k_lo, k_lo + k_per_split, BK):
                rk = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                            other=0.0)
                if DROPOUT:
                    x = tl.where(_keep_h(hr, k0, seed_h, thr, BK), x, 0.0)
                in_k = (rk < K)[None, :]
                if PACKED:
                    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=in_k, other=0.0)
                else:
                    a = tl.load(ap_ptr + rr[:, None] * K + rk[None, :], mask=private & in_k, other=0.0)
                    a += tl.load(as_ptr + (rr - NP)[:, None] * K + rk[None, :], mask=shared & in_k, other=0.0)
                acc += _dot(x, tl.trans(a.to(x.dtype)), IEEE)
            pointers = u_ptr + rm[:, None] * R + rr[None, :]
            _store_or_add(pointers, acc, (rm < M)[:, None], ATOMIC)
        elif pid < computing + R:
            _pack_a_row(ap_ptr, as_ptr, a_ptr, pid - computing, K, NP, NS, BK_PACK)
        elif pid < computing + R + tl.cdiv(N, BN_PACK):
            _pack_c_block(bp_ptr, bs_ptr, d_ptr, c_ptr, pid - computing - R, N, NP, NS, scale, R, BN_PACK)
        else:
            rm = (pid - computing - R - tl.cdiv(N, BN_PACK)) * BN_PACK + tl.arange(0, BN_PACK)
            rr = tl.arange(0, R)
            tl.store(u_ptr + rm[:, None] * R + rr[None, :], tl.zeros((BN_PACK, R), dtype=tl.float32),
                     mask=(rm < M)[:, None])

    @triton.jit
    def _store_ga(gap_ptr, gas_ptr, acc, rr, rk, K, NP, NS, ATOMIC: tl.constexpr):
        """Rows of dA = [dA_p; dA_s; unused] (R, BK tile at columns rk) into dA_p (NP, K) and dA_s (NS, K)."""
        in_k = (rk < K)[None, :]
        _store_or_add(gap_ptr + rr[:, None] * K + rk[None, :], acc, in_k & (rr < NP)[:, None], ATOMIC)
        _store_or_add(gas_ptr + (rr - NP)[:, None] * K + rk[None, :], acc,
                      in_k & ((rr >= NP) & (rr < NP + NS))[:, None], ATOMIC)

    @triton.jit
    def _write_or_add(pointers, update, mask, ACCUMULATE: tl.constexpr):
        """Store a float32 tile into a token-sized tensor (its dtype), or add it to what is there."""
        if ACCUMULATE:
            update += tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        tl.store(pointers, update.to(pointers.dtype.element_ty), mask=mask)

    @triton.jit
    def _up_kernel(u_ptr, c_ptr, y_ptr, bias_ptr, M, N, sym, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   ACCUMULATE: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr):
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rr = tl.arange(0, R)
        c = tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0)
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        update = _dot(u.to(c.dtype), tl.trans(c), IEEE)
        if BIAS:
            update += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        inside = (rm < M)[:, None] & (rn < N)[None, :]
        _write_or_add(y_ptr + rm[:, None] * sym + rn[None, :], update, inside, ACCUMULATE)

    @triton.jit
    def _up_rows_kernel(u_ptr, c_ptr, y_ptr, bias_ptr, M, N, sym, n_per_split, R: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, ACCUMULATE: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr):
        """`_up_kernel` with each program owning BM rows: u's rows are read once, and the program walks its
        `n_per_split` output columns BN at a time, streaming C's rows (L2-resident) and writing y. The tile
        version reads u (float32) once per BN columns, as many bytes as it writes at BN = 128."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        u = u.to(c_ptr.dtype.element_ty)
        n_lo = tl.program_id(1) * n_per_split
        for n0 in range(n_lo, tl.minimum(n_lo + n_per_split, N), BN):
            rn = n0 + tl.arange(0, BN)
            c = tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0)
            update = _dot(u, tl.trans(c), IEEE)
            if BIAS:
                update += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            inside = (rm < M)[:, None] & (rn < N)[None, :]
            _write_or_add(y_ptr + rm[:, None] * sym + rn[None, :], update, inside, ACCUMULATE)

    @triton.jit(do_not_specialize=_LOOSE)
    def _gx_rows_kernel(gu_ptr, a_ptr, gx_ptr, gu16_ptr, M, K, sgxm, seed_h, thr, k_per_split, R: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
                        IEEE: tl.constexpr, GU16: tl.constexpr):
        """`_gx_kernel` with each program owning BM rows: gu's rows read (and the rows' half of the mask's hash
        computed) once, A's rows streamed (L2-resident), dL/dx written BK columns at a time. With GU16, the
        first program of each row block also writes its rows of gu in A's dtype (for `_ga_finalize_kernel`,
        which would otherwise re-read float32 gu once per column block)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        gu = tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        gu = gu.to(a_ptr.dtype.element_ty)
        if GU16:
            if tl.program_id(1) == 0:
                tl.store(gu16_ptr + rm[:, None] * R + rr[None, :], gu, mask=(rm < M)[:, None])
        if DROPOUT:
            hr = _row_hash(rm, seed_h)
        k_lo = tl.program_id(1) * k_per_split
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            update = _dot(gu, a, IEEE)
            if DROPOUT:
                update = tl.where(_keep_h(hr, k0, seed_h, thr, BK), update, 0.0)
            inside = (rm < M)[:, None] & (rk < K)[None, :]
            _write_or_add(gx_ptr + rm[:, None] * sgxm + rk[None, :], update, inside, ACCUMULATE)

    @triton.jit
    def _bwd_up_kernel(g_ptr, c_ptr, u_ptr, gu_ptr, gc_ptr, M, N, sgm, n_per_split, RU,
                       R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ATOMIC: tl.constexpr,
                       IEEE: tl.constexpr):
        """gu (+)= g C over the program's rows and a split of the columns; dC += g^T u tile by tile. Only the
        first RU of the R packed ranks are stored or added: the others are zero padding (gu and dC come zeroed)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        used = (rr < RU)[None, :]
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        u = u.to(g_ptr.dtype.element_ty)
        acc = tl.zeros((BM, R), dtype=tl.float32)
        n_lo = tl.program_id(1) * n_per_split
        for n0 in range(n_lo, n_lo + n_per_split, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :],
                        other=0.0)
            c = tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0)
            acc += _dot(g, c, IEEE)
            tl.atomic_add(gc_ptr + rn[:, None] * R + rr[None, :], _dot(tl.trans(g), u, IEEE),
                          mask=(rn < N)[:, None] & used, sem="relaxed")
        pointers = gu_ptr + rm[:, None] * R + rr[None, :]
        _store_or_add(pointers, acc, (rm < M)[:, None] & used, ATOMIC)

    @triton.jit(do_not_specialize=_LOOSE)
    def _bwd_down_kernel(x_ptr, gu_ptr, a_ptr, gx_ptr, gap_ptr, gas_ptr, M, K, NP, NS, sxm, sgxm, seed_h, thr,
                         m_per_split,
                         R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DROPOUT: tl.constexpr,
                         GRAD_X: tl.constexpr, ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        rr = tl.arange(0, R)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
        acc = tl.zeros((R, BK), dtype=tl.float32)
        m_lo = tl.program_id(1) * m_per_split
        for m0 in range(m_lo, m_lo + m_per_split, BM):
            rm = m0 + tl.arange(0, BM)
            inside = (rm < M)[:, None] & (rk < K)[None, :]
            gu = tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0).to(a.dtype)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=inside, other=0.0)
            if DROPOUT:
                keep = _keep(rm, tl.program_id(0) * BK, seed_h, thr, BK)
                x = tl.where(keep, x, 0.0)
            acc += _dot(tl.trans(gu), x, IEEE)
            if GRAD_X:
                update = _dot(gu, a, IEEE)
                if DROPOUT:
                    update = tl.where(keep, update, 0.0)
                _write_or_add(gx_ptr + rm[:, None] * sgxm + rk[None, :], update, inside, ACCUMULATE)
        _store_ga(gap_ptr, gas_ptr, acc, rr, rk, K, NP, NS, ATOMIC)

    @triton.jit
    def _gu_kernel(g_ptr, c_ptr, gu_ptr, M, N, sgm, n_per_split, RU, R: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        acc = tl.zeros((BM, R), dtype=tl.float32)
        n_lo = tl.program_id(1) * n_per_split
        for n0 in range(n_lo, n_lo + n_per_split, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :],
                        other=0.0)
            c = tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0)
            acc += _dot(g, c, IEEE)
        pointers = gu_ptr + rm[:, None] * R + rr[None, :]
        _store_or_add(pointers, acc, (rm < M)[:, None] & (rr < RU)[None, :], ATOMIC)

    @triton.jit
    def _gc_kernel(g_ptr, u_ptr, gc_ptr, M, N, sgm, m_per_split, RU, R: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, IEEE: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rr = tl.arange(0, R)
        acc = tl.zeros((BN, R), dtype=tl.float32)
        m_lo = tl.program_id(1) * m_per_split
        for m0 in range(m_lo, m_lo + m_per_split, BM):
            rm = m0 + tl.arange(0, BM)
            g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :],
                        other=0.0)
            u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
            acc += _dot(tl.trans(g), u.to(g.dtype), IEEE)
        tl.atomic_add(gc_ptr + rn[:, None] * R + rr[None, :], acc, mask=(rn < N)[:, None] & (rr < RU)[None, :],
                      sem="relaxed")

    @triton.jit(do_not_specialize=_LOOSE)
    def _gx_kernel(gu_ptr, a_ptr, gx_ptr, M, K, sgxm, seed_h, thr, R: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, IEEE: tl.constexpr):
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        rr = tl.arange(0, R)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
        gu = tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0).to(a.dtype)
        update = _dot(gu, a, IEEE)
        if DROPOUT:
            update = tl.where(_keep(rm, tl.program_id(0) * BK, seed_h, thr, BK), update, 0.0)
        inside = (rm < M)[:, None] & (rk < K)[None, :]
        _write_or_add(gx_ptr + rm[:, None] * sgxm + rk[None, :], update, inside, ACCUMULATE)

    @triton.jit
    def _finalize_block(gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr, block, N, NP, NS, scale,
                        R: tl.constexpr, BN: tl.constexpr):
        """dB = s dC D and dD += s sum_b(dC * B) for rows [block * BN, block * BN + BN) of dC."""
        rn = block * BN + tl.arange(0, BN)
        rr = tl.arange(0, R)
        row_ok = (rn < N)[:, None]
        private = row_ok & (rr < NP)[None, :]
        shared = row_ok & ((rr >= NP) & (rr < NP + NS))[None, :]
        gc = tl.load(gc_ptr + rn[:, None] * R + rr[None, :], mask=row_ok, other=0.0) * scale
        d = tl.load(d_ptr + rr, mask=rr < NP + NS, other=0.0).to(tl.float32)
        gb = gc * d[None, :]
        tl.store(gbp_ptr + rn[:, None] * NP + rr[None, :], gb, mask=private)
        tl.store(gbs_ptr + rn[:, None] * NS + (rr - NP)[None, :], gb, mask=shared)
        bp = tl.load(bp_ptr + rn[:, None] * NP + rr[None, :], mask=private, other=0.0).to(tl.float32)
        bs = tl.load(bs_ptr + rn[:, None] * NS + (rr - NP)[None, :], mask=shared, other=0.0).to(tl.float32)
        tl.atomic_add(gd_ptr + rr, tl.sum(gc * (bp + bs), axis=0), mask=rr < NP + NS, sem="relaxed")

    @triton.jit
    def _finalize_kernel(gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr, N, NP, NS, scale,
                         R: tl.constexpr, BN: tl.constexpr):
        _finalize_block(gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr, tl.program_id(0), N, NP, NS, scale,
                        R, BN)

    @triton.jit(do_not_specialize=_LOOSE)
    def _ga_finalize_kernel(x_ptr, gu_ptr, gap_ptr, gas_ptr, gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr,
                            M, K, N, NP, NS, sxm, seed_h, thr, m_per_split, scale, k_blocks, splits,
                            R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN_FIN: tl.constexpr,
                            DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        """The backward's last launch: dA = gu^T (keep * x) and, in extra programs, dB and dD from the complete
        dC (written by the earlier `bwd_up` launch)."""
        pid = tl.program_id(0)
        computing = k_blocks * splits
        if pid < computing:
            col0 = (pid % k_blocks) * BK
            rk = col0 + tl.arange(0, BK)
            rr = tl.arange(0, R)
            acc = tl.zeros((R, BK), dtype=tl.float32)
            m_lo = (pid // k_blocks) * m_per_split
            if DROPOUT:
                hc = _col_hash(col0, seed_h, BK)  # the program's columns: hashed once
            for m0 in range(m_lo, m_lo + m_per_split, BM):
                rm = m0 + tl.arange(0, BM)
                x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                            other=0.0)
                if DROPOUT:
                    x = tl.where(_keep_w(_row_hash(rm, seed_h), hc) >= thr, x, 0.0)
                gu = tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
                acc += _dot(tl.trans(gu.to(x.dtype)), x, IEEE)
            _store_ga(gap_ptr, gas_ptr, acc, rr, rk, K, NP, NS, ATOMIC)
        else:
            _finalize_block(gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr, pid - computing, N, NP, NS,
                            scale, R, BN_FIN)

_PLANS: dict = {}
_PLANS_FOR: dict | None = None
# Launch plans and cached launches are keyed by shape, token count included, so training on batches of varying
# length adds entries as it meets new lengths: each cache is emptied when it reaches this many (and refills).
MAX_CACHED = 4096


def remember(cache: dict, key, value):
    """cache[key] = value, emptying the cache first when it holds MAX_CACHED entries; returns value."""
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = value
    return value


def clear_plans() -> None:
    """Forget the launch plans derived from CONFIGS (call after editing CONFIGS in place)."""
    _PLANS.clear()


def _plan(key: tuple, build):
    """The launch plan (grid, tiles, splits) of `key` = (kind, *shape), built once from CONFIGS."""
    global _PLANS_FOR
    if _PLANS_FOR is not CONFIGS:  # CONFIGS was replaced (tests monkeypatch it): start afresh
        _PLANS.clear()
        _PLANS_FOR = CONFIGS
    plan = _PLANS.get(key)
    if plan is None:
        plan = remember(_PLANS, key, build(*key[1:]))
    return plan


class _DownPlan(NamedTuple):
    R: int
    BM: int
    BK: int
    row_blocks: int
    splits: int
    k_per_split: int
    BK_PACK: int
    BN_PACK: int
    pack_programs: int
    separate: bool  # the pack in its own launch before the rows (CONFIGS["down"]["pack"] == "separate")
    ieee: bool
    warps: int
    stages: int


def _down_plan(M, K, N, NP, NS, dtype):
    R = packed_width(NP + NS)
    cfg = _fit("down", R, dtype.itemsize)
    BM, BK = cfg["BM"], _block(cfg["BK"], K)
    row_blocks = _cdiv(M, BM)
    splits, k_per_split = _split_plan(row_blocks, K, BK, cfg)
    pack = CONFIGS["pack"]
    BN_PACK = _rows_for_width(pack["BN"], R)
    return _DownPlan(R, BM, BK, row_blocks, splits, k_per_split, _block(pack["BK"], K), BN_PACK,
                     R + _cdiv(N, BN_PACK), cfg.get("pack", "fused") == "separate", dtype == torch.float32,
                     cfg["warps"], cfg["stages"])


def _pack_into(A, C, A_p, B_p, D, A_s, B_s, x, u, scale, plan, M, K, N, NP, NS, zero_u: bool = False):
    """Launch the pack-only programs of `_down_pack_kernel` (no rows: row_blocks = 0), and with zero_u, programs
    zeroing u (M, R) (instead of a `torch.zeros`: one launch and allocation call less on the host)."""
    programs = plan.pack_programs + (_cdiv(M, plan.BN_PACK) if zero_u else 0)
    _DOWN_PACK((programs,), (
        x, A_p, A_s, B_p, B_s, D, A, C, u, M, K, N, NP, NS, K, 0, 0, plan.k_per_split, scale, 0, plan.splits,
        plan.R, plan.BM, plan.BK, plan.BK_PACK, plan.BN_PACK, False, plan.splits > 1, plan.ieee, False), 4, 1)


def _packed_pair(R: int, K: int, N: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised A (R, K) and C (N, R) in one allocation (they live and die together: one allocator call less
    on the host a pack). C starts R * K elements in, a multiple of 16 bytes (R >= 16), as the launch cache needs."""
    pair = torch.empty(R * K + N * R, dtype=dtype, device=device)
    return pair.as_strided((R, K), (K, 1), 0), pair.as_strided((N, R), (R, 1), R * K)


def pack(A_p, B_p, D, A_s, B_s, dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed A = [A_p; A_s; 0] (R, K) and C = s [B_p D_p, B_s D_s, 0] (N, R) in `dtype`, in one launch."""
    (NP, K), NS, N = A_p.shape, A_s.shape[0], B_p.shape[0]
    plan = _plan(("down", 1, K, N, NP, NS, dtype), _down_plan)
    A, C = _packed_pair(plan.R, K, N, dtype, A_p.device)
    _pack_into(A, C, A_p, B_p, D, A_s, B_s, A, A, scale, plan, 1, K, N, NP, NS)
    return A, C


def down_and_pack(x, A_p, B_p, D, A_s, B_s, scale: float, seed_h: int, thr: int, dropout: bool):
    """u = (keep * x) [A_p; A_s]^T (float32 (M, R)), and the packed A (R, K) and C (N, R) in x's dtype (the
    factors must be contiguous). One launch (CONFIGS["down"]["pack"] "fused": the rows read the raw factors) or
    two ("separate", the committed default: a pack launch, then the rows read the packed A)."""
    M, K = x.shape
    NP, NS, N = A_p.shape[0], A_s.shape[0], B_p.shape[0]
    plan = _plan(("down", M, K, N, NP, NS, x.dtype), _down_plan)
    R, BM, BK, row_blocks, splits, k_per_split, BK_PACK, BN_PACK, pack_programs, separate, ieee, warps, stages = plan
    A, C = _packed_pair(R, K, N, x.dtype, x.device)
    # u is added into by split reductions: zeroed by the pack launch when there is one, else by torch
    u = (torch.zeros if splits > 1 and not separate else torch.empty)((M, R), dtype=torch.float32, device=x.device)
    if separate:
        _pack_into(A, C, A_p, B_p, D, A_s, B_s, x, u, scale, plan, M, K, N, NP, NS, zero_u=splits > 1)
    programs = row_blocks * splits + (0 if separate else pack_programs)
    _DOWN_PACK((programs,), (x, A_p, A_s, B_p, B_s, D, A, C, u, M, K, N, NP, NS, x.stride(0), seed_h, thr,
                             k_per_split, scale, row_blocks, splits, R, BM, BK, BK_PACK, BN_PACK, dropout, splits > 1,
                             ieee, separate), warps, stages)
    return u, A, C


def _up_plan(M, N, R, dtype):
    cfg = _fit("up", R, dtype.itemsize)
    BM, BN = cfg["BM"], cfg["BN"]
    ieee = dtype == torch.float32
    if cfg.get("mode", "tiles") == "rows":  # programs own BM rows and walk their share of the columns
        splits, per_split = _split_plan(_cdiv(M, BM), N, BN, cfg)
        return True, (_cdiv(M, BM), splits), per_split, BM, BN, ieee, cfg["warps"], cfg["stages"]
    return False, (_cdiv(N, BN), _cdiv(M, BM)), 0, BM, BN, ieee, cfg["warps"], cfg["stages"]


def up_(y: torch.Tensor, u: torch.Tensor, C: torch.Tensor, accumulate: bool = True,
        bias: torch.Tensor | None = None) -> None:
    """y += u C^T in place (y (M, N) with unit column stride); with accumulate=False, y = u C^T (+ bias)."""
    M, N = y.shape
    R = C.shape[1]
    rows, grid, per_split, BM, BN, ieee, warps, stages = _plan(("up", M, N, R, y.dtype), _up_plan)
    if rows:
        _UP_ROWS(grid, (u, C, y, y if bias is None else bias, M, N, y.stride(0), per_split, R, BM, BN, accumulate,
                        bias is not None, ieee), warps, stages)
        return
    _UP(grid, (u, C, y, y if bias is None else bias, M, N, y.stride(0), R, BM, BN, accumulate, bias is not None,
               ieee), warps, stages)


def _split_plan(blocks: int, length: int, block: int, cfg: dict) -> tuple[int, int]:
    """(splits, elements per split) for a reduction of `length` in chunks of `block`."""
    chunks = _cdiv(length, block)
    splits = _splits(blocks, chunks, cfg.get("splits", 0), cfg.get("programs", 0))
    per_split = _cdiv(chunks, splits) * block
    return _cdiv(length, per_split), per_split


def _bwd_up_plan(M, N, R, dtype):
    size, ieee = dtype.itemsize, dtype == torch.float32
    cfg = _fit("bwd_up", R, size)
    if cfg.get("mode", "fused") == "split":  # two kernels, each reading g once, few atomics
        cu, cc = _fit("gu", R, size), _fit("gc", R, size)
        gu_splits, gu_per = _split_plan(_cdiv(M, cu["BM"]), N, cu["BN"], cu)
        gc_splits, gc_per = _split_plan(_cdiv(N, cc["BN"]), M, cc["BM"], cc)
        return ("split", ((_cdiv(M, cu["BM"]), gu_splits), gu_per, cu["BM"], cu["BN"], gu_splits > 1, cu["warps"],
                          cu["stages"]),
                ((_cdiv(N, cc["BN"]), gc_splits), gc_per, cc["BM"], cc["BN"], cc["warps"], cc["stages"]), ieee)
    splits, per_split = _split_plan(_cdiv(M, cfg["BM"]), N, cfg["BN"], cfg)
    return ("fused", ((_cdiv(M, cfg["BM"]), splits), per_split, cfg["BM"], cfg["BN"], splits > 1, cfg["warps"],
                      cfg["stages"]), None, ieee)


def bwd_up(g: torch.Tensor, C: torch.Tensor, u: torch.Tensor, gu: torch.Tensor, gc: torch.Tensor,
           ranks: int | None = None) -> None:
    """gu (+)= g C and gc += g^T u (float32; both zeroed by the caller), over the first `ranks` packed ranks
    rounded up to a multiple of 16 (default all R; the rest of gu and gc is left as it was: zero, as the padded
    ranks' terms are). The rounding keeps the stores' column mask uniform over 16 columns, so Triton still emits
    4-wide atomic adds (`atom.global...add.v4.f32`); with `ranks` itself (39 of 64) they were scalar and bwd_up
    took 1.6-2.1x as long on an H200 (`benchmarks/RESULTS.md`, session 9)."""
    M, N = g.shape
    R = C.shape[1]
    ranks = R if ranks is None else min(R, -(-ranks // 16) * 16)
    mode, first, second, ieee = _plan(("bwd_up", M, N, R, g.dtype), _bwd_up_plan)
    grid, per_split, BM, BN, atomic, warps, stages = first
    if mode == "split":
        _GU(grid, (g, C, gu, M, N, g.stride(0), per_split, ranks, R, BM, BN, atomic, ieee), warps, stages)
        grid, per_split, BM, BN, warps, stages = second
        _GC(grid, (g, u, gc, M, N, g.stride(0), per_split, ranks, R, BM, BN, ieee), warps, stages)
        return
    _BWD_UP(grid, (g, C, u, gu, gc, M, N, g.stride(0), per_split, ranks, R, BM, BN, atomic, ieee), warps, stages)


def _bwd_down_plan(M, K, N, R, dtype):
    size, ieee = dtype.itemsize, dtype == torch.float32
    cfg = _fit("bwd_down", R, size)
    BN_FIN = _rows_for_width(64, R)
    if cfg.get("mode", "fused") != "split":  # one pass over x and grad_x, then dB and dD in a small launch
        BK = _block(cfg["BK"], K)
        splits, per_split = _split_plan(_cdiv(K, BK), M, cfg["BM"], cfg)
        return ("fused", ((_cdiv(K, BK), splits), per_split, cfg["BM"], BK, splits > 1, cfg["warps"], cfg["stages"]),
                None, ((_cdiv(N, BN_FIN),), BN_FIN), ieee)
    # "split": grad_x one tile per program; then dA (a reduction over M) with dB and dD in extra programs
    cx, ca = _fit("gx", R, size), _fit("ga", R, size)
    BK = _block(ca["BK"], K)
    k_blocks = _cdiv(K, BK)
    splits, per_split = _split_plan(k_blocks, M, ca["BM"], ca)
    if cx.get("mode", "tiles") == "rows":  # programs own BM rows and walk their share of K
        gx_splits, gx_per = _split_plan(_cdiv(M, cx["BM"]), K, cx["BK"], cx)
        gx = ((_cdiv(M, cx["BM"]), gx_splits), gx_per, cx["BM"], cx["BK"], cx["warps"], cx["stages"])
    else:
        gx = ((_cdiv(K, cx["BK"]), _cdiv(M, cx["BM"])), None, cx["BM"], cx["BK"], cx["warps"], cx["stages"])
    return ("split", gx,
            ((k_blocks * splits + _cdiv(N, BN_FIN),), per_split, k_blocks, splits, ca["BM"], BK, BN_FIN, ca["warps"],
             ca["stages"]), None, ieee)


def bwd_down(x, gu, A, grad_x, gap, gas, gc, B_p, B_s, D, gd, gbp, gbs, scale: float, seed_h: int, thr: int,
             dropout: bool, accumulate: bool = True, gu16: torch.Tensor | None = None) -> None:
    """grad_x += keep * (gu A) in place (grad_x = keep * (gu A) with accumulate=False); dA = gu^T (keep * x) added
    into gap = dA_p (NP, K) and gas = dA_s (NS, K) (float32, zeroed by the caller); and from the complete
    gc = dL/dC: dB_p into gbp (N, NP), dB_s into gbs (N, NS) (float32, written) and dL/dD added into gd (zeroed).
    Each gradient goes to a tensor of its own size, so the parameters' .grad (which autograd takes over as they
    are) hold no more memory than the parameters do. gu16: an (M, R) tensor in x's dtype for the row-block dL/dx
    kernel to hand gu to `ga` in (allocated here when None; unused for float32)."""
    M, K = x.shape
    R, N = A.shape[0], gc.shape[0]
    NP, NS = B_p.shape[1], B_s.shape[1]
    mode, first, second, fin, ieee = _plan(("bwd_down", M, K, N, R, x.dtype), _bwd_down_plan)
    if mode == "fused":
        grid, per_split, BM, BK, atomic, warps, stages = first
        _BWD_DOWN(grid, (x, gu, A, grad_x if grad_x is not None else x, gap, gas, M, K, NP, NS, x.stride(0),
                         grad_x.stride(0) if grad_x is not None else 0, seed_h, thr, per_split, R, BM, BK, dropout,
                         grad_x is not None, accumulate, atomic, ieee), warps, stages)
        grid, BN = fin
        _FINALIZE(grid, (gc, B_p, B_s, D, gbp, gbs, gd, N, NP, NS, scale, R, BN), 4, 1)
        return
    if grad_x is not None:
        grid, per_split, BM, BK, warps, stages = first
        if per_split is None:
            _GX(grid, (gu, A, grad_x, M, K, grad_x.stride(0), seed_h, thr, R, BM, BK, dropout, accumulate, ieee),
                warps, stages)
        else:  # row blocks: they also hand `ga` gu in x's dtype (half the bytes it re-reads per column block)
            if ieee:
                gu16 = gu
            elif gu16 is None:
                gu16 = torch.empty((M, R), dtype=x.dtype, device=x.device)
            _GX_ROWS(grid, (gu, A, grad_x, gu16, M, K, grad_x.stride(0), seed_h, thr, per_split, R, BM, BK, dropout,
                            accumulate, ieee, not ieee), warps, stages)
            gu = gu16
    grid, per_split, k_blocks, splits, BM, BK, BN_FIN, warps, stages = second
    _GA_FINALIZE(grid, (x, gu, gap, gas, gc, B_p, B_s, D, gbp, gbs, gd, M, K, N, NP, NS, x.stride(0), seed_h, thr,
                        per_split, scale, k_blocks, splits, R, BM, BK, BN_FIN, dropout, splits > 1, ieee),
                 warps, stages)


def keep_mask(M: int, K: int, seed_h: int, thr: int, device) -> torch.Tensor:
    """The kernels' keep decisions as a bool (M, K) tensor (tests compare it with `dropout.keep_mask`)."""
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    grid = (_cdiv(M, 32), _cdiv(K, 64))
    _keep_mask_kernel[grid](out, M, K, seed_h, thr, BM=32, BK=64)
    return out.bool()


if triton is not None:

    @triton.jit(do_not_specialize=_LOOSE)
    def _keep_mask_kernel(out_ptr, M, K, seed_h, thr, BM: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        keep = _keep(rm, tl.program_id(1) * BK, seed_h, thr, BK)
        tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8),
                 mask=(rm < M)[:, None] & (rk < K)[None, :])

    _DOWN_PACK, _UP, _UP_ROWS, _BWD_UP, _GU, _GC, _BWD_DOWN, _GX, _GX_ROWS, _GA_FINALIZE, _FINALIZE, _KEEP_MASK = (
        _Launcher(fn) for fn in (_down_pack_kernel, _up_kernel, _up_rows_kernel, _bwd_up_kernel, _gu_kernel,
                                 _gc_kernel, _bwd_down_kernel, _gx_kernel, _gx_rows_kernel, _ga_finalize_kernel,
                                 _finalize_kernel, _keep_mask_kernel))
