r"""The RaSA linear layer (base projection + eq. 5 adapter) as one autograd node (`_Fused`), or as two (`_Down`,
then `_Up`) where it may be the last projection of a gradient-checkpointed block (`last_in_block`).

With input rows x (M x a), frozen base weight W (b x a) and bias c, the factors are packed once per call
into one thin pair, zero-padded to R ranks, with D and the dropout scale s = 1/(1-p) folded into C (p as the
mask has it: `dropout.effective_p`):

    A = [A_p ; A_s ; 0]                (R x a)
    C = s [B_p D_p   B_s D_s   0]      (b x R)

and, with the dropout keep-mask m (`dropout.py`: a hash of seed, row and column, never stored, the same on
every backend and on the layer's reference path):

    u  = (m * x) A^T                   (M x R, float32)                  `_Down`: saves x and u
    y  = x W^T + c + u C^T                                               `_Up`: saves nothing token-sized
                                                                         (`_Fused`: both, saves x and u)
Backward, with g = dL/dy:

    gu = g C                           dL/dC = g^T u      dL/dB = s dL/dC D      dL/dD = s sum_b(dL/dC * B)
    dL/dA = gu^T (m * x)               dL/dx = g W + m * (gu A)

The stages run on a backend object (`backend.py`), chosen once per (device kind, rank count) by `backend_for`.
The packed factors are rebuilt from the parameters by every forward and again by the backward, so they are never
stale (FSDP and DeepSpeed re-gather parameters into reused storage); under checkpointing `recompute.py` lets a
backward take its recomputation's pack, and a recomputation take its forward's u. The base weight is frozen
(no dL/dW); a trainable base weight or bias takes the layer's reference path.
"""

from __future__ import annotations

import torch

# loaded here as before (by `torch.compiler.disable`): without it a layer call costs more host time
# (benchmarks/RESULTS.md, issue 24); transformers and PEFT load it anyway
import torch._dynamo  # noqa: F401

from rasa_lora import settings
from rasa_lora.ops import dropout as _dropout
from rasa_lora.ops import recompute
from rasa_lora.ops.backend import Backend
from rasa_lora.ops.cublas_backend import CublasBackend
from rasa_lora.ops.plans import packed_width
from rasa_lora.ops.torch_backend import TorchBackend

TRITON_MAX_RANKS = 128  # widest packed width R for which Triton is CUDA's default (docs/performance.md, record 1)


def set_fused_backend(enabled: bool | None) -> None:
    """Force the fused path on or off; `None` restores the default (on with CUDA, or RASA_LORA_FUSED=1/0)."""
    settings.FUSED.force(enabled)


def fused_backend_enabled() -> bool:
    return settings.FUSED()


def set_base_gemm_adds(enabled: bool | None) -> None:
    """Triton backend: whether the base GEMMs add their product into the adapter's term (beta = 1) instead of the
    adapter's kernels reading and writing their outputs once more. `None`: RASA_LORA_GEMM_ADDS=1/0, else on."""
    settings.GEMM_ADDS.force(enabled)
    _CHOSEN.clear()


def set_keep_u(enabled: bool | None) -> None:
    """Whether a forward under (non-reentrant) gradient checkpointing keeps its u for the recomputation
    (`recompute.keep_u`). `None`: RASA_LORA_KEEP_U=1/0, else on."""
    settings.KEEP_U.force(enabled)


def set_kernel_backend(name: str | None) -> None:
    """Force the fused path's backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch", "cublas" or None
    (auto: see `backend_for`)."""
    settings.KERNELS.force(name)
    _CHOSEN.clear()


_TORCH, _CUBLAS = TorchBackend(), CublasBackend()
_TRITON: dict[bool, Backend] = {}  # by gemm_adds
_CHOSEN: dict[tuple, Backend] = {}  # (is_cuda, ranks) -> backend; emptied by the setters above


