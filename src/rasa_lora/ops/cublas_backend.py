"""The "cublas" backend: the "torch" backend's PyTorch ops with the ranks padded to a multiple of 8 (cuBLAS's fast
widths) instead of a power of two, and the mask drawn by the Triton mask kernel where it can run (CUDA with
Triton), by its PyTorch twin elsewhere: the same bits either way. A seed given as a tensor on the device (the
registered operators', `registered.py`) is read there, by the kernel or the twin, never brought to the host. CUDA's
default for packed widths above `rasa_linear.TRITON_MAX_RANKS`, or without Triton (docs/performance.md, record 1)."""

from __future__ import annotations

import torch

from rasa_lora.ops import dropout
from rasa_lora.ops.torch_backend import TorchBackend


class CublasBackend(TorchBackend):
    name = "cublas"

    def width(self, n: int) -> int:
        return (n + 7) // 8 * 8

    def keep(self, rows, p, seed):
        if p <= 0:
            return None
        if rows.is_cuda:
            from rasa_lora.ops import kernels

            if kernels.available():
                from rasa_lora.ops.triton_backend import keep_mask

                if isinstance(seed, torch.Tensor):  # a seed on the device: the kernel reads it (no host sync)
                    return keep_mask(rows.shape[0], rows.shape[1], 0, dropout.threshold(p), rows.device, seed)
                return keep_mask(rows.shape[0], rows.shape[1], dropout.seed_hash(seed), dropout.threshold(p),
                                 rows.device)
        return dropout.dropout_mask(rows, p, seed)  # a seed tensor: the twin draws from it on its device
