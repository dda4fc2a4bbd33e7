"""Dense references of the baselines' updates, written from the papers' equations with plain loops in float64,
independently of the packages' vectorised code: every forward, merge and gradient is tested against them."""

from __future__ import annotations

import math

import torch


def _groups(features: int, side: int) -> list[int]:
    """Group of each feature when `features` are cut into `side` consecutive groups, the larger ones first."""
    small, larger = divmod(features, side)
    group = []
    for g in range(side):
        group += [g] * (small + 1 if g < larger else small)
    return group


def _rotation(side: int, block: int) -> torch.Tensor:
    """R_g of MoRA's eq. 9: RoPE at position `block` over `side` dimensions, halves rotated against each other."""
    half = side // 2
    R = torch.zeros(side, side, dtype=torch.float64)
    for i in range(half):
        angle = block * 10000 ** (-2 * i / side)
        c, s = math.cos(angle), math.sin(angle)
        R[i, i], R[i, i + half] = c, -s            # out_i = c v_i - s v_{i+h}
        R[i + half, i + half], R[i + half, i] = c, s  # out_{i+h} = c v_{i+h} + s v_i
    return R


def mora_delta(M: torch.Tensor, in_features: int, out_features: int, mora_type: int) -> torch.Tensor:
    """dW (out, in) of MoRA for the square matrix M and a compression/decompression type."""
    M = M.detach().double() if not M.requires_grad else M.double()
    side = M.shape[0]
    if mora_type == 6:
        blocks = -(-in_features // side)
        padded = torch.zeros(blocks * side, in_features, dtype=torch.float64)
        for p in range(blocks * side):
            padded[p, p % in_features] = 1.0
        rows = [M @ _rotation(side, g) @ padded[g * side:(g + 1) * side] for g in range(blocks)]
        stacked = torch.cat(rows)
        return torch.stack([stacked[o % (blocks * side)] for o in range(out_features)])
    C = torch.zeros(side, in_features, dtype=torch.float64)
    if mora_type in (1, 4):
        for p in range(-(-in_features // side) * side):
            C[p % side, p % in_features] += 1.0
    else:
        for feature, group in enumerate(_groups(in_features, side)):
            C[group, feature] += 1.0
    compressed = M @ C
    slots = [o % side for o in range(out_features)] if mora_type in (1, 3) else _groups(out_features, side)
    return torch.stack([compressed[s] for s in slots])
