"""RaSA through PEFT's public API: save/load, merge, several adapters, errors."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import rasa_lora
from rasa_lora.adapter import RasaLayer
from rasa_lora.models import tiny_llama

from .helpers import ALL_PROJ, randomize, rasa_layers, rasa_model, rel_err, tokens


def test_pools_are_parameters_of_the_tuner_and_layers_use_them():
    model = rasa_model(r=8, k=1, num_layers=4)
    tuner = model.base_model
    A_s = tuner.rasa_shared_A["default"]["model-layers-*-mlp-down_proj"]
    assert A_s.shape == (4 * 1, 48) and A_s.requires_grad
    layer = rasa_layers(model)["base_model.model.model.layers.3.mlp.down_proj"]
    assert layer.shared_factors("default")[0] is A_s
    # the pool is not registered inside the layers
    assert not any("shared" in name for name, _ in layer.named_parameters())


def test_trainable_parameters_equal_lora_plus_d():
    config = dict(r=8, target_modules=ALL_PROJ)
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(), LoraConfig(**config))
    rasa = get_peft_model(tiny_llama(), rasa_lora.RasaConfig(rasa_k=1, **config))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    num_d = 4 * 7 * (8 - 1 + 4 * 1)
    assert count(rasa) == count(lora) + num_d


def test_save_load_gives_bitwise_equal_logits_and_pools_saved_once(tmp_path):
    model = rasa_model(r=8, k=2).eval()
    x = tokens()
    before = model(x).logits
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    pool_keys = [k for k in state if "rasa_shared" in k]
    assert len(pool_keys) == 2 * 7  # A and B, once per group
    assert all(k.startswith("base_model.rasa_shared_") for k in pool_keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "RASA"

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(loaded(x).logits, before)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_auto_peft_model_loads(tmp_path):
    from peft import AutoPeftModelForCausalLM

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(tiny_llama(), rasa_lora.RasaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    x = tokens()
    assert torch.equal(loaded.eval()(x).logits, model.eval()(x).logits)


def test_is_trainable_loading_makes_adapter_and_pool_trainable(tmp_path):
    rasa_model().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any("rasa_shared_A" in n for n in names) and any("rasa_D" in n for n in names)
    assert all(".rasa_" in n for n in names)


def test_merge_matches_unmerged_and_unmerge_restores_base():
    model = rasa_model(r=8, k=1).eval()
    x = tokens()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = model(x).logits
    model.merge_adapter()
    assert all(layer.merged for layer in rasa_layers(model).values())
    assert rel_err(model(x).logits, unmerged) <= 1e-5
    model.unmerge_adapter()
    for name, weight in base_weights.items():
        assert (dict(model.named_parameters())[name] - weight).abs().max() <= 1e-6, name
    assert rel_err(model(x).logits, unmerged) <= 1e-6


def test_merge_and_unload_gives_plain_model_with_same_logits():
    model = rasa_model(r=8, k=1).eval()
    x = tokens()
    expected = model(x).logits
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, RasaLayer) for m in merged.modules())
    assert rel_err(merged(x).logits, expected) <= 1e-5


def test_safe_merge_refuses_nan_and_leaves_weights_unchanged():
    model = rasa_model(r=8, k=1).eval()
    layer = rasa_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.rasa_D["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_unload_returns_the_base_model():
    model = rasa_model().eval()
    base = tiny_llama().eval()
    x = tokens()
    assert torch.equal(model.unload()(x).logits, base(x).logits)


def test_disable_adapter_gives_base_output():
    model = rasa_model().eval()
    x = tokens()
    base_logits = tiny_llama().eval()(x).logits
    with model.disable_adapter():
        assert torch.equal(model(x).logits, base_logits)
    assert not torch.equal(model(x).logits, base_logits)


def test_two_adapters_with_different_r_and_k_switch_and_delete():
    model = rasa_model(r=8, k=1).eval()
    model.add_adapter("second", rasa_lora.RasaConfig(r=4, rasa_k=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, seed=5)
    tuner = model.base_model
    assert tuner.rasa_shared_A["second"]["model-layers-*-self_attn-q_proj"].shape == (4 * 2, 32)
    x = tokens()
    first = model(x).logits
    model.set_adapter("second")
    second = model(x).logits
    assert not torch.equal(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    model.set_adapter("default")
    assert torch.equal(model(x).logits, first)
    model.delete_adapter("second")
    assert "second" not in tuner.rasa_shared_A and "second" not in tuner.rasa_shared_B
    assert all("second" not in layer.rasa_A for layer in rasa_layers(model).values())
    assert torch.equal(model(x).logits, first)


def test_merging_one_layer_is_not_disturbed_by_another_layer_or_pool_update():
    model = rasa_model(r=8, k=1).eval()
    layers = rasa_layers(model)
    a = layers["base_model.model.model.layers.0.mlp.down_proj"]
    b = layers["base_model.model.model.layers.1.mlp.down_proj"]
    base_a = a.get_base_layer().weight.detach().clone()
    a.merge()
    b.merge()
    b.unmerge()  # unmerging b must leave a's merge intact
    assert a.merged and not b.merged
    assert rel_err(a.get_base_layer().weight - base_a, a.get_delta_weight("default")) <= 1e-6


def test_pool_change_while_merged_raises_and_unmerge_is_still_exact():
    model = rasa_model(r=8, k=1).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    model.merge_adapter()
    with torch.no_grad():
        model.base_model.rasa_shared_B["default"]["model-layers-*-mlp-up_proj"].add_(1.0)
    with pytest.raises(RuntimeError, match="changed while this layer was merged"):
        model(tokens())
    model.unmerge_adapter()
    for name, weight in base.items():
        assert (dict(model.named_parameters())[name] - weight).abs().max() <= 1e-6


def test_loading_a_pool_while_merged_raises_before_copying(tmp_path):
    model = rasa_model(r=8, k=1).eval()
    model.save_pretrained(tmp_path)
    model.merge_adapter()
    key = "model-layers-*-mlp-up_proj"
    before = model.base_model.rasa_shared_A["default"][key].detach().clone()
    with pytest.raises(RuntimeError, match="while layers are merged"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert torch.equal(model.base_model.rasa_shared_A["default"][key], before)


def test_adapter_for_another_base_shape_is_refused(tmp_path):
    rasa_model(hidden_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit the model"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=64), tmp_path)


def test_group_with_mixed_shapes_names_modules_and_fix():
    model = tiny_llama(num_layers=3)
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(48, 16, bias=False)  # odd one out
    with pytest.raises(ValueError) as error:
        get_peft_model(model, rasa_lora.RasaConfig(r=4, target_modules=["down_proj"]))
    message = str(error.value)
    assert "model.layers.*.mlp.down_proj" in message and "(in=48, out=16)" in message
    assert "layers_to_transform" in message
    assert not any(isinstance(m, RasaLayer) for m in model.modules())  # nothing half-applied


def test_unsupported_layer_type_is_refused_with_the_fix():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"nn.Linear and transformers' Conv1D only.*Embedding"):
        get_peft_model(model, rasa_lora.RasaConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    assert not any(isinstance(m, RasaLayer) for m in model.modules())


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(tiny_llama(), rasa_lora.RasaConfig(r=4, target_modules=["nope_proj"]))


def test_all_linear_and_none_target_every_decoder_linear_but_not_lm_head():
    for target in (None, "all-linear"):
        model = get_peft_model(tiny_llama(num_layers=2), rasa_lora.RasaConfig(r=4, target_modules=target))
        names = set(rasa_layers(model))
        assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)


def test_layers_to_transform_sets_l():
    config = rasa_lora.RasaConfig(r=8, rasa_k=2, target_modules=["q_proj"], layers_to_transform=[0, 2],
                                  layers_pattern="layers")
    model = get_peft_model(tiny_llama(num_layers=4), config)
    assert set(rasa_layers(model)) == {f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in (0, 2)}
    assert model.base_model.rasa_shared_A["default"]["model-layers-*-self_attn-q_proj"].shape[0] == 2 * 2


def test_gpt2_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=24, n_head=2, vocab_size=64, n_positions=32)).eval()
    model = get_peft_model(base, rasa_lora.RasaConfig(r=4, rasa_k=1, target_modules=["c_attn", "c_fc"]))
    randomize(model)
    x = tokens(vocab=64)
    expected = model(x).logits
    layer = rasa_layers(model)["base_model.model.transformer.h.0.attn.c_attn"]
    assert layer.get_delta_weight("default").shape == (24, 72)  # Conv1D layout (in, out)
    merged = model.merge_and_unload()
    assert rel_err(merged(x).logits, expected) <= 1e-5


def test_only_the_last_adapted_projection_of_each_block_runs_as_two_autograd_nodes():
    """`last_in_block` (see `rasa_linear`): False for every projection followed by another adapted one of its
    decoder layer, True for the last (down_proj with all projections adapted, v_proj with q and v only)."""
    from rasa_lora.adapter.model import mark_last_in_block

    marks = {name.split("model.layers.")[-1]: layer.last_in_block for name, layer in rasa_layers(rasa_model()).items()}
    assert marks and {name: last for name, last in marks.items() if last} == {
        f"{i}.mlp.down_proj": True for i in range(len(marks) // 7)}
    config = rasa_lora.RasaConfig(r=4, rasa_k=1, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), config)
    marks = {name.split("model.layers.")[-1]: layer.last_in_block for name, layer in rasa_layers(model).items()}
    assert marks["0.self_attn.v_proj"] and not marks["0.self_attn.q_proj"]
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    layer.last_in_block = True
    mark_last_in_block(model)  # idempotent: recomputed from the module order
    assert not layer.last_in_block


def test_mixed_adapter_batches_route_each_sample_to_its_adapter():
    model = rasa_model(r=4, k=1).eval()
    model.add_adapter("other", rasa_lora.RasaConfig(r=8, rasa_k=2, target_modules=["q_proj", "down_proj"]))
    randomize(model, seed=5)
    x = tokens(batch=5)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x).logits
        outputs = {"__base__": base}
        for name in ("default", "other"):
            model.set_adapter(name)
            outputs[name] = model(x).logits
        names = ["other", "__base__", "default", "other", "default"]
        mixed = model(x, adapter_names=names).logits
    for j, name in enumerate(names):
        assert rel_err(mixed[j], outputs[name][j]) <= 1e-6, (j, name)
    assert not torch.allclose(outputs["default"], outputs["other"])
    # generate (greedy, and beam search, which repeats each name per beam)
    for beams in (1, 2):
        kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=beams, pad_token_id=0)
        mixed = model.generate(input_ids=x, adapter_names=names, **kwargs)
        for name in ("default", "other"):
            model.set_adapter(name)
            single = model.generate(input_ids=x, **kwargs)
            rows = [j for j, n in enumerate(names) if n == name]
            assert torch.equal(mixed[rows], single[rows]), (beams, name)


def test_mixed_adapter_batches_are_refused_in_training_and_for_unknown_names():
    model = rasa_model(r=4, k=1)
    with pytest.raises(ValueError, match="training mode"):
        model.train()(tokens(), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model.eval()(tokens(), adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="should be the same as the number of inputs"):
        model.eval()(tokens(), adapter_names=["default"])
