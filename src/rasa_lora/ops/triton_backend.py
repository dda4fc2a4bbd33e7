"""The "triton" backend: the fused path's stages as launches of the kernels in `kernels.py` (CUDA; the CPU under
TRITON_INTERPRET=1), planned by `plans.py` and launched through `launch.py`'s cache.

With `gemm_adds` (the default, `rasa_lora.settings.GEMM_ADDS`) the adapter's kernels write y = u C^T + c and
dL/dx = m * (gu A) first and cuBLAS adds the base products into them (beta = 1), sparing the kernels a read and a
write of y and dL/dx (docs/performance.md, record 5).
"""

from __future__ import annotations

import contextlib

import torch

from rasa_lora.ops import dropout, launch, plans
from rasa_lora.ops.backend import Backend
from rasa_lora.ops.plans import cdiv


def _on_device(t: torch.Tensor):
    """Make t's GPU the current device while Triton launches (it launches on the current device; a model spread
    over several GPUs in one process, `device_map="auto"`, has layers on the others)."""
    index = t.get_device()
    if index < 0 or index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, gemm_adds: bool) -> None:
        self.gemm_adds = gemm_adds

    def prepare(self, factors):
        if all(t.is_contiguous() for t in factors):
            return factors
        return tuple(t.contiguous() for t in factors)

    def mask_args(self, p, seed):
        """(seed hash, threshold, dropout on, seed tensor or None): a host seed goes to the kernels by value (its
        hash), a seed tensor (the registered operators' device seed) by address, read by the kernels themselves."""
        if isinstance(seed, torch.Tensor):
            return 0, dropout.threshold(p), p > 0, seed
        return dropout.seed_hash(seed), dropout.threshold(p), p > 0, None

    def pack(self, factors, dtype, scale):
        with _on_device(factors[2]):
            return pack(*factors, dtype, scale)

    def down(self, rows, factors, mask, scale):
        with _on_device(rows):
            return down_and_pack(rows, *factors, scale, *mask)

    def up(self, rows, u, C, weight, bias):
        with _on_device(rows):
            if self.gemm_adds:  # y = u C^T + c first, then the base GEMM adds x W^T into it (beta = 1)
                y = rows.new_empty((rows.shape[0], weight.shape[0]))
                up_(y, u, C, accumulate=False, bias=bias)
                y.addmm_(rows, weight.t())
            else:
                y = torch.nn.functional.linear(rows, weight, bias)
                up_(y, u, C)
        return y

    def backward(self, rows, u, g, weight, factors, packed, mask, scale, needs_grad_x):
        A_p, B_p, D, A_s, B_s = factors
        M, K = rows.shape
        N, R = weight.shape[0], u.shape[1]
        grad_x = None
        if needs_grad_x:
            grad_x = g.new_empty((M, K)) if self.gemm_adds else g @ weight
        with _on_device(rows):  # Triton launches on the current device, torch ops on their tensors'
            A, C = packed if packed is not None else pack(A_p, B_p, D, A_s, B_s, rows.dtype, scale)
            # Two zeroed float32 workspaces (`workspaces`): the layer's own gradients (dA_p, dB_p, dD) in one,
            # which autograd keeps as the parameters' .grad, views and all, so it holds nothing else; the
            # temporaries gu (M, R), dC (N, R) and gu in x's dtype with the pool's dA_s and dB_s in the other.
            grad_A_p, grad_B_p, grad_D, gu, gc, grad_A_s, grad_B_s, gu16 = workspaces(
                g.device, M, K, N, A_p.shape[0], A_s.shape[0], R, rows.dtype)
            bwd_up(g, C, u, gu, gc, D.shape[0])
            bwd_down(rows, gu, A, grad_x, grad_A_p, grad_A_s, gc, B_p, B_s, D, grad_D, grad_B_p, grad_B_s,
                     scale, *mask, accumulate=not self.gemm_adds, gu16=gu16)
        if grad_x is not None and self.gemm_adds:
            grad_x.addmm_(g, weight)
        return grad_x, grad_A_p, grad_B_p, grad_D, grad_A_s, grad_B_s


# --- workspaces of the backward -----------------------------------------------------------------------------
_WORKSPACE_PLANS: dict = {}


