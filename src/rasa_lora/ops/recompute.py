"""State the fused path keeps between a forward run under gradient checkpointing and its recomputation.

Two process-wide caches, both keyed by the factor tensors themselves (their identity and version counters), so a
factor changed in place, another scale, dtype or backend, and nothing is reused:
- `stash_pack` / `take_pack`: the packed (A, C) of a checkpointed recomputation, for the backward that follows it;
- `keep_u` / `take_u`: the u of a forward run under checkpointing, for its recomputation (docs/performance.md,
  record 6; `rasa_lora.settings.KEEP_U` turns it off).
"""

from __future__ import annotations

import weakref

import torch

TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def checkpointing() -> bool:
    """Whether this runs inside a region of torch.utils.checkpoint's non-reentrant gradient checkpointing (its
    first forward or its recomputation): the innermost saved-tensor hooks are checkpoint's."""
    hooks = TOP_HOOKS(False) if TOP_HOOKS is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


# Packs made by a gradient-checkpointing recomputation, for the backward that follows it (see `stash_pack`).
RECOMPUTED_PACKS: dict[int, tuple] = {}
_MAX_STASHED = 512


def stash_pack(factors: tuple, scale: float, dtype, backend, A, C) -> None:
    """Keep the packed (A, C) of a forward that runs inside a backward pass (a checkpointed recomputation), so the
    backward of the same layer, which follows, uses them instead of packing again (a launch and two allocations
    less a layer and step). Keyed by the factor tensors themselves and their version counters: a factor changed
    in place, another scale, dtype or backend, and the backward packs afresh. A forward outside backward passes
    stashes nothing (its pack would be held across the whole step); the backward pops what it finds, so at most
    a block's worth is held."""
    if len(RECOMPUTED_PACKS) >= _MAX_STASHED:  # stashes nobody took (a recomputation without a backward)
        RECOMPUTED_PACKS.clear()
    RECOMPUTED_PACKS[id(factors[0])] = (factors, _versions(factors), scale, dtype, backend, A, C)


def take_pack(factors: tuple, scale: float, dtype, backend):
    """(A, C) stashed for exactly these factors (same tensors, unchanged), scale, dtype and backend, or None."""
    entry = RECOMPUTED_PACKS.pop(id(factors[0]), None)
    if entry is None:
        return None
    stashed, versions, stashed_scale, stashed_dtype, stashed_backend, A, C = entry
    if (stashed_scale != scale or stashed_dtype != dtype or stashed_backend != backend
            or not _unchanged(stashed, versions, factors)):
        return None
    return A, C


def _versions(factors: tuple) -> tuple:
    return tuple(t._version for t in factors)


def _unchanged(stashed: tuple, versions: tuple, factors: tuple) -> bool:
    """Whether `factors` are the very tensors `stashed`, none changed in place since their `versions` were read."""
    return all(a is b for a, b in zip(stashed, factors)) and versions == _versions(factors)


class _Kept:
    """A forward's u, held by its autograd node (`ctx.kept`) until the recomputation takes it (`take_u`)."""

    __slots__ = ("u", "__weakref__")

    def __init__(self, u):
        self.u = u


# u of the forwards run under gradient checkpointing, by (id(A_p), seed), for their recomputations (`keep_u`)
KEPT_U: dict[tuple, tuple] = {}


def keep_u(ctx, factors: tuple, seed: int, scale: float, backend, rows, u) -> torch.Tensor:
    """Keep u (in x's dtype) of a forward running under non-reentrant gradient checkpointing, so its recomputation
    takes it instead of computing it again: one read of x (and, with dropout, one drawing of the mask) less a layer
    and step. The checkpoint discards and recomputes what the node saves; u lives on here, at x's dtype (for bf16
    inputs what every consumer of u reads anyway: the kernels round it to x's dtype before their products, so the
    results are the same bits), at R / a of x's size (docs/performance.md, record 6; `set_keep_u(False)` turns
    it off).

    The node holds the only strong reference (`ctx.kept`), so a u nobody takes (a forward without backward) goes
    with its graph; the recomputation finds it by the factors' identity and the call's seed (drawn for every call
    under checkpointing, dropout or not; checkpointing restores the generator, so the recomputation draws the same),
    and takes it only for the same factors (unchanged version counters), rows, scale and backend. Returns the
    kept u."""
    u = u.to(rows.dtype)
    # a detached alias: `_Down` returns u as its output, which autograd gives a grad_fn (the node itself); the
    # node holding that very tensor would be a reference cycle through C++ that keeps the whole graph alive
    kept = ctx.kept = _Kept(u.detach())
    key = (id(factors[0]), seed)

    def forget(ref, key=key):
        entry = KEPT_U.get(key)
        if entry is not None and entry[0] is ref:
            del KEPT_U[key]

    KEPT_U[key] = (weakref.ref(kept, forget), factors, _versions(factors), rows.shape[0], rows.dtype, scale, backend)
    return u


def take_u(factors: tuple, seed: int, scale: float, backend, rows):
    """The u kept by `keep_u` for this call (and released from its forward's node), or None."""
    entry = KEPT_U.pop((id(factors[0]), seed), None)
    if entry is None:
        return None
    ref, kept_factors, versions, M, dtype, kept_scale, kept_backend = entry
    kept = ref()
    if (kept is None or kept.u is None or M != rows.shape[0] or dtype != rows.dtype or kept_scale != scale
            or kept_backend != backend or not _unchanged(kept_factors, versions, factors)):
        return None
    u, kept.u = kept.u, None
    return u
