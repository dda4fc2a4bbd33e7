"""`benchmarks/moe_grouping.py`: the per-projection pool contains the per-expert pools, so its error is never above."""

from __future__ import annotations

import torch

from tests.benchmark_scripts import load_benchmark


def test_per_projection_error_is_at_most_per_expert_which_is_at_most_lora():
    grouping = load_benchmark("moe_grouping")
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(3, 12, 2, generator=generator, dtype=torch.float64)  # a direction each expert reuses
    M = torch.randn(2, 3, 12, 10, generator=generator, dtype=torch.float64) * 0.1
    M += shared[None, :, :, :1] @ torch.randn(2, 3, 1, 10, generator=generator, dtype=torch.float64)
    row = grouping.compare(M, r=2, k=1, iters=30)
    assert row["per_projection"] <= row["per_expert"] + 1e-9 <= row["lora"] + 2e-9
    assert (row["rank_per_expert"], row["rank_per_projection"]) == (1 + 2, 1 + 6)


def test_arithmetic_batches_are_byte_tokens():
    rows = load_benchmark("moe_grouping").arithmetic_batches(4, 32)
    assert rows.shape == (4, 32) and int(rows.max()) < 256