def _aligned(size: int) -> int:
    """`size` float32 elements rounded up to a multiple of 16 bytes."""
    return -(-size // 4) * 4


def workspaces(device, M: int, K: int, N: int, NP: int, NS: int, R: int, dtype) -> tuple:
    """The backward's zeroed float32 gradients and temporaries, views of two allocations: (dA_p (NP, K),
    dB_p (N, NP), dD (n,)) from one, (gu (M, R), dC (N, R), dA_s (NS, K), dB_s (N, NS), gu in x's dtype (M, R), or
    None for float32 x) from the other. Every part starts 16-byte aligned, as the launch cache needs."""
    key = (M, K, N, NP, NS, R, dtype)
    layout = _WORKSPACE_PLANS.get(key)
    if layout is None:  # one per token count met: bounded as the launch plans are
        layout = plans.remember(_WORKSPACE_PLANS, key, _workspace_layout(*key))
    (size1, own), (size2, temporaries), half = layout
    first = torch.zeros(size1, dtype=torch.float32, device=device)
    second = torch.zeros(size2, dtype=torch.float32, device=device)
    views = [first.as_strided(*spec) for spec in own] + [second.as_strided(*spec) for spec in temporaries]
    if half is None:
        return (*views, None)
    offset, count = half  # float32 elements holding the (M, R) half-precision copy of gu
    return (*views, second[offset:offset + count].view(dtype).view(M, R))


def _workspace_layout(M, K, N, NP, NS, R, dtype):
    """(size, [(shape, stride, offset), ...]) of each workspace (see `workspaces`), offsets 16-byte aligned."""

    def layout(shapes):
        specs, offset = [], 0
        for shape in shapes:
            specs.append((shape, (shape[1], 1) if len(shape) == 2 else (1,), offset))
            offset += _aligned(shape[0] * (shape[1] if len(shape) == 2 else 1))
        return offset, specs

    own = layout([(NP, K), (N, NP), (NP + NS,)])
    size2, temporaries = layout([(M, R), (N, R), (NS, K), (N, NS)])
    half = None
    if dtype != torch.float32:
        count = _aligned(M * R * dtype.itemsize // 4)
        half, size2 = (size2, count), size2 + count
    return own, (size2, temporaries), half


# --- launches -------------------------------------------------------------------------------------------------
def _pack_into(A, C, A_p, B_p, D, A_s, B_s, x, u, scale, plan, M, K, N, NP, NS, zero_u: bool = False):
    """Launch the pack-only programs of `_down_pack_kernel` (no rows: row_blocks = 0), and with zero_u, programs
    zeroing u (M, R) (instead of a `torch.zeros`: one launch and allocation call less on the host)."""
    programs = plan.pack_programs + (cdiv(M, plan.BN_PACK) if zero_u else 0)
    launch.DOWN_PACK((programs,), (
        x, A_p, A_s, B_p, B_s, D, A, C, u, M, K, N, NP, NS, K, 0, x, 0, plan.k_per_split, scale, 0, plan.splits,
        plan.R, plan.BM, plan.BK, plan.BK_PACK, plan.BN_PACK, False, plan.splits > 1, plan.ieee, False, False), 4, 1)


def _packed_pair(R: int, K: int, N: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised A (R, K) and C (N, R) in one allocation (they live and die together: one allocator call less
    on the host a pack). C starts R * K elements in, a multiple of 16 bytes (R >= 16), as the launch cache needs."""
    pair = torch.empty(R * K + N * R, dtype=dtype, device=device)
    return pair.as_strided((R, K), (K, 1), 0), pair.as_strided((N, R), (R, 1), R * K)


def pack(A_p, B_p, D, A_s, B_s, dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed A = [A_p; A_s; 0] (R, K) and C = s [B_p D_p, B_s D_s, 0] (N, R) in `dtype`, in one launch."""
    (NP, K), NS, N = A_p.shape, A_s.shape[0], B_p.shape[0]
    plan = plans.plan(("down", 1, K, N, NP, NS, dtype), plans.down_plan)
    A, C = _packed_pair(plan.R, K, N, dtype, A_p.device)
    _pack_into(A, C, A_p, B_p, D, A_s, B_s, A, A, scale, plan, 1, K, N, NP, NS)
    return A, C


def down_and_pack(x, A_p, B_p, D, A_s, B_s, scale: float, seed_h: int, thr: int, dropout: bool,
                  seed: torch.Tensor | None = None):
    """u = (keep * x) [A_p; A_s]^T (float32 (M, R)), and the packed A (R, K) and C (N, R) in x's dtype (the
    factors must be contiguous). One launch (CONFIGS["down"]["pack"] "fused": the rows read the raw factors) or
    two ("separate", the committed default: a pack launch, then the rows read the packed A). The mask's seed: its
    hash `seed_h`, or with `seed` (a one-element int32 tensor on x's device) the seed the kernel reads there."""
    M, K = x.shape
    NP, NS, N = A_p.shape[0], A_s.shape[0], B_p.shape[0]
    plan = plans.plan(("down", M, K, N, NP, NS, x.dtype), plans.down_plan)
    R, BM, BK, row_blocks, splits, k_per_split, BK_PACK, BN_PACK, pack_programs, separate, ieee, warps, stages = plan
    A, C = _packed_pair(R, K, N, x.dtype, x.device)
    # u is added into by split reductions: zeroed by the pack launch when there is one, else by torch
    u = (torch.zeros if splits > 1 and not separate else torch.empty)((M, R), dtype=torch.float32, device=x.device)
    if separate:
        _pack_into(A, C, A_p, B_p, D, A_s, B_s, x, u, scale, plan, M, K, N, NP, NS, zero_u=splits > 1)
    programs = row_blocks * splits + (0 if separate else pack_programs)
    launch.DOWN_PACK((programs,), (x, A_p, A_s, B_p, B_s, D, A, C, u, M, K, N, NP, NS, x.stride(0), seed_h,
                                   x if seed is None else seed, thr, k_per_split, scale, row_blocks, splits, R, BM,
                                   BK, BK_PACK, BN_PACK, dropout, splits > 1, ieee, separate, seed is not None),
                     warps, stages)
    return u, A, C


def up_(y: torch.Tensor, u: torch.Tensor, C: torch.Tensor, accumulate: bool = True,
        bias: torch.Tensor | None = None) -> None:
    """y += u C^T in place (y (M, N) with unit column stride); with accumulate=False, y = u C^T (+ bias)."""
    M, N = y.shape
    R = C.shape[1]
    grid, per_split, BM, BN, ieee, warps, stages = plans.plan(("up", M, N, R, y.dtype), plans.up_plan)
    launch.UP_ROWS(grid, (u, C, y, y if bias is None else bias, M, N, y.stride(0), per_split, R, BM, BN, accumulate,
                          bias is not None, ieee), warps, stages)


def bwd_up(g: torch.Tensor, C: torch.Tensor, u: torch.Tensor, gu: torch.Tensor, gc: torch.Tensor,
           ranks: int | None = None) -> None:
    """gu (+)= g C and gc += g^T u (float32; both zeroed by the caller), over the first `ranks` packed ranks
    rounded up to a multiple of 16 (default all R; the rest of gu and gc is left as it was: zero, as the padded
    ranks' terms are). The rounding keeps the stores' column mask uniform over 16 columns, so Triton still emits
    4-wide atomic adds (docs/performance.md, record 8)."""
    M, N = g.shape
    R = C.shape[1]
    ranks = R if ranks is None else min(R, -(-ranks // 16) * 16)
    grid, per_split, BM, BN, atomic, ieee, warps, stages = plans.plan(("bwd_up", M, N, R, g.dtype), plans.bwd_up_plan)
    launch.BWD_UP(grid, (g, C, u, gu, gc, M, N, g.stride(0), per_split, ranks, R, BM, BN, atomic, ieee), warps,
                  stages)


def bwd_down(x, gu, A, grad_x, gap, gas, gc, B_p, B_s, D, gd, gbp, gbs, scale: float, seed_h: int, thr: int,
             dropout: bool, seed: torch.Tensor | None = None, accumulate: bool = True,
             gu16: torch.Tensor | None = None) -> None:
    """grad_x += keep * (gu A) in place (grad_x = keep * (gu A) with accumulate=False); dA = gu^T (keep * x) added
    into gap = dA_p (NP, K) and gas = dA_s (NS, K) (float32, zeroed by the caller); and from the complete
    gc = dL/dC: dB_p into gbp (N, NP), dB_s into gbs (N, NS) (float32, written) and dL/dD added into gd (zeroed).
    Each gradient goes to a tensor of its own size, so the parameters' .grad (which autograd takes over as they
    are) hold no more memory than the parameters do. gu16: an (M, R) tensor in x's dtype for the dL/dx kernel to
    hand gu to `ga` in, halving what `ga` re-reads (allocated here when None; unused for float32). The mask's seed
    as in `down_and_pack`."""
    M, K = x.shape
    R, N = A.shape[0], gc.shape[0]
    NP, NS = B_p.shape[1], B_s.shape[1]
    gx, ga, ieee = plans.plan(("bwd_down", M, K, N, R, x.dtype), plans.bwd_down_plan)
    seed_ptr, from_memory = (x, False) if seed is None else (seed, True)
    if grad_x is not None:
        if ieee:
            gu16 = gu
        elif gu16 is None:
            gu16 = torch.empty((M, R), dtype=x.dtype, device=x.device)
        launch.GX_ROWS(gx.grid, (gu, A, grad_x, gu16, M, K, grad_x.stride(0), seed_h, seed_ptr, thr, gx.k_per_split,
                                 R, gx.BM, gx.BK, dropout, accumulate, ieee, not ieee, from_memory), gx.warps,
                       gx.stages)
        gu = gu16
    launch.GA_FINALIZE(ga.grid, (x, gu, gap, gas, gc, B_p, B_s, D, gbp, gbs, gd, M, K, N, NP, NS, x.stride(0), seed_h,
                                 seed_ptr, thr, ga.m_per_split, scale, ga.k_blocks, ga.splits, R, ga.BM, ga.BK,
                                 ga.BN_FIN, dropout, ga.splits > 1, ieee, from_memory), ga.warps, ga.stages)


def keep_mask(M: int, K: int, seed_h: int, thr: int, device, seed: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' keep decisions as a bool (M, K) tensor: the mask of `dropout.py`, bit for bit (tested). The seed
    as in `down_and_pack`: its hash, or a one-element int64 tensor on `device` the kernel reads."""
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    with _on_device(out):
        launch.KEEP_MASK((cdiv(M, 32), cdiv(K, 64)), (out, M, K, seed_h, out if seed is None else seed, thr, 32, 64,
                                                      seed is not None), 4, 3)
    return out.view(torch.bool)
