r"""Plain dense reference of RaSA (paper eq. 5), written literally, for tests and checks.

    dW_i = [B~_i  B_S] diag(D_i) [A~_i ; A_S]

Every other path (the adapter layer's reference and fused forward, merging, the analysis) is tested
against these functions. They concatenate the factors and build the dense (b, a) matrix: slow on purpose.
"""

from __future__ import annotations

import torch
from torch import nn


def dense_delta(A_p: torch.Tensor, B_p: torch.Tensor, D: torch.Tensor, A_s: torch.Tensor,
                B_s: torch.Tensor) -> torch.Tensor:
    """dW = [B_p B_s] diag(D) [A_p ; A_s], shape (b, a).

    Args:
        A_p: (r-k, a).  B_p: (b, r-k).  D: (r-k+Lk,).  A_s: (Lk, a).  B_s: (b, Lk).
    """
    B = torch.cat([B_p, B_s], dim=1)
    A = torch.cat([A_p, A_s], dim=0)
    return B @ torch.diag(D) @ A


def layer_delta(layer, adapter_name: str = "default") -> torch.Tensor:
    """dW_i of a `RasaLayer` from its parameters, in the (out, in) layout, float64."""
    f = layer.factors(adapter_name)
    factors = (f["A_p"], f["B_p"], f["D"], f["A_s"], f["B_s"])
    return dense_delta(*(t.detach().double() for t in factors))


def dense_forward(layer, x: torch.Tensor, adapter_name: str = "default",
                  keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """y = x W^T + c + dropout(x) dW^T with the dense dW (keeps autograd, so gradients can be compared).

    `keep_mask` (bool, shape of x) applies dropout with probability `dropout_p` exactly as given.
    """
    base = layer.get_base_layer()
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    f = layer.factors(adapter_name)
    delta = dense_delta(f["A_p"], f["B_p"], f["D"], f["A_s"], f["B_s"])
    dropped = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    return nn.functional.linear(x, weight.to(x.dtype), bias) + dropped @ delta.t().to(x.dtype)


def numerical_rank(matrix: torch.Tensor, rtol: float = 1e-10) -> int:
    """Number of singular values above rtol * the largest (float64)."""
    singular = torch.linalg.svdvals(matrix.double())
    return int((singular > rtol * singular.max()).sum())