def backend_for(x: torch.Tensor, ranks: int = 0) -> Backend:
    """The backend for input x and n = `ranks` (r-k+Lk) adapter ranks: the one forced (`set_kernel_backend`,
    RASA_LORA_KERNELS), else on CUDA "triton" when triton is installed and the packed width R is at most
    TRITON_MAX_RANKS, else "cublas"; elsewhere "torch"."""
    key = (x.is_cuda, ranks)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _choose(x.is_cuda, ranks)
    return chosen


def _choose(is_cuda: bool, ranks: int) -> Backend:
    name = settings.KERNELS()
    if name is None:
        name = "torch" if not is_cuda else "triton" if _triton() and packed_width(ranks) <= TRITON_MAX_RANKS \
            else "cublas"
    if name != "triton":
        return _CUBLAS if name == "cublas" else _TORCH
    if not _triton():
        raise RuntimeError("the Triton kernel backend was asked for but triton is not installed; "
                           "`pip install triton` or use set_kernel_backend('torch')")
    from rasa_lora.ops.triton_backend import TritonBackend

    gemm_adds = settings.GEMM_ADDS()
    if gemm_adds not in _TRITON:
        _TRITON[gemm_adds] = TritonBackend(gemm_adds)
    return _TRITON[gemm_adds]


def _triton() -> bool:
    from rasa_lora.ops import kernels  # imports triton: only where a choice needs it

    return kernels.available()


