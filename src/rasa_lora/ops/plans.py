"""Launch shapes of the Triton kernels (`CONFIGS`) and the launch plans derived from them once per shape.

A plan (a named tuple) holds a launch's grid, tiles and reduction splits, computed in plain Python once per (kernel,
shape) and cached (`plan`). `CONFIGS` holds the committed shapes, winners of `benchmarks/kernel_timing.py --sweep`
(docs/performance.md, record 3); `configs(...)` runs code under other shapes and restores them. The kernels are
correct for any shape (tests/ops, small and split shapes).
"""

from __future__ import annotations

import contextlib
from collections import namedtuple

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


def packed_width(n: int) -> int:
    """R: n ranks rounded up to a power of two, at least 16 (as `tl.dot` needs)."""
    return max(16, 1 << max(0, n - 1).bit_length())


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


def split_plan(blocks: int, length: int, block: int, cfg: dict) -> tuple[int, int]:
    """(splits, elements per split) for a reduction of `length` in chunks of `block`, given `blocks` programs
    without splitting: cfg["splits"] ways if set, else enough for about cfg["programs"] programs in all."""
    chunks = cdiv(length, block)
    requested, programs = cfg.get("splits", 0), cfg.get("programs", 0) or TARGET_PROGRAMS
    splits = max(1, min(chunks, requested if requested else cdiv(programs, max(blocks, 1))))
    per_split = cdiv(chunks, splits) * block
    return cdiv(length, per_split), per_split


def _rows_split(cfg: dict, M: int, length: int, edge: str) -> tuple[tuple[int, int], int]:
    """(grid, columns per split) of a kernel whose programs own BM rows each and walk `length` columns `edge` at a
    time, split to fill the GPU."""
    blocks = cdiv(M, cfg["BM"])
    splits, per_split = split_plan(blocks, length, cfg[edge], cfg)
    return (blocks, splits), per_split


# `_down_pack_kernel`: `row_blocks` x `splits` programs of u, then `pack_programs` packing A and C; `separate`: the
# pack in a launch of its own before the rows' (CONFIGS["down"]["pack"] == "separate")
DownPlan = namedtuple("DownPlan", "R BM BK row_blocks splits k_per_split BK_PACK BN_PACK pack_programs separate ieee "
                                  "warps stages")
UpPlan = namedtuple("UpPlan", "grid n_per_split BM BN ieee warps stages")  # `_up_rows_kernel`
BwdUpPlan = namedtuple("BwdUpPlan", "grid n_per_split BM BN atomic ieee warps stages")  # `_bwd_up_kernel`
GxPlan = namedtuple("GxPlan", "grid k_per_split BM BK warps stages")  # `_gx_rows_kernel`
# `_ga_finalize_kernel`: dA over `k_blocks` x `splits` programs, then dB and dD in the grid's other ones
GaPlan = namedtuple("GaPlan", "grid m_per_split k_blocks splits BM BK BN_FIN warps stages")
BwdDownPlan = namedtuple("BwdDownPlan", "gx ga ieee")


def down_plan(M, K, N, NP, NS, dtype) -> DownPlan:
    R = packed_width(NP + NS)
    cfg, pack = fit("down", R, dtype.itemsize), CONFIGS["pack"]
    BM, BK = cfg["BM"], min(cfg["BK"], packed_width(K))
    row_blocks = cdiv(M, BM)
    splits, k_per_split = split_plan(row_blocks, K, BK, cfg)
    BN_PACK = rows_for_width(pack["BN"], R)
    return DownPlan(R, BM, BK, row_blocks, splits, k_per_split, min(pack["BK"], packed_width(K)), BN_PACK,
                    R + cdiv(N, BN_PACK), cfg.get("pack", "fused") == "separate", dtype == torch.float32,
                    cfg["warps"], cfg["stages"])


def up_plan(M, N, R, dtype) -> UpPlan:
    cfg = fit("up", R, dtype.itemsize)
    grid, per_split = _rows_split(cfg, M, N, "BN")
    return UpPlan(grid, per_split, cfg["BM"], cfg["BN"], dtype == torch.float32, cfg["warps"], cfg["stages"])


def bwd_up_plan(M, N, R, dtype) -> BwdUpPlan:
    """Columns split `grid[1]` ways: gu added atomically when split."""
    cfg = fit("bwd_up", R, dtype.itemsize)
    grid, per_split = _rows_split(cfg, M, N, "BN")
    return BwdUpPlan(grid, per_split, cfg["BM"], cfg["BN"], grid[1] > 1, dtype == torch.float32, cfg["warps"],
                     cfg["stages"])


def bwd_down_plan(M, K, N, R, dtype) -> BwdDownPlan:
    cx, ca = fit("gx", R, dtype.itemsize), fit("ga", R, dtype.itemsize)
    BN_FIN, BK = rows_for_width(64, R), min(ca["BK"], packed_width(K))
    k_blocks = cdiv(K, BK)
    splits, per_split = split_plan(k_blocks, M, ca["BM"], ca)
    gx = GxPlan(*_rows_split(cx, M, K, "BK"), cx["BM"], cx["BK"], cx["warps"], cx["stages"])
    ga = GaPlan((k_blocks * splits + cdiv(N, BN_FIN),), per_split, k_blocks, splits, ca["BM"], BK, BN_FIN,
                ca["warps"], ca["stages"])
    return BwdDownPlan(gx, ga, dtype == torch.float32)
