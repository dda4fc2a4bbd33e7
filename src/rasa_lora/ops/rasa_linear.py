r"""The RaSA linear layer (base projection + eq. 5 adapter) as one autograd Function.

Forward, for input x (M x a), frozen base weight W (b x a) and bias c, private factors A_p ((r-k) x a),
B_p (b x (r-k)), pool A_s (Lk x a), B_s (b x Lk), diagonal D = [D_p ; D_s] and a dropout mask m (scale
s = 1/(1-p), so x_d = s * m * x):

    u_p = x_d A_p^T          u_s = x_d A_s^T            (M x (r-k), M x Lk: thin)
    y   = x W^T + c + (u_p * D_p) B_p^T + (u_s * D_s) B_s^T

The two adapter products are accumulated into the base output in place (`addmm_`), so the adapter costs
no extra M x b pass; the private and shared factors are never concatenated.

Backward, with g = dL/dy (M x b) and the thin products gv_p = g B_p, gv_s = g B_s:

    dL/dB_p = g^T (u_p * D_p)          dL/dB_s = g^T (u_s * D_s)
    dL/dD_p = sum_rows(gv_p * u_p)     dL/dD_s = sum_rows(gv_s * u_s)
    gu_p = gv_p * D_p                  gu_s = gv_s * D_s
    dL/dA_p = gu_p^T x_d               dL/dA_s = gu_s^T x_d
    dL/dx   = g W + s * m * (gu_p A_p + gu_s A_s)

What is saved: x (already alive in the caller), the thin u_p and u_s, and the factors; not x_d and not the
mask. The mask is drawn from a seeded generator and drawn again in backward, so dropout costs no stored
copy of the input. The base weight is frozen (no dL/dW); a trainable base weight or bias takes the
reference path in the layer.

Choice of backend: `set_fused_backend(True/False)` (tests flip it); by default the fused path is on where
CUDA is available and off on the CPU, where the reference path of the layer is used.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_FUSED: bool | None = None


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


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask (bool, shape of x) that `rasa_linear` uses for dropout probability p and this seed."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)


class _RasaLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A_p, B_p, D, A_s, B_s, p: float, seed: int):
        rows = x.reshape(-1, x.shape[-1])
        y = F.linear(rows, weight, bias)
        dropped = rows * dropout_mask(rows, p, seed) * (1.0 / (1.0 - p)) if p > 0 else rows
        num_private = A_p.shape[0]
        D_p, D_s = D[:num_private], D[num_private:]
        u_p = dropped @ A_p.t()
        u_s = dropped @ A_s.t()
        y.addmm_(u_p * D_p, B_p.t())
        y.addmm_(u_s * D_s, B_s.t())
        ctx.save_for_backward(x, weight, A_p, B_p, D, A_s, B_s, u_p, u_s)
        ctx.p, ctx.seed = p, seed
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A_p, B_p, D, A_s, B_s, u_p, u_s = ctx.saved_tensors
        p = ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        num_private = A_p.shape[0]
        D_p, D_s = D[:num_private], D[num_private:]
        gv_p = g @ B_p
        gv_s = g @ B_s
        grad_B_p = g.t() @ (u_p * D_p)
        grad_B_s = g.t() @ (u_s * D_s)
        # Row sums over M tokens: accumulate in float32 (thin tensors, cheap), as bf16 would lose ~1%.
        grad_D = torch.cat([(gv_p.float() * u_p.float()).sum(0), (gv_s.float() * u_s.float()).sum(0)]).to(D.dtype)
        gu_p = gv_p * D_p
        gu_s = gv_s * D_s
        mask = dropout_mask(rows, p, ctx.seed) if p > 0 else None
        dropped = rows * mask * (1.0 / (1.0 - p)) if p > 0 else rows
        grad_A_p = gu_p.t() @ dropped
        grad_A_s = gu_s.t() @ dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if p > 0:
                adapter = gu_p @ A_p
                adapter.addmm_(gu_s, A_s)
                grad_x.addcmul_(adapter, mask, value=1.0 / (1.0 - p))
            else:
                grad_x.addmm_(gu_p, A_p)
                grad_x.addmm_(gu_s, A_s)
            grad_x = grad_x.reshape(x.shape)
        return grad_x, None, None, grad_A_p, grad_B_p, grad_D, grad_A_s, grad_B_s, None, None


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
        dropout_p: dropout probability on the adapter's input (0 in eval mode).
        seed: seed of the dropout mask; drawn from torch's default generator when None.
    """
    dtype = x.dtype
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
    return _RasaLinearFunction.apply(
        x, weight.to(dtype), None if bias is None else bias.to(dtype), A_p.to(dtype), B_p.to(dtype), D.to(dtype),
        A_s.to(dtype), B_s.to(dtype), float(dropout_p), seed or 0,
    )
