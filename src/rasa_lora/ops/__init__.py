"""The fused path of the RaSA layer: `rasa_linear` (the autograd functions, `rasa_linear.py`) over a backend object
("torch", "cublas", "triton": `*_backend.py`; the Triton kernels in `kernels.py`, launched through `launch.py` with
the shapes of `plans.py`), the one dropout mask of every path (`dropout.py`), and the registered custom operators
that torch.compile traces (`registered.py`)."""

from rasa_lora.ops import registered  # noqa: F401  (registers rasa_lora::linear for torch.compile)
from rasa_lora.ops.rasa_linear import (
    backend_for,
    dropout_mask,
    dropout_scale,
    fused_backend_enabled,
    kernel_backend,
    mask_seed,
    rasa_linear,
    set_base_gemm_adds,
    set_fused_backend,
    set_keep_u,
    set_kernel_backend,
)

__all__ = ["backend_for", "dropout_mask", "dropout_scale", "fused_backend_enabled", "kernel_backend", "mask_seed",
           "rasa_linear", "set_base_gemm_adds", "set_fused_backend", "set_keep_u", "set_kernel_backend"]
