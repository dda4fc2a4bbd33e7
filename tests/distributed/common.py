"""Builders shared by the 2-process workers and the single-process references (same seeds, same model)."""

from __future__ import annotations

import torch
from peft import get_peft_model

import rasa_lora
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ
from rasa_lora.models import tiny_llama

GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 12, 128
LEARNING_RATE = 0.5  # SGD: the update is lr * gradient, so a wrong gradient scale (sum vs mean) shows in the params


def build_model(use_reentrant: bool) -> torch.nn.Module:
    """tiny_llama + RaSA r=8, k=2 on all projections, random B (so every gradient is non-zero), checkpointing on."""
    base = tiny_llama(seed=0)
    torch.manual_seed(1)
    config = rasa_lora.RasaConfig(r=8, rasa_k=2, rasa_alpha=16, target_modules=ALL_PROJ, init_weights=False)
    model = get_peft_model(base, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model.train()


def global_batch() -> torch.Tensor:
    """Token ids (GLOBAL_BATCH, SEQ_LEN); rows have equal length, so the mean of per-row-half means is the mean."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
