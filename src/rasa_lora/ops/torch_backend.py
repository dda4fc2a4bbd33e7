"""The "torch" backend: the fused path's stages as PyTorch ops, on any device (the CPU's fused path, and the twin
the Triton kernels are tested against: same packed width R, same mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rasa_lora.ops import dropout
from rasa_lora.ops.backend import Backend
from rasa_lora.ops.plans import packed_width


class TorchBackend(Backend):
    name = "torch"

    def width(self, n: int) -> int:
        """The packed rank width for n ranks: the Triton kernels' (a power of two >= 16)."""
        return packed_width(n)

    def keep(self, rows: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
        return dropout.dropout_mask(rows, p, seed) if p > 0 else None

    def pack(self, factors, dtype, scale):
        A_p, B_p, D, A_s, B_s = factors
        num_private, num_shared = A_p.shape[0], A_s.shape[0]
        n = num_private + num_shared
        width = self.width(n)
        with torch.no_grad():
            A = A_p.new_zeros((width, A_p.shape[1]), dtype=dtype)
            A[:num_private] = A_p
            A[num_private:n] = A_s
            C = B_p.new_zeros((B_p.shape[0], width), dtype=dtype)
            C[:, :num_private] = B_p * (D[:num_private] * scale)
            C[:, num_private:n] = B_s * (D[num_private:] * scale)
        return A, C

    def down(self, rows, factors, mask, scale):
        A, C = self.pack(factors, rows.dtype, scale)
        keep = self.keep(rows, *mask)
        u = ((rows * keep if keep is not None else rows) @ A.t()).float()
        return u, A, C

    def up(self, rows, u, C, weight, bias):
        y = F.linear(rows, weight, bias)
        return y.addmm_(u.to(rows.dtype), C.t())

    def backward(self, rows, u, g, weight, factors, packed, mask, scale, needs_grad_x):
        A_p, B_p, D, A_s, B_s = factors
        num_private, n = A_p.shape[0], D.shape[0]
        dtype = g.dtype
        A, C = packed if packed is not None and packed[0].dtype == dtype else self.pack(factors, dtype, scale)
        gu = (g @ C).float()
        gc = (g.t() @ u.to(dtype)).float()
        keep = self.keep(rows, *mask)
        kept = rows * keep if keep is not None else rows
        ga = (gu.to(dtype).t() @ kept).float()
        grad_x = None
        if needs_grad_x:
            grad_x = g @ weight
            if keep is not None:
                grad_x.addcmul_(gu.to(dtype) @ A, keep)
            else:
                grad_x.addmm_(gu.to(dtype), A)
        gc = gc[:, :n] * scale
        grad_B = gc * D.float()
        grad_D = (gc * torch.cat([B_p, B_s], dim=1).float()).sum(0)
        # dA_p copied out of the (R, K) product: autograd would keep a view, and with it all R rows, as .grad
        return grad_x, ga[:num_private].clone(), grad_B[:, :num_private], grad_D, ga[num_private:n], \
            grad_B[:, num_private:]
