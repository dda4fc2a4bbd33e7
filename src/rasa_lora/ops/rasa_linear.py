r"""The RaSA linear layer (base projection + eq. 5 adapter) as one autograd node (`_Fused`), or as two (`_Down`,
then `_Up`) where it may be the last projection of a gradient-checkpointed block (`last_in_block`).

With input rows x (M x a), frozen base weight W (b x a) and bias c, the factors are packed once per call
into one thin pair, zero-padded to R ranks (n = r-k+Lk rounded up to a power of two >= 16), with D and the
dropout scale s = 1/(1-p) folded into C (p as the mask has it: `dropout.effective_p`):

    A = [A_p ; A_s ; 0]                (R x a)
    C = s [B_p D_p   B_s D_s   0]      (b x R)

and, with the dropout keep-mask m (`dropout.py`: a hash of seed, row and column, never stored):

    u  = (m * x) A^T                   (M x R, float32)                  `_Down`: saves x and u
    y  = x W^T + c + u C^T             (u C^T + c written first, then     `_Up`: saves nothing token-sized
                                        cuBLAS adds x W^T into it: beta=1) (`_Fused`: both, saves x and u)

Backward, with g = dL/dy:

    gu = g C                           dL/dC = g^T u      dL/dB = s dL/dC D      dL/dD = s sum_b(dL/dC * B)
    dL/dA = gu^T (m * x)               dL/dx = g W + m * (gu A)   (m * (gu A) written first, then += g W)

all computed by `_Fused`'s backward, or by `_Up`'s, which reads x and u from the `_Down` node of the same call.
Two nodes for a block's last projection so that gradient checkpointing recomputes no more base GEMMs than for the
frozen model (see `_Down`), one elsewhere for less host time (`_Fused`); the base GEMMs
adding into the adapter's term (`set_base_gemm_adds`) spares the adapter's kernels a read and a write of y and
dL/dx, at no measured cost to the GEMMs (cuBLAS picks the same kernels with beta = 1).

Every pass over a token-sized tensor (x, y, g, dL/dx) is one read (or read and write) and happens once:
the thin products, the mask and the update are fused (`kernels.py`, Triton, on CUDA). Folding D and s into
C removes every elementwise pass over the tokens; dL/dD is a reduction over b. Saved for backward: x
(alive in the caller anyway) and the thin u; never the dropped input or the mask. Under non-reentrant gradient
checkpointing the forward also keeps u (in x's dtype) past the checkpoint, and the recomputation takes it instead
of reading x again (`_keep_u`; ~1% more peak memory on the Llama-3.1-8B shape, 20 ms less a 16384-token step).
The packed factors are rebuilt from the parameters by every forward and again by the backward (one small launch
each), so they are
never stale (FSDP and DeepSpeed re-gather parameters into reused storage) and never held across a
checkpointed region; a backward that directly follows its layer's checkpointed recomputation takes that
recomputation's pack when the factors are the same tensors with unchanged version counters (`_stash_pack`).

Backends, chosen per call (`kernel_backend`): "triton" (CUDA with Triton installed, for r-k+Lk <= 128: the
default there), "cublas" (CUDA otherwise: the same algebra through PyTorch ops and cuBLAS, with torch's own
Bernoulli dropout mask drawn from a seeded generator, stored for the multiply and drawn again in backward) and
"torch" (the same ops with the hash mask of the Triton kernels: any device; the CPU's fused path, and the twin
the kernels are tested against). `set_fused_backend(True/False)` turns the fused path on or off (off: the
layer's plain reference path; the default is on with CUDA, or RASA_LORA_FUSED=1/0);
`set_kernel_backend(name or None)` forces a backend (tests; RASA_LORA_KERNELS).
The base weight is frozen (no dL/dW); a trainable base weight or bias takes the layer's reference path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref

import torch
import torch.nn.functional as F

from rasa_lora.ops import dropout as _dropout

_KERNELS: str | None = None
_GENERATORS: dict[torch.device, torch.Generator] = {}


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment switch: "0", "false", "False" or "" turn it off, any other value on; unset: default."""
    value = os.environ.get(name)
    return default if value is None else value not in ("0", "false", "False", "")


