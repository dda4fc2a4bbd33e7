"""Loading the embedded default model: the one-time GGUF -> safetensors conversion and path errors."""

import os
import stat

import pytest
import torch

from rasa_lora import models


@pytest.mark.slow
def test_embedded_model_converts_once_and_matches_the_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RASA_LORA_CACHE", str(tmp_path))
    converted = models.load_model(None).eval()
    assert (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "SmolLM2-135M-Instruct").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    gguf = models.embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 2]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    assert converted.config.num_hidden_layers == 30


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model("./no/such/model")
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        models.resolve_model("/nope/model.gguf")
