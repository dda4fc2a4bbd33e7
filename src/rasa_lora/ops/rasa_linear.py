r"""The RaSA linear layer (base projection + eq. 5 adapter) as one autograd Function.

With input x (M x a), frozen base weight W (b x a) and bias c, the layer's factors are packed once per call
into one thin pair, padded with zeros to a multiple of 8 ranks (n = r-k+Lk -> n8):

    A = [A_p ; A_s ; 0]            (n8 x a)      the private and shared down-projections
    C = [B_p D_p   B_s D_s   0]    (b x n8)      the up-projections with the diagonal D folded in

and, with a dropout keep-mask m and scale s = 1/(1-p) (m = 1, s = 1 without dropout):

    u = (m * x) A^T                (M x n8: thin)
    y = x W^T + c + s u C^T        (accumulated into the base output in place, `addmm_`)

Backward, with g = dL/dy and gu = g C (M x n8):

    dL/dC = s g^T u                dL/dB = dL/dC * D          dL/dD = column sums of dL/dC * B   (b x n8: small)
    dL/dA = s gu^T (m * x)         dL/dx = g W + s m * (gu A)

Why pack: each thin GEMM over x costs a full pass over x whatever its width, and widths that are not
multiples of 8 fall back to slow kernels (one H200, M = a = 4096, bf16, 2026-11-29: x A^T took 42 us at
n = 7, 47 us at n = 39 and 22 us at n = 40). One padded GEMM over x replaces two misaligned ones. The
packed factors are small (n8 x a and b x n8) and are rebuilt from the parameters on every call, so they
are never stale (FSDP and DeepSpeed re-gather parameters into reused storage). Folding D into C removes
every elementwise pass over M: dL/dD is a reduction over b, not over the M tokens.

What is saved for backward: x (alive in the caller anyway), the thin u, and the packed factors; not the
dropped input and not the mask: the mask is drawn from a seeded generator and drawn again in backward.
The base weight is frozen (no dL/dW); a trainable base weight or bias takes the reference path of the layer.

Backend: `set_fused_backend(True/False)` (tests flip it); by default the fused path is on where CUDA is
available (or RASA_LORA_FUSED=1) and off on the CPU, where the layer's plain reference path runs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_FUSED: bool | None = None
_TRITON: bool | None = None
_GENERATORS: dict[torch.device, torch.Generator] = {}


def set_fused_backend(enabled: bool | None) -> None:
    """Force the fused path on or off; `None` restores the default (on with CUDA, or RASA_LORA_FUSED=1/0)."""
    global _FUSED
    _FUSED = enabled


def fused_backend_enabled() -> bool:
    if _FUSED is not None:
        return _FUSED
    env = os.environ.get("RASA_LORA_FUSED")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return torch.cuda.is_available()


def set_triton_dropout(enabled: bool | None) -> None:
    """Force the Triton dropout kernels on or off (on also on the CPU, under TRITON_INTERPRET=1); None = auto."""
    global _TRITON
    _TRITON = enabled


def _use_triton(rows: torch.Tensor, p: float) -> bool:
    from rasa_lora.ops import triton_dropout

    if p <= 0 or not triton_dropout.available() or rows.numel() >= triton_dropout.MAX_OFFSET:
        return False
    if _TRITON is not None:
        return _TRITON
    # Off by default: on one H200 (2026-11-29, Llama-3.1-8B shape, dropout 0.05) these untuned kernels won at
    # 16384 tokens a step for r=8 (2071 vs 2236 ms) but lost at 4096 tokens (709 vs 609 ms) and for r=16, 32.
    return rows.is_cuda and os.environ.get("RASA_LORA_TRITON_DROPOUT") == "1"


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask (bool, shape of x) that `rasa_linear` uses for dropout probability p and this seed."""
    # One generator per device, re-seeded per call: creating a CUDA generator on every call cost ~0.2 ms of
    # host time each (SmolLM2 step on one H200, 2026-11-29).
    generator = _GENERATORS.get(x.device)
    if generator is None:
        generator = _GENERATORS[x.device] = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)