class _Switch:
    """A boolean setting: the value its setter forced, else the environment variable `env` if set, else
    `default()`; the environment is read once (the getters run on every forward)."""

    __slots__ = ("env", "default", "forced", "from_env")

    def __init__(self, env: str, default) -> None:
        self.env, self.default = env, default
        self.forced: bool | None = None
        self.from_env: bool | None = None

    def __call__(self) -> bool:
        if self.forced is not None:
            return self.forced
        if self.from_env is None:
            self.from_env = env_flag(self.env, self.default())
        return self.from_env


_FUSED = _Switch("RASA_LORA_FUSED", torch.cuda.is_available)
_GEMM_ADDS = _Switch("RASA_LORA_GEMM_ADDS", lambda: True)
_KEEP_U = _Switch("RASA_LORA_KEEP_U", lambda: True)


def set_fused_backend(enabled: bool | None) -> None:
    """Force the fused path on or off; `None` restores the default (on with CUDA, or RASA_LORA_FUSED=1/0)."""
    _FUSED.forced = enabled


def fused_backend_enabled() -> bool:
    return _FUSED()


def set_base_gemm_adds(enabled: bool | None) -> None:
    """Triton backend: whether the base GEMMs add their product into the adapter's term (cuBLAS with beta = 1:
    y = u C^T + c written first, then y += x W^T; dL/dx = m * (gu A) first, then += g W), instead of the adapter's
    kernels reading and writing the base GEMMs' outputs once more. `None`: the default (RASA_LORA_GEMM_ADDS=1/0,
    else on)."""
    _GEMM_ADDS.forced = enabled


def base_gemm_adds() -> bool:
    return _GEMM_ADDS()


def set_keep_u(enabled: bool | None) -> None:
    """Whether a forward run under (non-reentrant) gradient checkpointing keeps its thin u = (m * x) A^T, in x's
    dtype, for the recomputation to take instead of reading x again (see `_keep_u`). `None`: the default
    (RASA_LORA_KEEP_U=1/0, else on)."""
    _KEEP_U.forced = enabled


def keep_u() -> bool:
    return _KEEP_U()


_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _checkpointing() -> bool:
    """Whether this runs inside a region of torch.utils.checkpoint's non-reentrant gradient checkpointing (its
    first forward or its recomputation): the innermost saved-tensor hooks are checkpoint's."""
    hooks = _TOP_HOOKS(False) if _TOP_HOOKS is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


BACKENDS = ("triton", "torch", "cublas")
TRITON_MAX_RANKS = 128  # widest packed rank count R for which the Triton kernels are the default (see below)


def set_kernel_backend(name: str | None) -> None:
    """Force the fused path's backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch", "cublas" or None
    (auto: see `kernel_backend`)."""
    if name not in (None, *BACKENDS):
        raise ValueError(f"unknown kernel backend {name!r}: use one of {BACKENDS} or None")
    global _KERNELS
    _KERNELS = name


def kernel_backend(x: torch.Tensor, ranks: int = 0) -> str:
    """The backend the fused path uses for input x and n = `ranks` (r-k+Lk) adapter ranks.

    Auto: on CUDA, "triton" when triton is installed and the packed width R (n rounded up to a power of two,
    >= 16) is at most TRITON_MAX_RANKS, else "cublas"; elsewhere "torch". Why: on one H200 (Llama-3.1-8B shape,
    2026-11-29, `benchmarks/RESULTS.md`, session 3) the Triton kernels, launched through their cache, ran
    r=8 k=1 (R=64) and r=16 k=2 (R=128) steps faster than the cuBLAS path (r16: 1.43x / 1.35x the frozen base
    at 4096 / 16384 tokens against 1.84x / 1.39x), while their launch shapes, tuned for R=64, left r=32 k=4
    (R=256) slower than it (2.27x / 2.07x against 1.81x / 1.40x).
    """
    name = _KERNELS or _kernels_env()
    if name == "triton":
        from rasa_lora.ops import kernels

        if not kernels.available():
            raise RuntimeError("the Triton kernel backend was asked for but triton is not installed; "
                               "`pip install triton` or use set_kernel_backend('torch')")
        return "triton"
    if name in ("torch", "cublas"):
        return name
    if not x.is_cuda:
        return "torch"
    return _cuda_default(ranks)


@functools.cache
def _cuda_default(ranks: int) -> str:
    from rasa_lora.ops import kernels

    return "triton" if kernels.available() and kernels.packed_width(ranks) <= TRITON_MAX_RANKS else "cublas"


@functools.cache
def _kernels_env() -> str | None:
    return os.environ.get("RASA_LORA_KERNELS")


