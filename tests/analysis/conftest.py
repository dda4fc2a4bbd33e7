"""Fixtures of the analysis tests: small seeded layer-correlated groups in float64."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.analysis.sources import synthetic_groups


def correlated_group(num_layers: int = 16, b: int = 48, a: int = 40, seed: int = 0, noise: float = 0.5,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(L, b, a) matrices sharing a basis across layers, plus private parts and full-rank noise."""
    group = next(synthetic_groups({"layers.*.proj": (b, a)}, num_layers, seed, shared_rank=24, private_rank=12,
                                  noise=noise, dtype=dtype))
    return group.deltas


@pytest.fixture(scope="module")
def group64() -> torch.Tensor:
    return correlated_group()
