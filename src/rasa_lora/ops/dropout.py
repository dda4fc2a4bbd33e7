r"""The adapter's dropout mask: a counter-based hash of (seed, row, column), never stored.

The fused path drops adapter-input elements with probability p, keeping element (i, j) of the (M, a) input
rows when

    h(i, j) = mix(mix(i + mix(seed)) ^ (j * 0x61C88647))   >=   round(p * 2**32)

with `mix` a two-multiply 32-bit integer hash (constants from C. Wellons' hash-prospector, bias ~0.11; every
step is a bijection of 32-bit words). Each keep decision is a pure function of (seed, i, j), so the forward
pass, gradient checkpointing's recomputed forward and the backward pass draw the same mask without saving it,
and the Triton kernels (`kernels.py`) draw it inside their products in registers: about ten integer
operations an element, where Philox (`tl.rand`, torch's dropout) costs several times that and a stored mask
costs a pass over memory.

This is a hash, not a cryptographic or Philox stream; what dropout needs from it is tested in
`tests/ops/test_dropout_mask.py`: the keep rate, independence of neighbouring rows and columns, and of seeds.
`keep_mask` below is the PyTorch twin of the kernels' `_keep` (bit-identical; tested on the GPU).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
M1, M2, COLUMN = 0x21F0AAAD, 0x735A2D97, 0x61C88647  # all below 2**31, so Triton keeps them 32-bit


def mix32(v: int) -> int:
    """The 32-bit mix on a Python int (host side, for the seed)."""
    v &= MASK32
    v ^= v >> 16
    v = (v * M1) & MASK32
    v ^= v >> 15
    v = (v * M2) & MASK32
    v ^= v >> 15
    return v


def _mix_tensor(v: torch.Tensor) -> torch.Tensor:
    """The same mix on an int64 tensor holding 32-bit values (products wrap; the low 32 bits are kept)."""
    v = v ^ (v >> 16)
    v = (v * M1) & MASK32
    v = v ^ (v >> 15)
    v = (v * M2) & MASK32
    return v ^ (v >> 15)


def threshold(p: float) -> int:
    """The 32-bit threshold below which an element is dropped."""
    return min(int(round(p * 2**32)), MASK32)


def seed_hash(seed: int) -> int:
    """mix(seed), as the signed 32-bit int the kernels take."""
    h = mix32(seed)
    return h - 2**32 if h >= 2**31 else h


def keep_mask(rows: int, cols: int, seed: int, p: float, device=None, row_offset: int = 0) -> torch.Tensor:
    """The (rows, cols) bool keep-mask of dropout probability p for this seed (True = kept)."""
    r = torch.arange(row_offset, row_offset + rows, device=device, dtype=torch.int64)
    c = torch.arange(cols, device=device, dtype=torch.int64)
    hr = _mix_tensor((r + mix32(seed)) & MASK32)
    hc = (c * COLUMN) & MASK32
    return _mix_tensor(hr[:, None] ^ hc[None, :]) >= threshold(p)


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask (bool, shape of x) that `rasa_linear` uses on input x: rows are x's leading dims flattened."""
    cols = x.shape[-1]
    rows = x.numel() // max(cols, 1)
    return keep_mask(rows, cols, seed, p, x.device).reshape(x.shape)
