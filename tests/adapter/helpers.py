"""Builders shared by the adapter tests."""

from __future__ import annotations

import torch
from peft import get_peft_model

import rasa_lora
from rasa_lora.adapter import RasaLayer
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ
from rasa_lora.models import tiny_llama


def randomize(model, seed: int = 1) -> None:
    """Give every RaSA parameter (B and the pools included) random values, so the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rasa_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def rasa_model(r: int = 8, k: int = 1, dropout: float = 0.0, seed: int = 0, random: bool = True, **kwargs):
    base = tiny_llama(seed=seed, **kwargs)
    config = rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=16, rasa_dropout=dropout, target_modules=ALL_PROJ)
    model = get_peft_model(base, config)
    if random:
        randomize(model)
    return model


def rasa_layers(model) -> dict[str, RasaLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RasaLayer)}


def tokens(batch: int = 2, length: int = 9, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
