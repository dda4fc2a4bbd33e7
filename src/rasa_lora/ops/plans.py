"""Launch shapes of the Triton kernels (`CONFIGS`) and the launch plans derived from them once per shape.

A plan holds a launch's grid, tiles and reduction splits, computed in plain Python once per (kernel, shape) and
cached (`plan`). `CONFIGS` holds the committed shapes, winners of `benchmarks/kernel_timing.py --sweep` at R = 64
in bf16 (docs/performance.md, record 3); `configs(...)` runs code under other shapes (sweeps, tests) and restores
them. The kernels are correct for any shape (tests/ops, small and split shapes).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

CONFIGS = {
    "down": {"BM": 64, "BK": 64, "splits": 0, "warps": 4, "stages": 3, "programs": 528, "pack": "separate"},
    "up": {"BM": 64, "BN": 128, "warps": 4, "stages": 2, "programs": 264},
    "bwd_up": {"BM": 256, "BN": 64, "splits": 0, "warps": 8, "stages": 4, "programs": 264},
    "gx": {"BM": 64, "BK": 64, "warps": 4, "stages": 2, "programs": 264},
    "ga": {"BM": 64, "BK": 128, "splits": 0, "warps": 8, "stages": 4, "programs": 528},
    "pack": {"BK": 1024, "BN": 64},
}
# "splits" 0: enough splits of a reduction for about "programs" programs (TARGET_PROGRAMS when unset)
TARGET_PROGRAMS = 2 * 132  # about two programs per SM of a Hopper SXM GPU (132 SMs); a floor elsewhere
# Plans (and cached launches, `launch.py`) are keyed by shape, token count included: batches of ever new lengths
# add entries, so each cache is emptied when it reaches this many (and refills).
MAX_CACHED = 4096

_PLANS: dict = {}
_PLANS_FOR: dict | None = None


def remember(cache: dict, key, value):
    """cache[key] = value, emptying the cache first when it holds MAX_CACHED entries; returns value."""
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = value
    return value


def clear_plans() -> None:
    """Forget the plans derived from CONFIGS."""
    _PLANS.clear()


def plan(key: tuple, build):
    """The plan of `key` = (kind, *shape), built once from CONFIGS by `build(*shape)`."""
    global _PLANS_FOR
    if _PLANS_FOR is not CONFIGS:  # CONFIGS was replaced (`configs`, a test's monkeypatch): start afresh
        _PLANS.clear()
        _PLANS_FOR = CONFIGS
    found = _PLANS.get(key)
    if found is None:
        found = remember(_PLANS, key, build(*key[1:]))
    return found


@contextlib.contextmanager
def configs(changes: dict[str, dict]):
    """Run the block with CONFIGS entries updated from `changes` ({kernel: {key: value}}), then restore them.
    CONFIGS is replaced, not edited, so plans derived from other shapes are never used inside or after."""
    global CONFIGS
    unknown = set(changes) - set(CONFIGS)
    if unknown:
        raise ValueError(f"no launch shapes named {sorted(unknown)}: choose among {sorted(CONFIGS)}")
    saved = CONFIGS
    CONFIGS = {name: {**cfg, **changes.get(name, {})} for name, cfg in saved.items()}
    try:
        yield CONFIGS
    finally:
        CONFIGS = saved


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # not triton.cdiv: a constexpr function in Triton 3.6, slow on the host (record 2)


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


def rows_for_width(cap: int, R: int) -> int:
    """Rows of the (rows x R) tiles of the pack and finalize programs: `cap` up to R = 64, fewer for wider R."""
    return cap if R <= 64 else max(16, cap * 64 // R)


def fit(name: str, R: int, itemsize: int) -> dict:
    """CONFIGS[name] shrunk for wide packed ranks or float32, so tiles fit in shared memory (the committed
    shapes are tuned for R = 64 in bf16); float32 pipelines at most two stages (docs/performance.md, record 7)."""
    cfg = CONFIGS[name]
    factor = max(1, R * itemsize // 128)
    if factor == 1 and (itemsize <= 2 or cfg.get("stages", 1) <= 2):
        return cfg
    cfg = dict(cfg)
    for key in ("BM", "BN", "BK"):
        if key in cfg:
            cfg[key] = max(16, cfg[key] // factor)
    cfg["stages"] = min(cfg.get("stages", 1), 2)
    return cfg


def _splits(blocks: int, chunks: int, requested: int, programs: int = 0) -> int:
    """How many ways to split a reduction of `chunks` chunks, given `blocks` programs without splitting:
    `requested` if set, else enough for about `programs` (default TARGET_PROGRAMS) programs in all."""
    if requested:
        return max(1, min(requested, chunks))
    return max(1, min(chunks, -(-(programs or TARGET_PROGRAMS) // max(blocks, 1))))


def split_plan(blocks: int, length: int, block: int, cfg: dict) -> tuple[int, int]:
    """(splits, elements per split) for a reduction of `length` in chunks of `block`."""
    chunks = cdiv(length, block)
    splits = _splits(blocks, chunks, cfg.get("splits", 0), cfg.get("programs", 0))
    per_split = cdiv(chunks, splits) * block
    return cdiv(length, per_split), per_split


class DownPlan(NamedTuple):
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


def down_plan(M, K, N, NP, NS, dtype) -> DownPlan:
    R = packed_width(NP + NS)
    cfg = fit("down", R, dtype.itemsize)
    BM, BK = cfg["BM"], _block(cfg["BK"], K)
    row_blocks = cdiv(M, BM)
    splits, k_per_split = split_plan(row_blocks, K, BK, cfg)
    pack = CONFIGS["pack"]
    BN_PACK = rows_for_width(pack["BN"], R)
    return DownPlan(R, BM, BK, row_blocks, splits, k_per_split, _block(pack["BK"], K), BN_PACK,
                    R + cdiv(N, BN_PACK), cfg.get("pack", "fused") == "separate", dtype == torch.float32,
                    cfg["warps"], cfg["stages"])


class UpPlan(NamedTuple):
    """`_up_rows_kernel`: a block of BM rows a program, walking `n_per_split` columns BN at a time."""
    grid: tuple
    n_per_split: int
    BM: int
    BN: int
    ieee: bool
    warps: int
    stages: int


def up_plan(M, N, R, dtype) -> UpPlan:
    cfg = fit("up", R, dtype.itemsize)
    splits, per_split = split_plan(cdiv(M, cfg["BM"]), N, cfg["BN"], cfg)
    return UpPlan((cdiv(M, cfg["BM"]), splits), per_split, cfg["BM"], cfg["BN"], dtype == torch.float32,
                  cfg["warps"], cfg["stages"])


class BwdUpPlan(NamedTuple):
    """`_bwd_up_kernel`: BM rows a program, its columns split `grid[1]` ways (atomic adds when split)."""
    grid: tuple
    n_per_split: int
    BM: int
    BN: int
    atomic: bool
    ieee: bool
    warps: int
    stages: int


def bwd_up_plan(M, N, R, dtype) -> BwdUpPlan:
    cfg = fit("bwd_up", R, dtype.itemsize)
    splits, per_split = split_plan(cdiv(M, cfg["BM"]), N, cfg["BN"], cfg)
    return BwdUpPlan((cdiv(M, cfg["BM"]), splits), per_split, cfg["BM"], cfg["BN"], splits > 1,
                     dtype == torch.float32, cfg["warps"], cfg["stages"])


class GxPlan(NamedTuple):
    """`_gx_rows_kernel`: BM rows a program, walking `k_per_split` columns BK at a time."""
    grid: tuple
    k_per_split: int
    BM: int
    BK: int
    warps: int
    stages: int


class GaPlan(NamedTuple):
    """`_ga_finalize_kernel`: dA over `k_blocks` x `splits` programs, then dB and dD in the grid's other ones."""
    grid: tuple
    m_per_split: int
    k_blocks: int
    splits: int
    BM: int
    BK: int
    BN_FIN: int
    warps: int
    stages: int


class BwdDownPlan(NamedTuple):
    gx: GxPlan
    ga: GaPlan
    ieee: bool


def bwd_down_plan(M, K, N, R, dtype) -> BwdDownPlan:
    size = dtype.itemsize
    cx, ca = fit("gx", R, size), fit("ga", R, size)
    BN_FIN = rows_for_width(64, R)
    BK = _block(ca["BK"], K)
    k_blocks = cdiv(K, BK)
    splits, per_split = split_plan(k_blocks, M, ca["BM"], ca)
    gx_splits, gx_per = split_plan(cdiv(M, cx["BM"]), K, cx["BK"], cx)
    gx = GxPlan((cdiv(M, cx["BM"]), gx_splits), gx_per, cx["BM"], cx["BK"], cx["warps"], cx["stages"])
    ga = GaPlan((k_blocks * splits + cdiv(N, BN_FIN),), per_split, k_blocks, splits, ca["BM"], BK, BN_FIN,
                ca["warps"], ca["stages"])
    return BwdDownPlan(gx, ga, dtype == torch.float32)
