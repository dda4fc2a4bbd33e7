"""Adapters saved by the authors' PEFT fork (github.com/zwhe99/RaSA) load into rasa-lora and behave as trained.

The authors' format is built here from a rasa-lora adapter, following their code (read, not copied): their layers
hold `rasa_A`/`rasa_B` as `nn.Linear` and D as `rasa_mixing` (a module with `.weight`), their tuner holds the pools
as `rasa_shared_A[adapter][<module>]` `nn.Linear`s with `<module>` the path after `layers.<i>.` and dots written
`__`, and their save keeps every `rasa_` key except the pools' references inside the layers, adapter name removed.
Their config file has their fields only (no `init_weights`).
"""

import json
import re

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file

import rasa_lora
from rasa_lora.adapter import RasaLayer
from rasa_lora.models import tiny_llama

from .helpers import ALL_PROJ, randomize, tokens

AUTHORS_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")  # the grouping regex of their RasaModel


def authors_config(config, **changes) -> dict:
    fields = {
        "peft_type": "RASA", "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
        "task_type": "CAUSAL_LM", "inference_mode": True, "r": config.r, "rasa_k": config.rasa_k,
        "target_modules": sorted(config.target_modules), "rasa_alpha": config.rasa_alpha,
        "rasa_dropout": config.rasa_dropout, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
    }
    fields.update(changes)
    return fields


def to_authors_format(model, ours, theirs, **config_changes) -> None:
    """Write rasa-lora adapter folder `ours` (saved from `model`) as the authors' fork would have saved it."""
    saved = load_file(ours / "adapter_model.safetensors")
    tuner = model.base_model
    pool_names = {}  # our checkpoint key of a pool -> theirs
    for path, layer in model.named_modules():
        if not isinstance(layer, RasaLayer):
            continue
        module = AUTHORS_LAYER_RE.search(path).group(2).replace(".", "__")
        if not layer.has_pool("default"):  # k = 0
            continue
        A_s, B_s = layer.shared_factors("default")
        for which, pool, container in (("A", A_s, tuner.rasa_shared_A["default"]),
                                       ("B", B_s, tuner.rasa_shared_B["default"])):
            ours_key = next(key for key, param in container.items() if param is pool)
            pool_names[f"base_model.rasa_shared_{which}.{ours_key}"] = f"base_model.rasa_shared_{which}.{module}.weight"
    converted = {}
    for key, value in saved.items():
        if key in pool_names:
            converted[pool_names[key]] = value
        elif key.endswith(".rasa_D"):
            converted[key.removesuffix(".rasa_D") + ".rasa_mixing.weight"] = value
        elif key.endswith((".rasa_A", ".rasa_B")):
            converted[key + ".weight"] = value
        else:
            raise AssertionError(f"unexpected key {key}")
    assert len(converted) == len(saved)
    theirs.mkdir()
    save_file(converted, theirs / "adapter_model.safetensors")
    config = authors_config(model.peft_config["default"], **config_changes)
    (theirs / "adapter_config.json").write_text(json.dumps(config))


def trained(r=8, k=2, targets=ALL_PROJ, num_layers=3):
    base = tiny_llama(num_layers=num_layers)
    config = rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=16, rasa_dropout=0.05, target_modules=targets)
    from peft import get_peft_model

    model = get_peft_model(base, config).eval()
    randomize(model, seed=3)
    return model


@pytest.mark.parametrize("r, k", [(8, 2), (4, 1), (4, 4), (4, 0)])
def test_authors_checkpoint_gives_the_same_logits(tmp_path, recwarn, r, k):
    model = trained(r=r, k=k)
    model.save_pretrained(tmp_path / "ours")
    to_authors_format(model, tmp_path / "ours", tmp_path / "theirs")
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        base = tiny_llama(num_layers=3)(ids).logits
        loaded = PeftModel.from_pretrained(tiny_llama(num_layers=3), tmp_path / "theirs").eval()
        got = loaded(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not [w for w in recwarn if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]


def test_authors_config_without_targets_adapts_q_and_v_as_their_fork_did(tmp_path):
    model = trained(targets=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "ours")
    to_authors_format(model, tmp_path / "ours", tmp_path / "theirs", target_modules=None)
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=3), tmp_path / "theirs").eval()
    adapted = {name.rsplit(".", 1)[-1] for name, m in loaded.named_modules() if isinstance(m, RasaLayer)}
    assert adapted == {"q_proj", "v_proj"}
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_authors_config_defaults(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    fields = authors_config(rasa_lora.RasaConfig(r=8, target_modules=["q_proj"]), rasa_d_init="default")
    del fields["r"], fields["rasa_k"]  # their defaults apply: r=256, rasa_k=1
    (folder / "adapter_config.json").write_text(json.dumps(fields))
    # what PeftModel.from_pretrained, AutoPeftModel* and load_adapter read it with (PeftConfig.from_pretrained,
    # the base class's, builds the config without asking the method: it keeps this package's defaults)
    config = rasa_lora.RasaConfig.from_pretrained(folder)
    assert (config.r, config.rasa_k) == (256, 1)
    assert isinstance(PeftConfig.from_pretrained(folder), rasa_lora.RasaConfig)
    # the same missing fields in one of our own files keep our defaults
    ours = rasa_lora.RasaConfig(r=16, target_modules=["q_proj"])
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "init_weights" in saved
    del saved["rasa_k"]
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(saved))
    assert rasa_lora.RasaConfig.from_pretrained(tmp_path / "ours").rasa_k == 2


def test_unsupported_authors_d_init_is_refused(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    fields = authors_config(rasa_lora.RasaConfig(r=8, target_modules=["q_proj"]), rasa_d_init="ones")
    (folder / "adapter_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="rasa_d_init='ones'"):
        rasa_lora.RasaConfig.from_pretrained(folder)


def test_authors_pool_for_an_untargeted_module_is_refused(tmp_path):
    model = trained(targets=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "ours")
    to_authors_format(model, tmp_path / "ours", tmp_path / "theirs", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="self_attn__v_proj"):
        PeftModel.from_pretrained(tiny_llama(num_layers=3), tmp_path / "theirs")


def test_authors_checkpoint_loads_as_a_second_adapter(tmp_path):
    model = trained(r=8, k=1)
    model.save_pretrained(tmp_path / "ours")
    to_authors_format(model, tmp_path / "ours", tmp_path / "theirs")
    other = trained(r=4, k=2)
    other.load_adapter(tmp_path / "theirs", adapter_name="authors")
    other.set_adapter("authors")
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
        merged = other.merge_and_unload(adapter_names=["authors"])
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
