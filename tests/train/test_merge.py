"""`rasa-lora merge`: the merged model loads with plain transformers and gives the adapter's logits."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.merge import main as merge_main
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "run"
    train(build_config(tiny_overrides(tiny_model_dir, out, max_steps=3, learning_rate=5e-3)))
    return out


def test_merged_model_matches_the_adapter(tiny_model_dir, trained_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert merge_main([str(tiny_model_dir), str(trained_adapter), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = tokenizer(["Mia has 7 apples. Mia buys 5 more apples."], return_tensors="pt")
    with torch.no_grad():
        expected, got, untouched = adapter(**batch).logits, merged(**batch).logits, base(**batch).logits
    assert not torch.allclose(expected, untouched, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # float32 merge: rounding only


def test_merge_refuses_an_existing_output(tiny_model_dir, trained_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    assert merge_main([str(tiny_model_dir), str(trained_adapter), str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_merge_refuses_a_directory_without_adapter(tiny_model_dir, tmp_path, capsys):
    assert merge_main([str(tiny_model_dir), str(tmp_path), str(tmp_path / "out")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
