"""The layer against the literal eq. 5 (rasa_lora.reference), both backends, forward and gradients."""

import pytest
import torch

from rasa_lora.ops import dropout_mask, dropout_scale, set_fused_backend
from rasa_lora.reference import dense_forward, layer_delta, numerical_rank

from .helpers import rasa_layers, rasa_model, rel_err


@pytest.fixture(params=[False, True], ids=["reference", "fused"])
def backend(request):
    set_fused_backend(request.param)
    yield request.param
    set_fused_backend(None)


def test_initial_update_is_zero_and_d_follows_eq6():
    model = rasa_model(r=8, k=2, random=False, num_layers=4)
    for layer in rasa_layers(model).values():
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
        D = layer.rasa_D["default"]
        assert D.shape == (8 - 2 + 4 * 2,)
        torch.testing.assert_close(D[:6], torch.full((6,), 16 / (2 * 6)))
        torch.testing.assert_close(D[6:], torch.full((8,), 16 / (2 * 8)))


def test_every_delta_has_rank_r_minus_k_plus_lk():
    model = rasa_model(r=4, k=1, num_layers=4, hidden_size=32, intermediate_size=48)
    for name, layer in rasa_layers(model).items():
        assert numerical_rank(layer_delta(layer)) == 4 - 1 + 4 * 1, name


def test_merge_delta_equals_dense_reference():
    model = rasa_model(r=8, k=1)
    for layer in rasa_layers(model).values():
        delta = layer.get_delta_weight("default")
        assert rel_err(delta, layer_delta(layer)) <= 1e-6


@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (2, 13)])
def test_forward_and_gradients_match_dense_reference(backend, shape):
    model = rasa_model(r=8, k=1)
    layer = rasa_layers(model)["base_model.model.model.layers.2.mlp.down_proj"]
    x = torch.randn(*shape, layer.in_features, requires_grad=True)
    params = [layer.rasa_A["default"], layer.rasa_B["default"], layer.rasa_D["default"],
              *layer.shared_factors("default")]

    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    x_ref = x.detach().clone().requires_grad_(True)
    ref = dense_forward(layer, x_ref)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *params])

    assert rel_err(out, ref) <= 1e-5
    for name, g, g_ref in zip(["x", "A_p", "B_p", "D", "A_s", "B_s"], grads, ref_grads):
        assert rel_err(g, g_ref) <= 1e-5, name


def test_fused_dropout_matches_reference_with_the_same_mask():
    model = rasa_model(r=8, k=2, dropout=0.3)
    model.train()
    layer = rasa_layers(model)["base_model.model.model.layers.1.self_attn.k_proj"]
    set_fused_backend(True)
    try:
        x = torch.randn(4, 6, layer.in_features, requires_grad=True)
        torch.manual_seed(123)
        out = layer(x)
        torch.manual_seed(123)  # the fused path draws its mask seed from the default generator
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
    finally:
        set_fused_backend(None)
    mask = dropout_mask(x, 0.3, seed)
    params = [layer.rasa_A["default"], layer.rasa_B["default"], layer.rasa_D["default"],
              *layer.shared_factors("default")]
    grads = torch.autograd.grad(out.sum(), [x, *params])
    x_ref = x.detach().clone().requires_grad_(True)
    p_used = 1 - 1 / dropout_scale(0.3)  # p as the mask has it
    ref = dense_forward(layer, x_ref, keep_mask=mask, dropout_p=p_used)
    ref_grads = torch.autograd.grad(ref.sum(), [x_ref, *params])
    assert 0.55 < mask.float().mean() < 0.85
    assert rel_err(out, ref) <= 1e-5
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) <= 1e-5


def test_dropout_is_off_in_eval_mode(backend):
    model = rasa_model(r=8, k=1, dropout=0.5).eval()
    layer = rasa_layers(model)["base_model.model.model.layers.0.mlp.up_proj"]
    x = torch.randn(2, 3, layer.in_features)
    assert rel_err(layer(x), dense_forward(layer, x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_within_tolerance(backend, dtype):
    # bf16 keeps 8 bits of mantissa: relative error 1e-2 leaves room for rounding of a 32-long dot product.
    model = rasa_model(r=8, k=1)
    layer = rasa_layers(model)["base_model.model.model.layers.3.self_attn.o_proj"]
    layer.get_base_layer().to(dtype)
    x = torch.randn(3, 5, layer.in_features).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert rel_err(out.float(), dense_forward(layer, x.float().requires_grad_(False)).detach()) <= 1e-2


def test_whole_model_fused_equals_reference():
    model = rasa_model(r=8, k=1)
    x = torch.randint(0, 128, (2, 11))
    set_fused_backend(False)
    ref = model(x).logits
    set_fused_backend(True)
    try:
        fused = model(x).logits
    finally:
        set_fused_backend(None)
    assert rel_err(fused, ref) <= 1e-5
