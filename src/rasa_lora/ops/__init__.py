"""Fast paths of the RaSA layer. See `rasa_linear.py` (the autograd Function), `kernels.py` (Triton) and
`dropout.py` (the hash dropout mask)."""

from rasa_lora.ops.rasa_linear import (
    dropout_mask,
    fused_backend_enabled,
    kernel_backend,
    rasa_linear,
    set_base_gemm_adds,
    set_fused_backend,
    set_keep_u,
    set_kernel_backend,
)

__all__ = ["dropout_mask", "fused_backend_enabled", "kernel_backend", "rasa_linear", "set_base_gemm_adds",
           "set_fused_backend", "set_keep_u", "set_kernel_backend"]
