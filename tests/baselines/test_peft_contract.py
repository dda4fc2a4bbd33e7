"""PEFT's contracts that its own test matrix checks (tests/test_custom_models.py of the PEFT sdist), for both
baselines; the whole matrix ran against them by hand, see docs/baselines.md."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import rasa_lora
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ
from rasa_lora.models import tiny_llama


@pytest.mark.parametrize("config", [rasa_lora.MoraConfig(r=2, target_modules=ALL_PROJ),
                                    rasa_lora.PriloraConfig(r=2, target_modules=ALL_PROJ)], ids=["mora", "prilora"])
def test_adapter_dtype_follows_peft_autocast_contract(config):
    # PEFT's contract (its test_adapter_dtype_autocast): float32 adapters by default, the base dtype when asked
    for autocast, expected in ((True, torch.float32), (False, torch.bfloat16)):
        model = get_peft_model(tiny_llama().to(torch.bfloat16), config, autocast_adapter_dtype=autocast)
        dtypes = {p.dtype for n, p in model.named_parameters() if model.prefix in n}
        assert dtypes == {expected}, autocast