def dropout_mask(x: torch.Tensor, p: float, seed: int, backend: str = "triton") -> torch.Tensor:
    """The keep-mask (bool, shape of x) that `rasa_linear` uses for dropout probability p and this seed.

    "triton" and "torch" draw the hash mask of `dropout.py` (p rounded to 2**-16: `dropout.effective_p`);
    "cublas" draws torch's Bernoulli (Philox) mask from a generator seeded with `seed`, with p exact.
    """
    if backend == "cublas":
        # One generator per device, re-seeded per call: creating a CUDA generator on every call cost ~0.2 ms of
        # host time each (SmolLM2 step on one H200, 2026-11-29).
        generator = _GENERATORS.get(x.device)
        if generator is None:
            generator = _GENERATORS[x.device] = torch.Generator(device=x.device)
        generator.manual_seed(seed)
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)
    return _dropout.dropout_mask(x, p, seed)


def dropout_scale(p: float, backend: str) -> float:
    """1 / (1 - p), with p as the backend's mask has it."""
    return 1.0 / (1.0 - (p if backend == "cublas" else _dropout.effective_p(p)))


# --- the PyTorch backends ("torch", "cublas"): the same stages as kernels.py ----------------------------------
def _pack_torch(A_p, B_p, D, A_s, B_s, dtype, scale, width):
    num_private, num_shared = A_p.shape[0], A_s.shape[0]
    n = num_private + num_shared
    with torch.no_grad():
        A = A_p.new_zeros((width, A_p.shape[1]), dtype=dtype)
        A[:num_private] = A_p
        A[num_private:n] = A_s
        C = B_p.new_zeros((B_p.shape[0], width), dtype=dtype)
        C[:, :num_private] = B_p * (D[:num_private] * scale)
        C[:, num_private:n] = B_s * (D[num_private:] * scale)
    return A, C


def _keep(rows: torch.Tensor, p: float, seed: int, backend: str) -> torch.Tensor | None:
    return dropout_mask(rows, p, seed, backend) if p > 0 else None


def _on_device(t: torch.Tensor):
    """Make t's GPU the current device while Triton launches (it launches on the current device; a model spread
    over several GPUs in one process, `device_map="auto"`, has layers on the others)."""
    index = t.get_device()
    if index < 0 or index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


# Packs made by a gradient-checkpointing recomputation, for the backward that follows it (see `_stash_pack`).
_RECOMPUTED_PACKS: dict[int, tuple] = {}
_MAX_STASHED = 512


def _stash_pack(factors: tuple, scale: float, dtype, backend: str, A, C) -> None:
    """Keep the packed (A, C) of a forward that runs inside a backward pass (a checkpointed recomputation), so the
    backward of the same layer, which follows, uses them instead of packing again (a launch and two allocations
    less a layer and step). Keyed by the factor tensors themselves and their version counters: a factor changed
    in place, another scale, dtype or backend, and the backward packs afresh. A forward outside backward passes
    stashes nothing (its pack would be held across the whole step, ~10 MB a layer on the Llama-3.1-8B shape);
    the backward pops what it finds, so at most a block's worth is held."""
    if len(_RECOMPUTED_PACKS) >= _MAX_STASHED:  # stashes nobody took (a recomputation without a backward)
        _RECOMPUTED_PACKS.clear()
    _RECOMPUTED_PACKS[id(factors[0])] = (factors, _versions(factors), scale, dtype, backend, A, C)


def _take_pack(factors: tuple, scale: float, dtype, backend: str):
    """(A, C) stashed for exactly these factors (same tensors, unchanged), scale, dtype and backend, or None."""
    entry = _RECOMPUTED_PACKS.pop(id(factors[0]), None)
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
    """A forward's u, held by its autograd node (`ctx.kept`) until the recomputation takes it (`_take_u`)."""

    __slots__ = ("u", "__weakref__")

    def __init__(self, u):
        self.u = u


# u of the forwards run under gradient checkpointing, by (id(A_p), seed), for their recomputations (`_keep_u`)
_KEPT_U: dict[tuple, tuple] = {}


