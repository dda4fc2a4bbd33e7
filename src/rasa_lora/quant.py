"""A 4-bit frozen base for RaSA (QRaSA), as QLoRA does it: bitsandbytes' NF4 `Linear4bit`, dequantize-then-matmul.

Why bitsandbytes: it is what QLoRA users run, PEFT's LoRA supports its `Linear4bit` natively (so the QLoRA baseline
is PEFT's own code on the very same 4-bit layers), its dequantization is a CUDA kernel, and its wheel (41 MiB,
`bitsandbytes==0.50.2`) fits the GPU machine's 64 MiB carry. torchao's NF4 tensor (3.4 MiB wheel) has no PEFT LoRA
layer; a home-made NF4 would need its own kernels. Install: `pip install rasa-lora[quant]`.

What RaSA does on a `Linear4bit` base (`rasa_lora.adapter.layer.Linear`):
- forward, by default: the layer's reference path, i.e. bitsandbytes' `matmul_4bit` for the base (dequantize, then
  matmul; its backward dequantizes again and keeps only the packed weight) plus eq. 5's update in plain PyTorch, as
  PEFT's QLoRA layer does.
- forward with `set_fused_on_quantized(True)`: the fused path (Triton kernels) with the base weight dequantized
  for the call (`call_with_transient_weight`). The fused autograd nodes hold their weight as an attribute, not as a
  saved tensor, so gradient checkpointing would not free it: every projection's dequantized weight would stay
  alive until backward. So the weight's memory is released right after the call and dequantized again into it by a
  pre-hook on the output's backward node (the storage trick FSDP uses for its unsharded parameters): three
  dequantizations a step under checkpointing (forward, recomputation, backward), as bitsandbytes' matmul does.
  Not yet measured on a GPU (`benchmarks/qrasa.py` measures both paths); hence not the default.
- merge: dense. The merged layer is an `nn.Linear` holding dequant(W) + dW in the dtype the base had before
  quantization (`quant_state.dtype`, bfloat16 when loaded in bf16): re-quantizing would round most of dW away.
  Unmerging restores the original 4-bit layer exactly.

`quantize_model` turns the linear layers of a loaded model into NF4 (blocks of 64, no double quantization by
default), on whatever device the model is (bitsandbytes >= 0.46 quantizes on the CPU too, which the tests use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_FUSED_ON_QUANTIZED = False


def set_fused_on_quantized(enabled: bool) -> None:
    """Whether RaSA layers on a 4-bit base take the fused path with a dequantized weight (keeps each projection's
    dequantized weight until backward) or, the default, bitsandbytes' matmul plus eq. 5 in plain PyTorch."""
    global _FUSED_ON_QUANTIZED
    _FUSED_ON_QUANTIZED = bool(enabled)


def fused_on_quantized() -> bool:
    return _FUSED_ON_QUANTIZED


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and hasattr(getattr(module, "weight", None),
                                                                        "quant_state")


def original_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the 4-bit layer's weight had before quantization (the dtype its dequantization gives)."""
    return module.weight.quant_state.dtype


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes 4-bit layer, dequantized (in `original_dtype`)."""
    from bitsandbytes import functional

    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked by bitsandbytes' CPU inference path
        data, state = functional._convert_weight_packed_for_cpu_inverse(data, state)
    return functional.dequantize_4bit(data, state)


def call_with_transient_weight(module: nn.Module, dtype: torch.dtype,
                               run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`run(weight)` with the 4-bit layer's weight dequantized to `dtype`, keeping no copy of it between forward and
    backward: after the call the weight's storage is emptied (the autograd nodes that hold the tensor then hold no
    memory), and a pre-hook on the output's backward node dequantizes it again just before the call's backward."""
    weight = dequantized_weight(module).to(dtype)
    out = run(weight)
    node = out.grad_fn
    if node is None:  # no backward will come (inference, or nothing requires grad)
        return out
    storage = weight.untyped_storage()
    size = storage.nbytes()
    storage.resize_(0)

    def refill(grad_outputs):
        if storage.nbytes() == 0:
            storage.resize_(size)
            with torch.no_grad():
                weight.copy_(dequantized_weight(module).to(dtype))
        return None

    node.register_prehook(refill)
    return out


def dense_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` with `weight` and the 4-bit layer's bias (cast to the weight's dtype)."""
    out_features, in_features = weight.shape
    dense = nn.Linear(in_features, out_features, bias=module.bias is not None, device=weight.device,
                      dtype=weight.dtype)
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=module.bias.requires_grad)
    return dense


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
               double_quant: bool = False) -> nn.Module:
    """A bitsandbytes NF4 `Linear4bit` holding `linear`'s weight (quantized on its device)."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.to("cpu") if weight.device.type == "meta" else weight,
                                     requires_grad=False, quant_type="nf4", blocksize=blocksize,
                                     compress_statistics=double_quant, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.weight = layer.weight._quantize(weight.device)
    layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes' dequantize-then-matmul on the CPU too
    return layer.to(weight.device) if weight.device.type == "cpu" else layer


def quantize_model(model: nn.Module, compute_dtype: torch.dtype | None = None, skip: tuple[str, ...] = ("lm_head",),
                   **kwargs: Any) -> nn.Module:
    """Replace every `nn.Linear` of `model` (but those whose name ends with one of `skip`) by an NF4 `Linear4bit`,
    in place, one layer at a time (peak memory: the model plus one layer's weight in its dtype). For a checkpoint
    too big to load unquantized, use transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`
    instead: it gives the same layers."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not name.endswith(skip)]
    if not targets:
        raise ValueError("quantize_model found no nn.Linear to quantize (already quantized, or not a torch model?)")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nf4_linear(module, compute_dtype, **kwargs))
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit load; PEFT's LoRA then takes its bnb layer
    return model
