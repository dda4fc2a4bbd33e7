"""One dropout mask for every path: after the same `torch.manual_seed`, the layer's reference path and each fused
backend draw bit-identical masks, and their fp32 outputs and gradients agree, with dropout on. Switching the fused
path on or off changes the speed, not the training noise.

On the CPU the masks are compared directly (the reference path's recorded where the layer draws it, the fused
paths' where they call `ops.dropout.dropout_mask`); the Triton kernels draw theirs in registers, so on the GPU
(`-m gpu`) the outputs and gradients, which a different mask would move far beyond the tolerance, stand for them
(`test_dropout_mask.py` compares the kernels' bits with the twin's).
"""

import os

import pytest
import torch

from rasa_lora.adapter import layer as layer_module
from rasa_lora.ops import dropout, set_fused_backend, set_kernel_backend
from tests.adapter.helpers import rasa_layers, rasa_model

LAYER = "base_model.model.model.layers.1.self_attn.k_proj"


def _cases():
    cases = [pytest.param("torch", "cpu", id="torch-cpu"), pytest.param("cublas", "cpu", id="cublas-cpu")]
    for backend in ("torch", "cublas", "triton"):
        cases.append(pytest.param(backend, "cuda", marks=pytest.mark.gpu, id=f"{backend}-cuda"))
    from rasa_lora.ops import kernels

    if kernels.available() and os.environ.get("TRITON_INTERPRET") == "1":
        cases.append(pytest.param("triton", "cpu", id="triton-interpreter"))
    return cases


def _step(layer, x, fused: str | None, seed: int, masks: list, monkeypatch):
    """Output and gradients (x, then every adapter parameter) of one training forward/backward of the layer, the
    fused path with backend `fused` or the reference path (None); the masks drawn go to `masks`."""
    # the reference path's mask where the layer asks for it (on CUDA the Triton mask kernel draws it, not the
    # twin), the fused backends' where they draw it: the PyTorch twin (CPU)
    owner = layer_module if fused is None else dropout
    original = owner.dropout_mask

    def recording(rows, p, mask_seed):
        mask = original(rows, p, mask_seed)
        masks.append(mask.reshape(-1, mask.shape[-1]).cpu())
        return mask

    monkeypatch.setattr(owner, "dropout_mask", recording)
    set_fused_backend(fused is not None)
    set_kernel_backend(fused)
    try:
        x = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)
        out = layer(x)
        params = [p for p in layer.parameters() if p.requires_grad] + list(layer.shared_factors("default"))
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
    finally:
        set_fused_backend(None)
        set_kernel_backend(None)
        monkeypatch.undo()
    return out.detach(), grads


@pytest.mark.parametrize(("backend", "device"), _cases())
def test_reference_path_and_each_backend_draw_the_same_mask(backend, device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = rasa_model(r=8, k=2, dropout=0.3).to(device)
    model.train()
    layer = rasa_layers(model)[LAYER]
    with torch.no_grad():  # B starts at zero: give the update something to carry, so gradients see the mask
        for p in [layer.rasa_B["default"], layer.shared_factors("default")[1]]:
            p.normal_(std=0.1)
    x = torch.randn(4, 6, layer.in_features, generator=torch.Generator().manual_seed(0)).to(device)

    reference_masks, fused_masks = [], []
    ref_out, ref_grads = _step(layer, x, None, 123, reference_masks, monkeypatch)
    out, grads = _step(layer, x, backend, 123, fused_masks, monkeypatch)

    assert len(reference_masks) == 1 and 0.55 < reference_masks[0].float().mean() < 0.85
    if device == "cpu" and backend != "triton":  # the forward's mask and the backward's, bit for bit
        assert len(fused_masks) == 2
        for mask in fused_masks:
            assert torch.equal(mask, reference_masks[0])
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6)

    # another seed draws another mask: the agreement above is not dropout switched off
    other, _ = _step(layer, x, None, 124, [], monkeypatch)
    assert not torch.allclose(other, ref_out, rtol=1e-3)
