"""QRaSA: RaSA on a bitsandbytes NF4 base (`rasa_lora.quant`), against the dequantized dense reference.

CPU tests need bitsandbytes (>= 0.46 quantizes on the CPU; the `quant` extra); the GPU tests check the same on
CUDA in bf16, through the Triton kernels."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rasa_lora
from rasa_lora import quant
from rasa_lora.adapter import RasaLayer
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ
from rasa_lora.models import tiny_llama
from rasa_lora.ops import set_fused_backend, set_kernel_backend
from rasa_lora.reference import layer_delta
from tests.adapter.helpers import randomize, tokens

bnb = pytest.importorskip("bitsandbytes", reason="QRaSA needs bitsandbytes (pip install rasa-lora[quant])")


@contextlib.contextmanager
def fused(enabled: bool, backend: str | None = "torch"):
    """The fused path, on the 4-bit base too (`enabled`), or the reference path (bitsandbytes' matmul_4bit)."""
    set_fused_backend(enabled)
    set_kernel_backend(backend if enabled else None)
    quant.set_fused_on_quantized(enabled)
    try:
        yield
    finally:
        set_fused_backend(None)
        set_kernel_backend(None)
        quant.set_fused_on_quantized(False)


def qrasa_model(device="cpu", dtype=torch.float32, r=8, k=1):
    base = tiny_llama().to(device=device, dtype=dtype)
    quant.quantize_model(base)
    model = get_peft_model(base, rasa_lora.RasaConfig(r=r, rasa_k=k, target_modules=ALL_PROJ))
    randomize(model)
    return model.to(device)


def dense_reference(model) -> torch.nn.Module:
    """The base with every adapted 4-bit layer replaced by an nn.Linear of dequant(W) + dW (dW by the reference)."""
    reference = copy.deepcopy(model.get_base_model())
    for name, layer in list(model.get_base_model().named_modules()):
        if isinstance(layer, RasaLayer):
            base = layer.get_base_layer()
            weight = quant.dequantized_weight(base).double() + layer_delta(layer).to(base.weight.device)
            parent_name, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent_name), child,
                    quant.dense_linear(base, weight.to(quant.original_dtype(base))))
    return reference


def test_nf4_layer_is_dequantize_then_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = quant.nf4_linear(linear)
    weight = quant.dequantized_weight(layer)
    assert quant.is_4bit(layer) and not quant.is_4bit(linear) and layer.weight.dtype == torch.uint8
    # 4 bits per value: a relative error of about 0.09 on this uniform init (measured 0.094), far from both 0 and 1
    error = (weight - linear.weight).norm() / linear.weight.norm()
    assert 0.02 < error < 0.12
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_qrasa_matches_the_dequantized_dense_reference(path):
    model = qrasa_model().eval()
    assert sum(quant.is_4bit(m.get_base_layer()) for m in model.modules() if isinstance(m, RasaLayer)) == 28
    reference = dense_reference(model).eval()
    x = tokens()
    with torch.no_grad(), fused(path == "fused"):
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_a_4bit_base_takes_the_reference_path_unless_asked(monkeypatch):
    """Default: bitsandbytes' matmul_4bit (keeps only the packed weight for backward), not the fused kernels."""
    from rasa_lora.adapter import layer as layer_module

    calls = []
    monkeypatch.setattr(layer_module, "rasa_linear", lambda *args, **kwargs: calls.append(1) or 0 / 0)
    model = qrasa_model().eval()
    set_fused_backend(True)
    try:
        with torch.no_grad():
            model(tokens())
        assert calls == []
        quant.set_fused_on_quantized(True)
        with pytest.raises(ZeroDivisionError), torch.no_grad():
            model(tokens())
    finally:
        set_fused_backend(None)
        quant.set_fused_on_quantized(False)
    assert calls == [1]


