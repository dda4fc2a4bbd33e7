"""What a backend of the fused path does: the stages the autograd functions of `rasa_linear.py` call (the symbols:
its docstring). `factors` is (A_p, B_p, D, A_s, B_s); `mask` what `mask_args(p, seed)` made of the call's dropout
probability and seed (the mask of `dropout.py` on every backend); `scale` 1 / (1 - p) with p as the mask has it.
"""

from __future__ import annotations

import torch


class Backend:
    name: str = ""
    gemm_adds: bool = False  # the base GEMMs add into the adapter's term (beta = 1) instead of the reverse

    def prepare(self, factors: tuple) -> tuple:
        """The factors as this backend takes them (the Triton kernels need them contiguous)."""
        return factors

    def mask_args(self, p: float, seed: int):
        return p, seed

    def pack(self, factors: tuple, dtype: torch.dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, C) in `dtype`."""
        raise NotImplementedError

    def down(self, rows, factors: tuple, mask, scale: float):
        """(u, A, C): u = (m * x) A^T (float32, M x R) and the packed factors."""
        raise NotImplementedError

    def up(self, rows, u, C, weight, bias):
        """y = x W^T + c + u C^T (weight and bias already in x's dtype)."""
        raise NotImplementedError

    def backward(self, rows, u, g, weight, factors: tuple, packed, mask, scale: float, needs_grad_x: bool):
        """(dL/dx or None, dL/dA_p, dL/dB_p, dL/dD, dL/dA_s, dL/dB_s) from the saved x and u and g = dL/dy;
        `packed`: (A, C) of this call made by a checkpointed recomputation, or None."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} backend{' (base GEMMs add)' if self.gemm_adds else ''}>"