def pack_factors(A_p, B_p, D, A_s, B_s, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_p; A_s; 0] (n8 x a) and C = [B_p D_p, B_s D_s, 0] (b x n8) in `dtype`, n8 = r-k+Lk rounded up to 8."""
    num_private, num_shared = A_p.shape[0], A_s.shape[0]
    n = num_private + num_shared
    width = (n + 7) // 8 * 8
    with torch.no_grad():
        A = A_p.new_zeros((width, A_p.shape[1]), dtype=dtype)
        A[:num_private] = A_p
        A[num_private:n] = A_s.to(A.device)
        C = B_p.new_zeros((B_p.shape[0], width), dtype=dtype)
        C[:, :num_private] = B_p * D[:num_private]
        C[:, num_private:n] = B_s.to(C.device) * D[num_private:]
    return A, C


class _RasaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A_p, B_p, D, A_s, B_s, p: float, seed: int):
        dtype = x.dtype
        A, C = pack_factors(A_p, B_p, D, A_s, B_s, dtype)
        rows = x.reshape(-1, x.shape[-1])
        y = F.linear(rows, weight.to(dtype), None if bias is None else bias.to(dtype))
        use_triton = _use_triton(rows, p)
        scale = 1.0 / (1.0 - p)
        if use_triton:
            from rasa_lora.ops import triton_dropout

            u = triton_dropout.dropout_matmul(rows, A, seed, p)
        else:
            kept = rows * dropout_mask(rows, p, seed) if p > 0 else rows
            u = kept @ A.t()
        y.addmm_(u, C.t(), alpha=scale)
        ctx.save_for_backward(x, weight, A, C, u, A_p, B_p, D, A_s, B_s)
        ctx.p, ctx.seed, ctx.scale, ctx.use_triton = p, seed, scale, use_triton
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, C, u, A_p, B_p, D, A_s, B_s = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        num_private, n = A_p.shape[0], A_p.shape[0] + A_s.shape[0]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        gu = g @ C                                                    # (M, n8)
        grad_C = (g.t() @ u).float()[:, :n] * scale                   # (b, n)
        if ctx.use_triton:
            from rasa_lora.ops import triton_dropout

            grad_A = triton_dropout.grad_a(gu, rows, ctx.seed, p)[:n] * scale
        else:
            mask = dropout_mask(rows, p, ctx.seed) if p > 0 else None
            kept = rows * mask if p > 0 else rows
            grad_A = (gu.t() @ kept).float()[:n] * scale              # (n, a)
        B_cat = torch.cat([B_p, B_s.to(B_p.device)], dim=1).float()   # small: (b, n)
        grad_B = grad_C * D.float()
        grad_D = (grad_C * B_cat).sum(0)

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(g.dtype)
            if ctx.use_triton:
                triton_dropout.grad_x_(grad_x, gu, A, ctx.seed, p, scale)
            elif p > 0:
                grad_x.addcmul_(gu @ A, mask, value=scale)
            else:
                grad_x.addmm_(gu, A, alpha=scale)
            grad_x = grad_x.reshape(x.shape)
        return (grad_x, None, None,
                grad_A[:num_private].to(A_p.dtype), grad_B[:, :num_private].to(B_p.dtype), grad_D.to(D.dtype),
                grad_A[num_private:].to(A_s.dtype), grad_B[:, num_private:].to(B_s.dtype), None, None)


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
) -> torch.Tensor:
    """y = x W^T + c + [B_p B_s] diag(D) [A_p ; A_s] dropout(x), computed in x's dtype.

    Args:
        x: (..., a) input.  weight: (b, a) frozen base weight (a transposed view for Conv1D).
        bias: (b,) or None, frozen.  A_p: (r-k, a).  B_p: (b, r-k).  D: (r-k+Lk,).  A_s: (Lk, a).  B_s: (b, Lk).
        The factors may be float32 while x is bf16: they are cast while packing, and their gradients come
        back in their own dtype.
        dropout_p: dropout probability on the adapter's input (0 in eval mode).
        seed: seed of the dropout mask; drawn from torch's default generator when None.
    """
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
    return _RasaLinearFunction.apply(x, weight, bias, A_p, B_p, D, A_s, B_s, float(dropout_p), seed or 0)