def kernel_backend(x: torch.Tensor, ranks: int = 0) -> str:
    return backend_for(x, ranks).name


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask (bool, shape of x) of dropout probability p and this seed: the one every path draws (rows are
    x's leading dims flattened); on CUDA drawn as the cuBLAS backend draws it."""
    if p <= 0:
        return torch.ones_like(x, dtype=torch.bool)
    if isinstance(seed, torch.Tensor):  # a seed on the device (`registered.py`): the PyTorch twin, no host sync
        return _dropout.dropout_mask(x, p, seed)
    return _CUBLAS.keep(x.reshape(-1, x.shape[-1]), p, seed).reshape(x.shape)


dropout_scale = _dropout.scale
_SEED = torch.empty((), dtype=torch.int64)


def mask_seed(p: float) -> int:
    """The seed of a call's dropout mask, drawn from torch's default CPU generator (which gradient checkpointing
    saves and restores, so a recomputation draws the same) when there is a mask or, under checkpointing, a kept
    u to key (`recompute.keep_u`); 0 otherwise. The layer's reference path draws through here too, so both paths
    consume the generator alike."""
    if p > 0 or (settings.KEEP_U() and recompute.checkpointing()):
        return int(_SEED.random_(0, 2**31 - 1))  # into one reused scalar: `int(torch.randint(...))` costs twice
    return 0


# --- the autograd functions -----------------------------------------------------------------------------------
def _down(ctx, rows, factors, mask, seed, backend, scale):
    """u = (m * x) A^T and the packed C; a checkpointed recomputation takes the u its forward kept instead."""
    recomputing = torch._C._current_graph_task_id() != -1  # inside a backward pass: a checkpointed recomputation
    u = recompute.take_u(factors, seed, scale, backend, rows) if recomputing and recompute.KEPT_U else None
    if u is None:
        u, A, C = backend.down(rows, factors, mask, scale)
    else:
        A, C = backend.pack(factors, rows.dtype, scale)
    if recomputing:
        recompute.stash_pack(factors, scale, rows.dtype, backend, A, C)
    elif settings.KEEP_U() and recompute.checkpointing():
        # the forward goes on with the kept u as well: checkpointing checks that the recomputation saves tensors of
        # the same dtype, and every consumer rounds u to x's dtype anyway
        u = recompute.keep_u(ctx, factors, seed, scale, backend, rows, u)
    return u, C


def _up(rows, u, C, weight, bias, backend):
    """y = x W^T + c + u C^T, computed in x's dtype."""
    dtype = rows.dtype
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return backend.up(rows, u, C, weight, bias)


def _backward(state, rows, u, grad_out, needs_grad_x: bool):
    """(dL/dx, dL/dA_p, dL/dB_p, dL/dD, dL/dA_s, dL/dB_s) of one call, from its saved x and u."""
    weight, factors, mask, scale, backend = state
    if grad_out is None:  # no gradient reached this output
        return (None,) * 6
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    if needs_grad_x and weight.dtype != g.dtype:
        weight = weight.to(g.dtype)
    packed = recompute.take_pack(factors, scale, rows.dtype, backend)
    grad_x, *grads = backend.backward(rows, u, g, weight, factors, packed, mask, scale, needs_grad_x)
    return (grad_x, *(t if t.dtype == f.dtype else t.to(f.dtype) for t, f in zip(grads, factors)))


class _Fused(torch.autograd.Function):
    """The layer as one autograd node, saving x and u: for every projection but the last one of a checkpointed
    block (see `_Down`), whose outputs are recomputed anyway; one node costs less host time than two."""

    @staticmethod
    def forward(ctx, rows, A_p, B_p, D, A_s, B_s, options: tuple):
        weight, bias, mask, seed, backend, scale = options
        ctx.set_materialize_grads(False)
        factors = (A_p, B_p, D, A_s, B_s)
        u, C = _down(ctx, rows, factors, mask, seed, backend, scale)
        y = _up(rows, u, C, weight, bias, backend)
        ctx.save_for_backward(rows, u)
        ctx.state = (weight, factors, mask, scale, backend)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        rows, u = ctx.saved_tensors
        return (*_backward(ctx.state, rows, u, grad_out, ctx.needs_input_grad[0]), None)


class _Down(torch.autograd.Function):
    """First of two nodes, for a projection that may be the last of a gradient-checkpointed block: u and C. It
    saves (x, u) and does nothing in backward: `_Up`'s backward computes every gradient from these saved tensors.

    Gradient checkpointing (non-reentrant, with early stop, PyTorch's default) recomputes a block only until every
    tensor saved in it exists again. A frozen base layer saves nothing token-sized, so the frozen model never
    recomputes its block's last GEMM (down_proj in Llama); with the saving node first, the recomputation stops
    right after it, before the base GEMM (docs/performance.md, record 6).
    """

    @staticmethod
    def forward(ctx, rows, A_p, B_p, D, A_s, B_s, options: tuple):
        mask, seed, backend, scale, link = options  # link: a list this node appends itself to, for `_Up`
        ctx.set_materialize_grads(False)
        link.append(ctx)
        u, C = _down(ctx, rows, (A_p, B_p, D, A_s, B_s), mask, seed, backend, scale)
        ctx.save_for_backward(rows, u)  # only the token-sized tensors: the backward packs again (or takes a stash)
        ctx.mark_non_differentiable(C)
        return u, C

    @staticmethod
    def backward(ctx, grad_u, grad_c):  # every gradient comes from _Up.backward
        return (None,) * 7


class _Up(torch.autograd.Function):
    """Second of the two nodes: y = x W^T + c + u C^T. Saves nothing token-sized; its backward reads x and u from
    the `_Down` node of the same call and returns every gradient."""

    @staticmethod
    def forward(ctx, rows, u, A_p, B_p, D, A_s, B_s, options: tuple):
        C, weight, bias, mask, backend, scale, link = options  # C: _Down's (non-differentiable) C
        y = _up(rows, u, C, weight, bias, backend)
        ctx.down = link[0]
        ctx.state = (weight, (A_p, B_p, D, A_s, B_s), mask, scale, backend)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        rows, u = ctx.down.saved_tensors
        grad_x, *grads = _backward(ctx.state, rows, u, grad_out, ctx.needs_input_grad[0])
        return (grad_x, None, *grads, None)


def rasa_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A_p: torch.Tensor,
                B_p: torch.Tensor, D: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor, dropout_p: float = 0.0,
                seed: int | torch.Tensor | None = None, last_in_block: bool = True) -> torch.Tensor:
    """y = x W^T + c + [B_p B_s] diag(D) [A_p ; A_s] dropout(x), computed in x's dtype.

    Args:
        x: (..., a) input.  weight: (b, a) frozen base weight (a transposed view for Conv1D).
        bias: (b,) or None, frozen.  A_p: (r-k, a).  B_p: (b, r-k).  D: (r-k+Lk,).  A_s: (Lk, a).  B_s: (b, Lk).
        The factors may be float32 while x is bf16: they are cast while packing, and their gradients come
        back in their own dtype.
        dropout_p: dropout probability on the adapter's input (0 in eval mode).
        seed: seed of the dropout mask (`dropout_mask(x, dropout_p, seed)`); when None, `mask_seed` draws it from
            torch's default CPU generator (under torch.compile: `torch.randint` on x's device). A one-element tensor
            (int32 on x's device: `dropout.call_seed_tensor`) runs the registered operators of `registered.py`,
            which torch.compile traces and CUDA graphs capture; so does any call under torch.compile.
        last_in_block: whether this call may be the last one saving tensors in a gradient-checkpointed block
            (down_proj in a Llama block). True, the safe default, runs the layer as two autograd nodes so that a
            checkpointed recomputation stops before the base GEMM (see `_Down`); False runs one node, which costs
            less host time but makes such a recomputation run the base GEMM once more when the call was last.
    """
    if not 0.0 <= dropout_p < 1.0 or _dropout.effective_p(dropout_p) >= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if isinstance(seed, torch.Tensor) or torch.compiler.is_compiling():
        # the registered operator (registered when `rasa_lora.ops` loads): traced by torch.compile, the seed a tensor
        y, _ = torch.ops.rasa_lora.linear(rows, weight, bias, A_p, B_p, D, A_s, B_s,
                                          _seed_tensor(seed, dropout_p, x.device), float(dropout_p))
        return y.reshape(*x.shape[:-1], y.shape[-1])
    p = float(dropout_p)
    if seed is None:
        seed = mask_seed(p)
    backend = backend_for(rows, A_p.shape[0] + A_s.shape[0])
    scale = _dropout.scale(p)
    mask = backend.mask_args(p, seed)
    A_p, B_p, D, A_s, B_s = backend.prepare((A_p, B_p, D, A_s, B_s))
    if last_in_block:
        link: list = []
        u, C = _Down.apply(rows, A_p, B_p, D, A_s, B_s, (mask, seed, backend, scale, link))
        y = _Up.apply(rows, u, A_p, B_p, D, A_s, B_s, (C, weight, bias, mask, backend, scale, link))
    else:
        y = _Fused.apply(rows, A_p, B_p, D, A_s, B_s, (weight, bias, mask, seed, backend, scale))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _seed_tensor(seed, p: float, device) -> torch.Tensor:
    """The mask seed as a one-element int32 tensor on `device` (`dropout.SEED_DTYPE`; the mask uses a seed's low 32
    bits): a tensor as given, an int wrapped, None drawn on the device (`torch.randint`: under a compiled or captured
    graph a fresh draw each replay, from torch's generator)."""
    dtype = _dropout.SEED_DTYPE
    if isinstance(seed, torch.Tensor):
        if seed.dtype != dtype:
            seed = _dropout.seed_as_int32(seed.long()).to(dtype)
        return seed.reshape(1).to(device=device)
    if seed is not None:
        return torch.full((1,), _dropout.seed_as_int32(int(seed)), dtype=dtype, device=device)
    if p > 0:
        return torch.randint(0, 2**31 - 1, (1,), dtype=dtype, device=device)
    return torch.zeros(1, dtype=dtype, device=device)
