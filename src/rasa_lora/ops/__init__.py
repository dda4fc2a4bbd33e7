"""Fast paths of the RaSA layer. See `rasa_linear.py`."""

from rasa_lora.ops.rasa_linear import (
    dropout_mask,
    fused_backend_enabled,
    rasa_linear,
    set_fused_backend,
    set_triton_dropout,
)

__all__ = ["dropout_mask", "fused_backend_enabled", "rasa_linear", "set_fused_backend", "set_triton_dropout"]
