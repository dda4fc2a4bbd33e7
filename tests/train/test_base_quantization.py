"""`base_quantization: nf4` (QRaSA / QLoRA in `rasa-lora train`) and `target_parameters` (experts) in the recipe."""

from __future__ import annotations

import json

import pytest
import torch

from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import build_model, train
from tests.train.conftest import tiny_overrides

pytest.importorskip("bitsandbytes", reason="base_quantization: nf4 needs bitsandbytes (the quant extra)")


def _four_bit_projections(model) -> int:
    from rasa_lora import quant

    return sum(quant.is_4bit(m) for m in model.modules())


@pytest.mark.parametrize("method", ["rasa", "lora"])
def test_nf4_base_trains_and_keeps_the_head_in_full_precision(method, tiny_model_dir, tmp_path):
    values = tiny_overrides(tiny_model_dir, tmp_path / "run", method=method, base_quantization="nf4")
    config = build_config(values)
    model = build_model(config, total_steps=2, device=torch.device("cpu"))
    assert _four_bit_projections(model) == 4 * 7 and not _four_bit_projections(model.get_base_model().lm_head)
    summary = train(config)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper()


def test_target_parameters_are_refused_for_other_methods_and_with_lora_dropout(tiny_model_dir, tmp_path):
    experts = ["mlp.experts.gate_up_proj"]
    with pytest.raises(ValueError, match="work with method rasa or lora"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path, method="mora", target_parameters=experts))
    with pytest.raises(ValueError, match="set dropout: 0.0"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path, method="lora", dropout=0.05, target_parameters=experts))
    config = build_config(tiny_overrides(tiny_model_dir, tmp_path, target_parameters="a.b,c.d"))
    assert config.target_parameters == ["a.b", "c.d"]


@pytest.mark.gpu
def test_nf4_base_loads_4bit_through_transformers_on_cuda(tiny_model_dir, tmp_path):
    """On a GPU the base is loaded 4-bit by transformers' BitsAndBytesConfig (the full model never in bf16)."""
    config = build_config(tiny_overrides(tiny_model_dir, tmp_path / "run", base_quantization="nf4"))
    model = build_model(config, total_steps=2, device=torch.device("cuda"))
    assert _four_bit_projections(model) == 4 * 7
    assert train(config)["steps"] == 2
