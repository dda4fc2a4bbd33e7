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


def correlated_pair(root, num_layers: int = 8, seed: int = 0, scale: float = 0.1):
    """A seeded tiny-Llama base/tuned checkpoint pair whose per-layer deltas share structure: each of the seven
    projection groups gets `synthetic_groups` deltas (a basis shared by the layers, private parts, full-rank
    noise) scaled to `scale` times the base weights' mean norm. Returns (base_dir, tuned_dir)."""
    from rasa_lora.analysis.sources import group_names
    from rasa_lora.models import tiny_llama

    base = tiny_llama(num_layers=num_layers, seed=seed)
    base.save_pretrained(root / "base")
    parameters = dict(base.named_parameters())
    modules = [name.removesuffix(".weight") for name, p in parameters.items() if p.ndim == 2 and ".layers." in name]
    with torch.no_grad():
        for index, (name, members) in enumerate(group_names(modules).items()):
            shape = tuple(parameters[members[0] + ".weight"].shape)
            deltas = next(synthetic_groups({name: shape}, num_layers, seed * 100 + index, shared_rank=12,
                                           private_rank=6, noise=0.5)).deltas
            norm = sum(float(parameters[m + ".weight"].norm()) for m in members) / num_layers
            deltas *= scale * norm / deltas.flatten(1).norm(dim=1).mean()
            for module, delta in zip(members, deltas, strict=True):
                parameters[module + ".weight"] += delta
    base.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    return correlated_pair(tmp_path_factory.mktemp("pair"))