def _keep_u(ctx, factors: tuple, seed: int, scale: float, backend: str, rows, u) -> torch.Tensor:
    """Keep u (in x's dtype) of a forward running under non-reentrant gradient checkpointing, so its recomputation
    takes it instead of computing it again: one read of x (and, with dropout, one drawing of the mask) less a layer
    and step. The checkpoint discards and recomputes what the node saves; u lives on here, at x's dtype (for bf16
    inputs what every consumer of u reads anyway: the kernels round it to x's dtype before their products, so the
    results are the same bits), at R / a of x's size (~1.1% of the peak memory of a 16384-token step on the
    Llama-3.1-8B shape at r=8 k=1; `set_keep_u(False)` turns it off).

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
        entry = _KEPT_U.get(key)
        if entry is not None and entry[0] is ref:
            del _KEPT_U[key]

    _KEPT_U[key] = (weakref.ref(kept, forget), factors, _versions(factors), rows.shape[0], rows.dtype, scale, backend)
    return u


def _take_u(factors: tuple, seed: int, scale: float, backend: str, rows):
    """The u kept by `_keep_u` for this call (and released from its forward's node), or None."""
    entry = _KEPT_U.pop((id(factors[0]), seed), None)
    if entry is None:
        return None
    ref, kept_factors, versions, M, dtype, kept_scale, kept_backend = entry
    kept = ref()
    if (kept is None or kept.u is None or M != rows.shape[0] or dtype != rows.dtype or kept_scale != scale
            or kept_backend != backend or not _unchanged(kept_factors, versions, factors)):
        return None
    u, kept.u = kept.u, None
    return u


def _down(ctx, rows, A_p, B_p, D, A_s, B_s, p, seed, backend, scale):
    """u = (m * x) A^T and the packed C (and, for "triton", the mask's (seed hash, threshold)); a checkpointed
    recomputation takes the u its forward kept (`_keep_u`) instead."""
    factors = (A_p, B_p, D, A_s, B_s)
    recomputing = torch._C._current_graph_task_id() != -1  # inside a backward pass: a checkpointed recomputation
    u = _take_u(factors, seed, scale, backend, rows) if recomputing and _KEPT_U else None
    if backend == "triton":
        from rasa_lora.ops import kernels

        hashed = (_dropout.seed_hash(seed), _dropout.threshold(p))
        with _on_device(rows):
            if u is None:
                u, A, C = kernels.down_and_pack(rows, A_p, B_p, D, A_s, B_s, scale, *hashed, p > 0)
            else:
                A, C = kernels.pack(A_p, B_p, D, A_s, B_s, rows.dtype, scale)
    else:
        from rasa_lora.ops.kernels import packed_width

        # "cublas": n rounded up to 8 (cuBLAS's fast widths); "torch": the Triton kernels' packed width
        num_ranks = A_p.shape[0] + A_s.shape[0]
        width = (num_ranks + 7) // 8 * 8 if backend == "cublas" else packed_width(num_ranks)
        A, C = _pack_torch(A_p, B_p, D, A_s, B_s, rows.dtype, scale, width)
        if u is None:
            keep = _keep(rows, p, seed, backend)
            u = ((rows * keep if keep is not None else rows) @ A.t()).float()
        hashed = None
    if recomputing:
        _stash_pack(factors, scale, rows.dtype, backend, A, C)
    elif keep_u() and _checkpointing():
        # the forward goes on with the kept u as well: checkpointing checks that the recomputation saves tensors of
        # the same dtype, and every consumer rounds u to x's dtype anyway
        u = _keep_u(ctx, factors, seed, scale, backend, rows, u)
    return u, C, hashed


def _up(rows, u, C, weight, bias, backend, gemm_adds):
    """y = x W^T + c + u C^T."""
    dtype = rows.dtype
    w = weight if weight.dtype == dtype else weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if backend == "triton":
        from rasa_lora.ops import kernels

        with _on_device(rows):
            if gemm_adds:  # y = u C^T + c first, then the base GEMM adds x W^T into it (beta = 1)
                y = rows.new_empty((rows.shape[0], w.shape[0]))
                kernels.up_(y, u, C, accumulate=False, bias=bias)
                y.addmm_(rows, w.t())
            else:
                y = F.linear(rows, w, bias)
                kernels.up_(y, u, C)
        return y
    y = F.linear(rows, w, bias)
    return y.addmm_(u.to(dtype), C.t())


class _Fused(torch.autograd.Function):
    """The layer as one autograd node: u = (m * x) A^T, y = x W^T + c + u C^T; saves x and u.

    For every projection but the last one of a gradient-checkpointed block (see `_Down`): their outputs are
    recomputed anyway, and one node costs less host time than two (one `Function.apply` per forward and no
    second backward call)."""

    @staticmethod
    def forward(ctx, rows, A_p, B_p, D, A_s, B_s, options: tuple):
        weight, bias, p, seed, backend, scale, gemm_adds = options
        ctx.set_materialize_grads(False)
        u, C, hashed = _down(ctx, rows, A_p, B_p, D, A_s, B_s, p, seed, backend, scale)
        y = _up(rows, u, C, weight, bias, backend, gemm_adds)
        ctx.save_for_backward(rows, u)
        ctx.state = (weight, (A_p, B_p, D, A_s, B_s), p, seed, scale, backend, gemm_adds, hashed)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        rows, u = ctx.saved_tensors
        return (*_backward(ctx.state, rows, u, grad_out, ctx.needs_input_grad[0]), None)


class _Down(torch.autograd.Function):
    """First of two nodes (`_Down`, `_Up`), for a projection that may be the last of a gradient-checkpointed
    block: u = (m * x) A^T, with the factors packed (C). It is the node that saves what the backward needs,
    (x, u), and does nothing in backward: `_Up`'s backward computes every gradient, reading these saved tensors
    through the link it keeps to this node.

    Why two nodes there: gradient checkpointing (non-reentrant, with early stop, PyTorch's default) recomputes a
    block only until every tensor saved in it exists again. A frozen base layer saves nothing token-sized, so for
    the last projection of a Llama block (down_proj) the frozen model never recomputes its forward GEMM. If the
    adapter saved x in the node that also runs the base GEMM, the recomputation would run that GEMM as well (one
    of the largest of the block: +17 / +79 ms a step at 4096 / 16384 tokens on the Llama-3.1-8B shape, one H200,
    `benchmarks/RESULTS.md` session 4). With the saving node first, the recomputation stops right after it.
    """

    @staticmethod
    def forward(ctx, rows, A_p, B_p, D, A_s, B_s, options: tuple):
        # options: what autograd need not track, in one argument (fewer for Function.apply to inspect):
        # (p, seed, backend, scale, link); this node appends itself to link for `_Up`
        p, seed, backend, scale, link = options
        ctx.set_materialize_grads(False)
        link.append(ctx)
        u, C, ctx.hash = _down(ctx, rows, A_p, B_p, D, A_s, B_s, p, seed, backend, scale)  # `_Up`'s backward reads hash
        # Only the token-sized tensors go through save_for_backward (gradient checkpointing frees and recomputes
        # those). The packed A and C are not kept: the backward packs them again in one small launch (or takes
        # a checkpointed recomputation's pack, `_stash_pack`), cheaper on the host than the two pack/unpack hook
        # pairs gradient checkpointing runs per saved tensor (`benchmarks/host_overhead.py`), and keeping them
        # across the checkpointed region would cost ~10 MB a layer on the Llama-3.1-8B shape.
        ctx.save_for_backward(rows, u)
        ctx.mark_non_differentiable(C)
        return u, C

    @staticmethod
    def backward(ctx, grad_u, grad_c):  # every gradient comes from _Up.backward
        return (None,) * 7


class _Up(torch.autograd.Function):
    """Second of the two nodes: y = x W^T + c + u C^T. Saves nothing token-sized; its backward reads x and u from
    the `_Down` node of the same call and returns every gradient (of x, of the five factors)."""

    @staticmethod
    def forward(ctx, rows, u, A_p, B_p, D, A_s, B_s, options: tuple):
        C, weight, bias, p, seed, backend, scale, gemm_adds, link = options  # C: _Down's (non-differentiable) C
        y = _up(rows, u, C, weight, bias, backend, gemm_adds)
        ctx.down = link[0]  # the _Down node (its ctx): x and u are read from its saved tensors in backward
        ctx.state = (weight, (A_p, B_p, D, A_s, B_s), p, seed, scale, backend, gemm_adds, None)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        down = ctx.down
        rows, u = down.saved_tensors
        state = ctx.state[:-1] + (down.hash,)
        grad_x, *grads = _backward(state, rows, u, grad_out, ctx.needs_input_grad[0])
        return (grad_x, None, *grads, None)


def _aligned(size: int) -> int:
    """`size` float32 elements rounded up to a multiple of 16 bytes."""
    return -(-size // 4) * 4


def _workspaces(device, M: int, K: int, N: int, NP: int, NS: int, R: int, dtype) -> tuple:
    """The Triton backward's zeroed float32 gradients and temporaries, views of two allocations: (dA_p (NP, K),
    dB_p (N, NP), dD (n,)) from one, (gu (M, R), dC (N, R), dA_s (NS, K), dB_s (N, NS), gu in x's dtype (M, R), or
    None for float32 x) from the other. Every part starts 16-byte aligned, as the launch cache needs (`kernels`)."""
    key = (M, K, N, NP, NS, R, dtype)
    plan = _WORKSPACE_PLANS.get(key)
    if plan is None:
        from rasa_lora.ops import kernels

        # one per token count met: bounded as the kernels' launch plans are
        plan = kernels.remember(_WORKSPACE_PLANS, key, _workspace_plan(*key))
    (size1, own), (size2, temporaries), half = plan
    first = torch.zeros(size1, dtype=torch.float32, device=device)
    second = torch.zeros(size2, dtype=torch.float32, device=device)
    views = [first.as_strided(*spec) for spec in own] + [second.as_strided(*spec) for spec in temporaries]
    if half is None:
        return (*views, None)
    offset, count = half  # float32 elements holding the (M, R) half-precision copy of gu
    return (*views, second[offset:offset + count].view(dtype).view(M, R))


_WORKSPACE_PLANS: dict = {}


def _workspace_plan(M, K, N, NP, NS, R, dtype):
    """(size, [(shape, stride, offset), ...]) of each workspace (see `_workspaces`), offsets 16-byte aligned."""

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


def _backward(state, rows, u, grad_out, needs_grad_x: bool):
    """(dL/dx, dL/dA_p, dL/dB_p, dL/dD, dL/dA_s, dL/dB_s) of one call, from its saved x and u."""
    weight, (A_p, B_p, D, A_s, B_s), p, seed, scale, backend, gemm_adds, hashed = state
    if grad_out is None:  # no gradient reached this output
        return (None,) * 6
    num_private, n = A_p.shape[0], D.shape[0]
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    M, K = rows.shape
    N, R = weight.shape[0], u.shape[1]
    grad_x = None
    if needs_grad_x:
        # with gemm_adds the adapter's term is written first and the GEMM adds g W into it (beta = 1)
        if weight.dtype != g.dtype:
            weight = weight.to(g.dtype)
        grad_x = g.new_empty((M, K)) if gemm_adds else g @ weight

    if backend == "triton":
        from rasa_lora.ops import kernels

        with _on_device(rows):  # Triton launches on the current device, torch ops on their tensors'
            packed = _take_pack((A_p, B_p, D, A_s, B_s), scale, rows.dtype, backend)
            A, C = packed if packed is not None else kernels.pack(A_p, B_p, D, A_s, B_s, rows.dtype, scale)
            # Two zeroed float32 workspaces (`_workspaces`): the layer's own gradients (dA_p, dB_p, dD) in one,
            # which autograd keeps as the parameters' .grad, views and all, so it holds nothing else; the
            # temporaries gu (M, R), dC (N, R) and gu in x's dtype with the pool's dA_s and dB_s in the other (of
            # which the pool's .grad keeps at most one layer's workspace: the first to reach it; the others are
            # added into it).
            grad_A_p, grad_B_p, grad_D, gu, gc, grad_A_s, grad_B_s, gu16 = _workspaces(
                g.device, M, K, N, num_private, A_s.shape[0], R, rows.dtype)
            kernels.bwd_up(g, C, u, gu, gc, n)
            kernels.bwd_down(rows, gu, A, grad_x, grad_A_p, grad_A_s, gc, B_p, B_s, D, grad_D, grad_B_p, grad_B_s,
                             scale, *hashed, p > 0, accumulate=not gemm_adds, gu16=gu16)
        if grad_x is not None and gemm_adds:
            grad_x.addmm_(g, weight)
    else:
        dtype = g.dtype
        packed = _take_pack((A_p, B_p, D, A_s, B_s), scale, rows.dtype, backend) if dtype == rows.dtype else None
        A, C = packed if packed is not None else _pack_torch(A_p, B_p, D, A_s, B_s, dtype, scale, R)
        gu = (g @ C).float()
        gc = (g.t() @ u.to(dtype)).float()
        keep = _keep(rows, p, seed, backend)
        kept = rows * keep if keep is not None else rows
        ga = (gu.to(dtype).t() @ kept).float()
        if grad_x is not None:
            if keep is not None:
                grad_x.addcmul_(gu.to(dtype) @ A, keep)
            else:
                grad_x.addmm_(gu.to(dtype), A)
        gc = gc[:, :n] * scale
        grad_B = gc * D.float()
        grad_D = (gc * torch.cat([B_p, B_s], dim=1).float()).sum(0)
        grad_B_p, grad_B_s = grad_B[:, :num_private], grad_B[:, num_private:]
        # dA_p copied out of the (R, K) product: autograd would keep a view, and with it all R rows, as .grad
        grad_A_p, grad_A_s = ga[:num_private].clone(), ga[num_private:n]

    grads = (grad_A_p, grad_B_p, grad_D, grad_A_s, grad_B_s)
    return (grad_x, *(t if t.dtype == f.dtype else t.to(f.dtype) for t, f in zip(grads, (A_p, B_p, D, A_s, B_s))))


def _forward(x, weight, bias, A_p, B_p, D, A_s, B_s, p: float, seed: int, last_in_block: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    backend = kernel_backend(rows, A_p.shape[0] + A_s.shape[0])
    scale = dropout_scale(p, backend)
    gemm_adds = backend == "triton" and base_gemm_adds()
    if backend == "triton" and not (A_p.is_contiguous() and B_p.is_contiguous() and A_s.is_contiguous()
                                    and B_s.is_contiguous() and D.is_contiguous()):
        A_p, B_p, D, A_s, B_s = (t.contiguous() for t in (A_p, B_p, D, A_s, B_s))
    if last_in_block:
        link: list = []
        u, C = _Down.apply(rows, A_p, B_p, D, A_s, B_s, (p, seed, backend, scale, link))
        y = _Up.apply(rows, u, A_p, B_p, D, A_s, B_s, (C, weight, bias, p, seed, backend, scale, gemm_adds, link))
    else:
        y = _Fused.apply(rows, A_p, B_p, D, A_s, B_s, (weight, bias, p, seed, backend, scale, gemm_adds))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def rasa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_p: torch.Tensor,
    B_p: torch.Tensor,
    D: torch.Tensor,
    A_s: torch.Tensor,
    B_s: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int | None = None,
    last_in_block: bool = True,
) -> torch.Tensor:
    """y = x W^T + c + [B_p B_s] diag(D) [A_p ; A_s] dropout(x), computed in x's dtype.

    Args:
        x: (..., a) input.  weight: (b, a) frozen base weight (a transposed view for Conv1D).
        bias: (b,) or None, frozen.  A_p: (r-k, a).  B_p: (b, r-k).  D: (r-k+Lk,).  A_s: (Lk, a).  B_s: (b, Lk).
        The factors may be float32 while x is bf16: they are cast while packing, and their gradients come
        back in their own dtype.
        dropout_p: dropout probability on the adapter's input (0 in eval mode).
        seed: seed of the dropout mask (`dropout_mask(x, dropout_p, seed)`); drawn from torch's default CPU
            generator when None, so gradient checkpointing's recomputation (which restores the RNG state)
            draws the same one.
        last_in_block: whether this call may be the last one saving tensors in a gradient-checkpointed block
            (down_proj in a Llama block). True, the safe default, runs the layer as two autograd nodes so that a
            checkpointed recomputation stops before the base GEMM (see `_Down`); False runs one node, which costs
            less host time but makes such a recomputation run the base GEMM once more when the call was last.
    """
    if not 0.0 <= dropout_p < 1.0 or _dropout.effective_p(dropout_p) >= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is None and (dropout_p > 0 or (keep_u() and _checkpointing())):
        seed = _draw_seed()  # under checkpointing also without dropout: the key of the kept u (`_keep_u`)
    # torch.compile: through `_compiled` (a graph break); eagerly straight to `_forward` (the wrapper costs host time)
    run = _compiled if torch.compiler.is_compiling() else _forward
    return run(x, weight, bias, A_p, B_p, D, A_s, B_s, float(dropout_p), seed or 0, last_in_block)


_SEED = torch.empty((), dtype=torch.int64)


def _draw_seed() -> int:
    """A seed from torch's default CPU generator (which gradient checkpointing saves and restores), drawn into
    one reused scalar: `int(torch.randint(...))` costs twice the host time."""
    return int(_SEED.random_(0, 2**31 - 1))


# torch.compile runs the fused Functions eagerly (a graph break): their launch logic and Triton kernels are
# already what a compiler would produce, and tracing them buys nothing.
_compiled = torch.compiler.disable(_forward)
