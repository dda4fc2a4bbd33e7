"""Launching Triton kernels from a cache of compiled kernels (`Launcher`), and the launchers of `kernels.py`.

Triton's own launch path costs host time comparable to a small kernel's GPU time, and a training step launches
several a projection (docs/performance.md, record 2). `Launcher` keeps each compiled kernel after its first launch
and calls its C launcher directly.
"""

from __future__ import annotations

import functools
import operator

import torch

from rasa_lora.ops import kernels
from rasa_lora.ops.plans import remember
from rasa_lora.settings import FAST_LAUNCH

_DTYPE, _DATA_PTR = operator.attrgetter("dtype"), torch.Tensor.data_ptr


def current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


class Launcher:
    """`kernel[grid](*args, num_warps=..., num_stages=...)` without Triton's per-call argument binding.

    After one ordinary launch this keeps the compiled kernel under a key holding what Triton specializes on (each
    tensor's dtype and 16-byte alignment, every integer and constexpr argument except those in `kernels.LOOSE`, the
    launch options, the device), and later launches with that key call its C launcher directly. Arguments are
    positional, in the kernel's order, constexprs included (record 11; tests/ops/test_structure.py checks them).
    Off under Triton's interpreter and with RASA_LORA_FAST_LAUNCH=0. Cached kernels skip Triton launch hooks
    installed later: set RASA_LORA_FAST_LAUNCH=0 when profiling with such hooks (proton).
    """

    __slots__ = ("fn", "loose", "tensors", "scalars", "compiled")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.loose = frozenset(i for i, name in enumerate(fn.arg_names) if name in kernels.LOOSE)
        self.tensors = self.scalars = None  # itemgetters, set from the first call's arguments
        self.compiled: dict = {}

    def __call__(self, grid, args: tuple, warps: int, stages: int) -> None:
        fast = FAST_LAUNCH()
        if fast:
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
                launch(grid[0], grid[1] if len(grid) > 1 else 1, 1, current_stream(device), function, *options,
                       metadata, None, None, None, *args)
                return
        kernel = self.fn[grid](*args, num_warps=warps, num_stages=stages)
        # cached only when every tensor is 16-byte aligned (what Triton assumes when it compiles for aligned ones)
        if fast and aligned and cacheable(kernel, device):
            remember(self.compiled, key, _entry(kernel))


def _entry(kernel) -> tuple:
    """(launch, function, options, metadata) of a compiled kernel: with Triton 3.x's CUDA launcher and no scratch
    memory, its C `launch` itself (options: cooperative grid, PDL, two null scratch buffers), skipping the Python
    `__call__` around it (record 2); otherwise that `__call__` (`kernel.run`)."""
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


def cacheable(kernel, device: int) -> bool:
    """A compiled kernel (not the interpreter's None), for the current device, without Triton launch hooks."""
    if kernel is None or not hasattr(kernel, "packed_metadata") or getattr(kernel, "function", None) is None:
        return False
    if device != torch.cuda.current_device():
        return False
    hook = kernels.triton.knobs.runtime.launch_enter_hook
    return not getattr(hook, "calls", hook)  # an empty HookChain (or None): nothing would be skipped


if kernels.available():
    DOWN_PACK, UP_ROWS, BWD_UP, GX_ROWS, GA_FINALIZE, KEEP_MASK = (
        Launcher(fn) for fn in (kernels._down_pack_kernel, kernels._up_rows_kernel, kernels._bwd_up_kernel,
                                kernels._gx_rows_kernel, kernels._ga_finalize_kernel, kernels._keep_mask_kernel))
