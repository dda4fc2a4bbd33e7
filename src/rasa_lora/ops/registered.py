r"""The fused RaSA linear as registered custom operators (`torch.library.custom_op`), for torch.compile and CUDA
graphs: `rasa_lora::linear` (forward: y and the thin u) and `rasa_lora::linear_backward` (every gradient), each with
a fake (meta) implementation, and the autograd of the first registered to call the second. torch.compile traces a
RaSA model through them with no graph break (the eager autograd Functions of `rasa_linear.py` keep host caches
keyed by tensor identity, which a compiler cannot trace: under compile `rasa_linear` was a graph break at every
layer before these operators).

The operators run the stages of the backend object the eager path would pick (`rasa_linear.backend_for`), so the
numbers are the eager `_Fused` node's. The dropout mask's seed is a one-element int32 tensor (`seed`), on the
device, so a compiled or captured graph can take a seed computed on the device (`dropout.call_seed_tensor`) and
draw a fresh mask at every replay. No backend brings the seed to the host: the "torch" backend (and "cublas" off
CUDA) draws the mask from the tensor with PyTorch ops, the Triton kernels (and the "cublas" backend's mask kernel)
take the tensor's address and read the seed themselves (`kernels._seed_hash`), so a captured launch replays with
whatever seed the device holds then.

What the eager path has and this one has not (yet): the two-node split of a block's last projection and the caches
of `recompute.py` (a checkpointed recomputation's pack and kept u); under torch.compile the partitioner decides what
is saved and what recomputed.
"""

from typing import Optional

import torch
from torch import Tensor

from rasa_lora.ops import dropout as _dropout
from rasa_lora.ops.plans import packed_width


def _backend(rows: Tensor, ranks):
    from rasa_lora.ops.rasa_linear import backend_for

    return backend_for(rows, int(ranks))  # a symbolic rank count (dynamic shapes) is specialized: the backend needs it


def _width(backend, ranks: int) -> int:
    """The packed rank width R of u on this backend."""
    width = getattr(backend, "width", None)
    return width(ranks) if width is not None else packed_width(ranks)


def _mask(backend, p: float, seed: Tensor):
    """The backend's mask arguments for this probability and (device) seed."""
    if p <= 0:
        return backend.mask_args(0.0, 0)
    return backend.mask_args(p, seed)  # every backend reads the seed tensor on the device: no host sync


def _fresh(t: Tensor) -> Tensor:
    """An operator's output may not be a view (of an input, of another output): views are copied (factor-sized).
    A part of a larger storage counts as a view even where `_base` is unset (views made under a dispatch mode)."""
    if t._base is not None or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


@torch.library.custom_op("rasa_lora::linear", mutates_args=())
def linear(rows: Tensor, weight: Tensor, bias: Optional[Tensor], A_p: Tensor, B_p: Tensor, D: Tensor,  # noqa: UP045
           A_s: Tensor, B_s: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(y, u) for input rows x (M, a): y = x W^T + c + u C^T, u = (m * x) A^T (float32, M x R), m the dropout mask of
    probability p and seed `seed` (a one-element int32 tensor)."""
    from rasa_lora.ops.rasa_linear import _up

    factors = (A_p, B_p, D, A_s, B_s)
    backend = _backend(rows, A_p.shape[0] + A_s.shape[0])
    scale = _dropout.scale(p)
    u, _, C = backend.down(rows, backend.prepare(factors), _mask(backend, p, seed), scale)
    return _up(rows, u, C, weight, bias, backend), _fresh(u)


@linear.register_fake
def _linear_fake(rows, weight, bias, A_p, B_p, D, A_s, B_s, seed, p):
    ranks = A_p.shape[0] + A_s.shape[0]
    width = _width(_backend(rows, ranks), ranks)
    return rows.new_empty((rows.shape[0], weight.shape[0])), rows.new_empty((rows.shape[0], width),
                                                                            dtype=torch.float32)


@torch.library.custom_op("rasa_lora::linear_backward", mutates_args=())
def linear_backward(rows: Tensor, u: Tensor, g: Tensor, weight: Tensor, A_p: Tensor, B_p: Tensor, D: Tensor,
                    A_s: Tensor, B_s: Tensor, seed: Tensor, p: float, needs_grad_x: bool) -> list[Tensor]:
    """[dL/dx (an empty tensor when not needed), dL/dA_p, dL/dB_p, dL/dD, dL/dA_s, dL/dB_s] from the saved x and u
    and g = dL/dy; each factor's gradient in its own dtype."""
    factors = (A_p, B_p, D, A_s, B_s)
    backend = _backend(rows, A_p.shape[0] + A_s.shape[0])
    g = g if g.stride(-1) == 1 else g.contiguous()
    if needs_grad_x and weight.dtype != g.dtype:
        weight = weight.to(g.dtype)
    grad_x, *grads = backend.backward(rows, u, g, weight, backend.prepare(factors), None,
                                      _mask(backend, p, seed), _dropout.scale(p), needs_grad_x)
    grads = [_fresh(t if t.dtype == f.dtype else t.to(f.dtype)) for t, f in zip(grads, factors)]
    return [_fresh(grad_x) if grad_x is not None else rows.new_empty((0,)), *grads]


@linear_backward.register_fake
def _linear_backward_fake(rows, u, g, weight, A_p, B_p, D, A_s, B_s, seed, p, needs_grad_x):
    grad_x = rows.new_empty(rows.shape, dtype=g.dtype) if needs_grad_x else rows.new_empty((0,))
    return [grad_x, *(torch.empty_like(f, memory_format=torch.contiguous_format) for f in (A_p, B_p, D, A_s, B_s))]


def _setup_context(ctx, inputs, output) -> None:
    rows, weight, bias, A_p, B_p, D, A_s, B_s, seed, p = inputs
    ctx.save_for_backward(rows, output[1], weight, A_p, B_p, D, A_s, B_s, seed)
    ctx.mark_non_differentiable(output[1])
    ctx.p = p


def _linear_autograd(ctx, grad_y, grad_u):
    rows, u, weight, A_p, B_p, D, A_s, B_s, seed = ctx.saved_tensors
    needs_grad_x = ctx.needs_input_grad[0]
    grad_x, *grads = linear_backward(rows, u, grad_y, weight, A_p, B_p, D, A_s, B_s, seed, ctx.p, needs_grad_x)
    return (grad_x if needs_grad_x else None, None, None, *grads, None, None)


linear.register_autograd(_linear_autograd, setup_context=_setup_context)

