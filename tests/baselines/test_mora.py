"""MoRA: every compression type against the dense reference (forward, gradient, merge), r^, PEFT round trips."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import rasa_lora
from rasa_lora.baselines.mora import MoraConfig, MoraLayer, mora_rank
from rasa_lora.baselines.mora.layer import Linear
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ
from rasa_lora.models import tiny_llama
from tests.baselines.references import mora_delta

TYPES = (1, 2, 3, 4, 6)
# (in, out): square, wide, narrow, in < r^, in and out not multiples of r^ (padding and partial tiles)
SHAPES = [(32, 32), (48, 20), (20, 48), (6, 40), (37, 53)]


def _layer(in_features: int, out_features: int, mora_type: int, r: int = 2, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_features, out_features)
    return Linear(base, "default", MoraConfig(r=r, mora_type=mora_type, init_weights=False))


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_and_gradient_match_the_dense_reference(mora_type, shape):
    # fp32 1e-5: the layer sums at most ceil(in / r^) inputs per slot before one small matmul
    layer = _layer(*shape, mora_type)
    x = torch.randn(3, 5, shape[0])
    M = layer.mora_M["default"]
    out = layer(x)
    reference = layer.base_layer(x) + (x.double() @ mora_delta(M.detach(), *shape, mora_type).t()).float()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, M, grad_out)
    M_ref = M.detach().double().requires_grad_(True)
    delta = mora_delta(M_ref, *shape, mora_type)
    ((x.double() @ delta.t()) * grad_out.double()).sum().backward()
    torch.testing.assert_close(grad, M_ref.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_merge_adds_exactly_the_reference_update_and_unmerge_restores(mora_type, shape):
    layer = _layer(*shape, mora_type)
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, shape[0])
    before = layer(x)
    layer.merge()
    expected = weight.double() + mora_delta(layer.mora_M["default"], *shape, mora_type)
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_conv1d_layers_merge_in_their_transposed_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(nf=20, nx=48)  # weight (in, out), as GPT-2 stores it
    layer = Linear(base, "default", MoraConfig(r=2, mora_type=6, fan_in_fan_out=True, init_weights=False))
    x = torch.randn(3, 48)
    delta = mora_delta(layer.mora_M["default"], 48, 20, 6)
    torch.testing.assert_close(layer(x), base(x) + (x.double() @ delta.t()).float(), rtol=1e-5, atol=1e-5)
    weight = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(base.weight.double(), weight.double() + delta.t(), rtol=1e-6, atol=1e-6)


def test_the_update_is_high_rank_where_lora_of_the_same_budget_is_not():
    # MoRA's point (its paper's Fig. 1): r^ = 16 here against LoRA's r = 2
    layer = _layer(64, 64, 6, r=2)
    assert layer.mora_rank["default"] == 16
    assert torch.linalg.matrix_rank(layer.delta_weight_float("default")) > 2


def test_r_hat_matches_loras_budget_as_the_official_code_rounds_it():
    assert mora_rank(4096, 4096, 8, 1) == 256 and mora_rank(4096, 1024, 8, 1) == 202
    assert mora_rank(4096, 14336, 16, 1) == 543  # int(sqrt(18432 * 16) + 0.5)
    assert mora_rank(4096, 14336, 16, 6) == 542  # the rotation pairs dimensions: even, as the authors ran it
    for in_f, out_f, r in [(4096, 4096, 8), (4096, 1024, 16), (4096, 14336, 32)]:
        assert abs(mora_rank(in_f, out_f, r, 1) ** 2 - r * (in_f + out_f)) <= mora_rank(in_f, out_f, r, 1)


def test_zero_init_starts_as_the_base_model():
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 7))
    expected = base(x).logits
    model = get_peft_model(base, MoraConfig(r=2, target_modules=ALL_PROJ))
    assert torch.equal(model(x).logits, expected)


def test_bad_type_names_the_choices():
    with pytest.raises(ValueError, match=r"mora_type=5 is unknown; choose one of 1 \(sharing"):
        MoraConfig(mora_type=5)


def _randomized(model, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mora_M" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_save_load_is_bitwise_and_merge_and_unload_gives_the_same_outputs(tmp_path):
    model = _randomized(get_peft_model(tiny_llama(), MoraConfig(r=2, target_modules=ALL_PROJ)))
    x = torch.randint(0, 128, (2, 7))
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    saved = {k: v for k, v in model.state_dict().items() if "mora_" in k}
    assert saved and all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())
    assert torch.equal(loaded(x).logits, expected)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, MoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_several_adapters_switch_disable_and_delete():
    model = _randomized(get_peft_model(tiny_llama(), MoraConfig(r=2, target_modules=ALL_PROJ)))
    model.add_adapter("rot", MoraConfig(r=4, mora_type=1, target_modules=["q_proj", "v_proj"]))
    _randomized(model, seed=2)
    x = torch.randint(0, 128, (2, 7))
    first = model(x).logits
    model.set_adapter("rot")
    second = model(x).logits
    with model.disable_adapter():
        plain = model(x).logits
    assert not torch.allclose(first, second) and not torch.allclose(second, plain)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    model.delete_adapter("default")
    assert not any(".default" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(x).logits, second)


def test_import_registers_the_method():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[MoraConfig().peft_type] is rasa_lora.MoraConfig



def test_a_layer_too_small_for_a_square_matrix_says_what_to_do():
    with pytest.raises(ValueError, match="side 0 on a \\(1 -> 1\\) layer at r=1; use a larger r"):
        Linear(torch.nn.Linear(1, 1), "default", MoraConfig(r=1))