def test_fused_and_reference_paths_give_the_same_gradients():
    grads = {}
    for path in ("reference", "fused"):
        model = qrasa_model().train()
        x = tokens()
        with fused(path == "fused"):
            model(x, labels=x).loss.backward()
        grads[path] = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads["fused"].keys() == grads["reference"].keys() and len(grads["fused"]) > 28
    for name, grad in grads["fused"].items():
        torch.testing.assert_close(grad, grads["reference"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_keeps_no_dequantized_weight_between_forward_and_backward(monkeypatch):
    """The fused nodes hold their weight; its memory is released after the forward and refilled for the backward."""
    made = []
    original = quant.dequantized_weight
    monkeypatch.setattr(quant, "dequantized_weight", lambda module: made.append(original(module)) or made[-1])
    model = qrasa_model().train()
    x = tokens()
    with fused(True):
        loss = model(x, labels=x).loss
        forward_weights = list(made)
        assert len(forward_weights) == 28 and all(w.untyped_storage().nbytes() == 0 for w in forward_weights)
        loss.backward()
    assert len(made) == 2 * 28  # dequantized again, once per projection, for the backward
    assert all(w.untyped_storage().nbytes() > 0 for w in forward_weights)  # refilled in place


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_path_gradients_match_bitsandbytes_path_under_checkpointing(checkpointing):
    from rasa_lora.train.methods import enable_gradient_checkpointing

    grads = {}
    for path in ("reference", "fused"):
        model = qrasa_model().train()
        if checkpointing:
            enable_gradient_checkpointing(model, use_reentrant=False)
        x = tokens()
        with fused(path == "fused"):
            model(x, labels=x).loss.backward()
        grads[path] = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads["fused"].items():
        torch.testing.assert_close(grad, grads["reference"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_merge_is_dense_and_unmerge_restores_the_4bit_layer():
    model = qrasa_model().eval()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    four_bit = layer.get_base_layer()
    packed = four_bit.weight.data.clone()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        model.merge_adapter()
        merged_base = layer.get_base_layer()
        assert type(merged_base) is torch.nn.Linear and merged_base.weight.dtype == torch.float32
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert layer.get_base_layer() is four_bit and torch.equal(four_bit.weight.data, packed)
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
        merged = model.merge_and_unload()
        assert not any(quant.is_4bit(m) for m in merged.model.layers.modules())
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_adapter_on_a_4bit_base_saves_and_loads(tmp_path):
    model = qrasa_model().eval()
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    base = quant.quantize_model(tiny_llama())
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)


def test_the_qlora_baseline_is_peft_lora_on_the_same_4bit_layers():
    base = quant.quantize_model(tiny_llama())
    model = get_peft_model(base, LoraConfig(r=8, target_modules=ALL_PROJ))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and quant.is_4bit(layer.get_base_layer())


def test_quantize_model_refuses_a_model_without_linear_layers():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quant.quantize_model(torch.nn.Sequential(torch.nn.ReLU()))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["reference", "triton", "torch"])
def test_qrasa_on_cuda_matches_the_dequantized_dense_reference_bf16(path):
    """The GPU check of the issue: bf16 NF4 base, on the default path (bitsandbytes' matmul_4bit) and the fused one
    (Triton and torch backends), outputs against the dense dequant(W) + dW model, and a pool gets its gradient.
    bf16 tolerance: a few roundings of each activation (2^-8 relative each)."""
    model = qrasa_model(device="cuda", dtype=torch.bfloat16).train()
    reference = dense_reference(model).train()
    x = tokens().cuda()
    with fused(path != "reference", None if path == "reference" else path):
        out = model(x, labels=x)
    expected = reference(x, labels=x)
    torch.testing.assert_close(out.logits.float(), expected.logits.float(), rtol=2e-2, atol=2e-2)
    out.loss.backward()
    pool = model.base_model.rasa_shared_B["default"]["model-layers-*-mlp-down_proj"]
    assert pool.grad is not None and pool.grad.abs().max() > 0


@pytest.mark.gpu
def test_qrasa_merge_on_cuda_is_bf16_dense():
    model = qrasa_model(device="cuda", dtype=torch.bfloat16).eval()
    x = tokens().cuda()
    with torch.no_grad():
        expected = model(x).logits.float()
        merged = model.merge_and_unload()
        layer = merged.model.layers[0].mlp.down_proj
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.bfloat16
        torch.testing.assert_close(merged(x).logits.float(), expected, rtol=2e-2, atol=2e-2)
