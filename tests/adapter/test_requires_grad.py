"""The shared pools follow PEFT's trainability contract like every other adapter parameter.

Defects found by PEFT's own test matrix (`test_peft_matrix.py`): `set_requires_grad` and
`load_adapter(..., is_trainable=True)` left the pools as they were, `disable_adapter()` left them trainable, and
k = 0 or k = r registered zero-element trainable parameters. These tests do not need PEFT's test suite.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import rasa_lora
from rasa_lora.models import tiny_llama
from rasa_lora.reference import dense_forward

from .helpers import ALL_PROJ, randomize, rasa_layers, rasa_model, rel_err, tokens


def pools(model, adapter="default"):
    tuner = model.base_model
    return list(tuner.rasa_shared_A[adapter].values()) + list(tuner.rasa_shared_B[adapter].values())


def trainable(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_set_requires_grad_false_freezes_the_pools_and_true_restores_them():
    model = rasa_model(r=8, k=1)
    assert all(p.requires_grad for p in pools(model))
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in pools(model))
    assert trainable(model) == set()  # an optimizer built from trainable parameters gets nothing of the adapter
    model.set_requires_grad("default", requires_grad=True)
    assert all(p.requires_grad for p in pools(model))
    assert {n for n in trainable(model) if "rasa_shared" in n} == {
        n for n, _ in model.named_parameters() if "rasa_shared" in n}


def test_set_requires_grad_touches_only_the_named_adapter():
    model = rasa_model(r=8, k=1)
    model.add_adapter("other", rasa_lora.RasaConfig(r=4, rasa_k=1, target_modules=ALL_PROJ))
    model.set_requires_grad("other", requires_grad=True)
    assert all(p.requires_grad for p in pools(model, "other"))
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in pools(model, "default"))
    assert all(p.requires_grad for p in pools(model, "other"))


@pytest.mark.parametrize("is_trainable", [True, False])
def test_load_adapter_trainability_reaches_the_pools(tmp_path, is_trainable):
    rasa_model(r=8, k=1).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    assert all(p.requires_grad == is_trainable for p in pools(model, "other"))
    assert all(p.requires_grad for p in pools(model, "default"))
    for name, param in model.named_parameters():  # the rule PEFT's TestRequiresGrad checks
        expected = ".default" in name or (is_trainable and ".other" in name)
        assert param.requires_grad == expected, name


def test_loading_frozen_keeps_every_pool_frozen(tmp_path):
    rasa_model(r=8, k=1).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # is_trainable=False
    model.load_adapter(tmp_path, adapter_name="other")
    assert trainable(model) == set()


def test_disable_adapter_freezes_the_pools_and_restores_them_after():
    model = rasa_model(r=8, k=1)
    before = trainable(model)
    assert any("rasa_shared" in n for n in before)
    with model.disable_adapter():
        assert trainable(model) == set()
    assert trainable(model) == before


def test_inactive_adapter_pools_stay_frozen_through_disable_and_set_adapter():
    model = rasa_model(r=8, k=1)
    model.add_adapter("other", rasa_lora.RasaConfig(r=4, rasa_k=1, target_modules=ALL_PROJ))
    assert not any(p.requires_grad for p in pools(model, "other"))
    with model.disable_adapter():
        pass
    assert not any(p.requires_grad for p in pools(model, "other"))
    model.set_adapter("other")
    assert all(p.requires_grad for p in pools(model, "other"))
    assert not any(p.requires_grad for p in pools(model, "default"))


@pytest.mark.parametrize("r, k", [(4, 0), (4, 4), (1, 1)])
def test_no_zero_element_parameters_for_k_0_or_k_r(tmp_path, r, k):
    model = rasa_model(r=r, k=k, num_layers=3)
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    assert empty == []
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert [key for key, value in saved.items() if value.numel() == 0] == []
    assert any("rasa_shared" in key for key in saved) == (k > 0)
    assert any(key.endswith(".rasa_A") for key in saved) == (k < r)
    # the update is still eq. 5 (the dense reference), and it round-trips
    layer = rasa_layers(model)["base_model.model.model.layers.1.self_attn.q_proj"]
    x = torch.randn(2, 5, layer.in_features)
    assert rel_err(layer(x), dense_forward(layer, x)) <= 1e-6
    ids = tokens()
    expected = model(ids).logits
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=3), tmp_path)
    assert rel_err(loaded(ids).logits, expected) <= 1e-6
    merged = model.merge_and_unload()
    assert rel_err(merged(ids).logits, expected) <= 1e-5


@pytest.mark.parametrize("k", [0, 4])
def test_k_0_and_k_r_keep_the_base_dtype_when_asked(k):
    config = rasa_lora.RasaConfig(r=4, rasa_k=k, target_modules=ALL_PROJ)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), config, autocast_adapter_dtype=False)
    model.add_adapter("other", config, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if ".rasa_" in n} == {torch.bfloat16}


def test_zero_element_tensors_of_older_checkpoints_are_ignored(tmp_path, recwarn):
    model = rasa_model(r=4, k=4, num_layers=3)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    layer_key = next(key for key in saved if key.endswith(".rasa_D")).removesuffix(".rasa_D")
    saved[layer_key + ".rasa_A"] = torch.zeros(0, 7)  # what rasa-lora wrote before for k = r (any width)
    saved[layer_key + ".rasa_B"] = torch.zeros(7, 0)
    save_file(saved, path)
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=3), tmp_path)
    assert not [w for w in recwarn if "unexpected" in str(w.message).lower()]
    ids = tokens()
    assert rel_err(loaded(ids).logits, model(ids).logits) <= 1e-6


def test_pools_train_and_freeze_with_an_optimizer_built_from_trainable_parameters():
    model = rasa_model(r=8, k=1)
    randomize(model)
    model.set_requires_grad("default", requires_grad=False)
    model.set_requires_grad("default", requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p is q for q in pools(model) for p in params)


@pytest.mark.parametrize("r, k", [(4, 0), (4, 4)])
def test_fused_path_with_k_0_or_k_r_matches_the_reference_and_trains(r, k, monkeypatch):
    import rasa_lora.adapter.layer as layer_module
    from rasa_lora.ops import set_fused_backend

    calls = []
    fused = layer_module.rasa_linear
    monkeypatch.setattr(layer_module, "rasa_linear", lambda *a, **kw: calls.append(1) or fused(*a, **kw))

    model = rasa_model(r=r, k=k, num_layers=3)
    layer = rasa_layers(model)["base_model.model.model.layers.1.mlp.down_proj"]
    x = torch.randn(2, 5, layer.in_features)
    expected = dense_forward(layer, x)
    expected.sum().backward()
    reference = {id(p): p.grad.clone() for p in layer.adapter_parameters("default")}
    model.zero_grad()
    set_fused_backend(True)  # the CPU runs the fused path's torch backend
    try:
        got = layer(x)
        got.sum().backward()
    finally:
        set_fused_backend(None)
    assert calls  # the fused path ran (no fallback to the reference)
    assert rel_err(got, expected) <= 1e-5
    for param in layer.adapter_parameters("default"):
        assert rel_err(param.grad, reference[id(param)]) <= 1e-5
