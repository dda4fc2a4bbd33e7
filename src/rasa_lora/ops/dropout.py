r"""The adapter's dropout mask: a counter-based hash of (seed, row, column), never stored.

The fused path drops adapter-input elements with probability p. For row i and the pair of columns
(2q, 2q+1) it draws one 32-bit word

    h(i, q) = mix(mix(i + mix(seed)) ^ (q * 0x61C88647))

and keeps column 2q when the low 16 bits of h are >= t, column 2q+1 when the high 16 bits are, with
t = round(p * 2**16): so p is used rounded to a multiple of 2**-16 (`effective_p`: 0.05 -> 0.0500031), and the
kept values are scaled by 1/(1 - effective_p). `mix` is a two-multiply 32-bit integer hash (constants from
C. Wellons' hash-prospector, bias ~0.11; every step is a bijection of 32-bit words). Each keep decision is a
pure function of (seed, i, column), so the forward pass, gradient checkpointing's recomputed forward and the
backward pass draw the same mask without saving it, and the Triton kernels (`kernels.py`) draw it inside their
products, in registers, for about five integer operations an element: Philox (`tl.rand`, torch's dropout)
costs several times that, a stored mask a pass over memory. On one H200 the first version of the kernels,
with one hash per element, ran the dropout-carrying passes at 1.5-1.9 TB/s against 3.1-3.5 TB/s for the
same-sized pass without a mask (`benchmarks/RESULTS.md`).

This is a hash, not Philox; what dropout needs from it is tested in `tests/ops/test_dropout_mask.py`: the keep
rate, independence of neighbouring rows and columns (also the two halves of one word), and of seeds.
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
    """The 16-bit threshold t: an element is dropped when its 16 hash bits are below t."""
    return min(int(round(p * 2**16)), 2**16)


def effective_p(p: float) -> float:
    """The dropout probability the mask really has: p rounded to a multiple of 2**-16."""
    return threshold(p) / 2**16


def seed_hash(seed: int) -> int:
    """mix(seed), as the signed 32-bit int the kernels take."""
    h = mix32(seed)
    return h - 2**32 if h >= 2**31 else h


def keep_mask(rows: int, cols: int, seed: int, p: float, device=None, row_offset: int = 0) -> torch.Tensor:
    """The (rows, cols) bool keep-mask of dropout probability p for this seed (True = kept)."""
    r = torch.arange(row_offset, row_offset + rows, device=device, dtype=torch.int64)
    c = torch.arange(cols, device=device, dtype=torch.int64)
    hr = _mix_tensor((r + mix32(seed)) & MASK32)
    hc = ((c >> 1) * COLUMN) & MASK32
    word = _mix_tensor(hr[:, None] ^ hc[None, :])
    bits = torch.where((c & 1).bool()[None, :], word >> 16, word & 0xFFFF)
    return bits >= threshold(p)


def dropout_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask (bool, shape of x) that `rasa_linear` uses on input x: rows are x's leading dims flattened."""
    cols = x.shape[-1]
    rows = x.numel() // max(cols, 1)
    return keep_mask(rows, cols, seed, p, x.device).reshape(x.shape)
