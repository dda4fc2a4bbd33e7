"""`rasa-lora train --method mora|prilora`: a short CPU run through the project's trainer, and its adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rasa_lora.merge import main as merge_main
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides


@pytest.mark.parametrize("method", ["mora", "prilora"])
def test_a_short_run_trains_saves_and_reloads(tiny_model_dir, tmp_path, method):
    out = tmp_path / method
    values = tiny_overrides(tiny_model_dir, out, method=method, max_steps=3, learning_rate=1e-2, dropout=0.0,
                            prilora_prune_interval=3)
    summary = train(build_config(values))
    assert summary["steps"] == 3 and 0 < summary["trainable_params"] < summary["total_params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(f"{method}_" in key for key in weights)
    # the adapter moved away from its no-op start (MoRA's M and PriLoRA's B start at zero)
    trained = [value for key, value in weights.items() if key.endswith(("mora_M", "prilora_B"))]
    assert trained and all(value.abs().sum() > 0 for value in trained)
    if method == "prilora":  # the last step pruned: half of each row of every A is zero
        for key, value in weights.items():
            if key.endswith("prilora_A"):
                assert ((value == 0).sum(dim=1) >= value.shape[1] // 2).all(), key
    # `rasa-lora merge` folds it into a plain model that gives the adapter's logits
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert merge_main([str(tiny_model_dir), str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokens = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapter(tokens).logits, merged(tokens).logits
        untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(tokens).logits
    assert not torch.allclose(expected, untouched, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mora_type_is_checked_before_anything_is_written(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="mora_type=5 is unknown; choose one of: 1, 2, 3, 4, 6"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path / "x", method="mora", mora_type=5))
    assert not (tmp_path / "x").exists()
