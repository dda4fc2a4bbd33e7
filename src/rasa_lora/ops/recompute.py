"""State the fused path keeps between a forward run under gradient checkpointing and its recomputation.

Two process-wide caches, both keyed by the factor tensors themselves (their identity and version counters), so a
factor changed in place, another scale, dtype or backend, and nothing is reused (docs/performance.md, record 6):
- `stash_pack` / `take_pack`: the packed (A, C) of a checkpointed recomputation, for the backward that follows it
  (a launch and two allocations less a layer and step). A forward outside backward passes stashes nothing (its
  pack would be held across the whole step); the backward pops what it finds, so at most a block's worth is held.
- `keep_u` / `take_u`: the u of a forward run under checkpointing, for its recomputation (one read of x, and with
  dropout one drawing of the mask, less a layer and step; `rasa_lora.settings.KEEP_U` turns it off).
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


def _entry(factors: tuple, context: tuple, value) -> tuple:
    return factors, tuple(t._version for t in factors), context, value


def _valid(entry: tuple, factors: tuple, context: tuple) -> bool:
    """Whether a cache entry was made for these very factors, none changed in place since, in this context."""
    stashed, versions, stashed_context, _ = entry
    return (stashed_context == context and all(a is b for a, b in zip(stashed, factors))
            and versions == tuple(t._version for t in factors))


# id(A_p) -> the packed (A, C) of a checkpointed recomputation, for the backward that follows it
RECOMPUTED_PACKS: dict[int, tuple] = {}
_MAX_STASHED = 512


def stash_pack(factors: tuple, scale: float, dtype, backend, A, C) -> None:
    """Keep the (A, C) packed by a forward that runs inside a backward pass (a checkpointed recomputation)."""
    if len(RECOMPUTED_PACKS) >= _MAX_STASHED:  # stashes nobody took (a recomputation without a backward)
        RECOMPUTED_PACKS.clear()
    RECOMPUTED_PACKS[id(factors[0])] = _entry(factors, (scale, dtype, backend), (A, C))


def take_pack(factors: tuple, scale: float, dtype, backend):
    """(A, C) stashed for exactly these factors (same tensors, unchanged), scale, dtype and backend, or None."""
    entry = RECOMPUTED_PACKS.pop(id(factors[0]), None)
    if entry is None or not _valid(entry, factors, (scale, dtype, backend)):
        return None
    return entry[3]


class _Kept:
    """A forward's u, held by its autograd node (`ctx.kept`) until the recomputation takes it (`take_u`)."""

    __slots__ = ("u", "__weakref__")

    def __init__(self, u):
        self.u = u


# (id(A_p), seed) -> the u of a forward run under gradient checkpointing (a weak reference), for its recomputation
KEPT_U: dict[tuple, tuple] = {}


def keep_u(ctx, factors: tuple, seed: int, scale: float, backend, rows, u) -> torch.Tensor:
    """Keep u, in x's dtype (for bf16 inputs what every consumer reads anyway: the kernels round u to x's dtype
    before their products, so the results are the same bits), for the recomputation of this forward; returns it.

    The node holds the only strong reference (`ctx.kept`), so a u nobody takes (a forward without backward) goes
    with its graph. The recomputation finds it by the factors' identity and the call's seed (drawn for every call
    under checkpointing, dropout or not; checkpointing restores the generator, so the recomputation draws the same),
    and takes it only for the same factors (unchanged version counters), row count, dtype, scale and backend."""
    u = u.to(rows.dtype)
    # a detached alias: `_Down` returns u as its output, which autograd gives a grad_fn (the node itself); the
    # node holding that very tensor would be a reference cycle through C++ that keeps the whole graph alive
    kept = ctx.kept = _Kept(u.detach())
    key = (id(factors[0]), seed)

    def forget(ref, key=key):
        entry = KEPT_U.get(key)
        if entry is not None and entry[3] is ref:
            del KEPT_U[key]

    KEPT_U[key] = _entry(factors, (rows.shape[0], rows.dtype, scale, backend), weakref.ref(kept, forget))
    return u


def take_u(factors: tuple, seed: int, scale: float, backend, rows):
    """The u kept by `keep_u` for this call (and released from its forward's node), or None."""
    entry = KEPT_U.pop((id(factors[0]), seed), None)
    if entry is None or not _valid(entry, factors, (rows.shape[0], rows.dtype, scale, backend)):
        return None
    kept = entry[3]()
    if kept is None or kept.u is None:
        return None
    u, kept.u = kept.u, None
    return u
