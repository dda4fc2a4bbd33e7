"""`MoraConfig`: the configuration of a MoRA adapter (field names as in the official code's `LoraConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from rasa_lora.adapter.registration import ensure_peft_type_member

MORA_TYPES = {1: "sharing (strided in, tiled out)", 2: "sharing (grouped in, interleaved out)",
              3: "sharing (grouped in, tiled out)", 4: "sharing (strided in, interleaved out)",
              6: "rotation (RoPE per block, block-diagonal)"}


def mora_rank(in_features: int, out_features: int, r: int, mora_type: int = 6) -> int:
    """r^, the side of MoRA's square matrix: r^2 ~ LoRA's r (in + out) parameters, rounded as the official code
    does (`int(sqrt((in + out) r) + 0.5)`); the rotation (type 6) needs it even, so it is rounded down to even there,
    as in the RaSA authors' copy of that code (the official one fails on an odd r^)."""
    side = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return side // 2 * 2 if mora_type == 6 else side


@dataclass
class MoraConfig(PeftConfig):
    """Configuration of a MoRA adapter (Jiang et al., 2024, "MoRA: High-rank updating for parameter-efficient
    fine-tuning"): a trainable r^ x r^ matrix between a parameter-free compression of the input and decompression
    of the output, with r^ chosen so that it has the parameters of LoRA at rank `r` (see `mora_rank`)."""

    r: int = field(default=8, metadata={"help": "LoRA's rank whose parameter count MoRA matches (r^ is derived)."})
    mora_type: int = field(
        default=6,
        metadata={"help": "Compression/decompression (official numbering): 1-4 share rows/columns, 6 rotates (the "
                          "MoRA authors' choice for small ranks and the RaSA authors' setting)."},
    )
    mora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to adapt; None or 'all-linear' adapts every linear "
                                        "layer of the decoder blocks."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Module names or a regex to skip."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Set for transformers' Conv1D (weight (in, out))."})
    bias: Literal["none", "all", "mora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained in full."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only these layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    init_weights: bool = field(default=True, metadata={"help": "True: zero matrix (a no-op at start, as the "
                                                               "official code); False: random (tests only)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type_member("mora")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer (the LoRA rank to match), e.g. r=8.")
        if self.mora_type not in MORA_TYPES:
            raise ValueError(f"mora_type={self.mora_type!r} is unknown; choose one of "
                             + ", ".join(f"{k} ({v})" for k, v in MORA_TYPES.items()))
        if not 0.0 <= self.mora_dropout < 1.0:
            raise ValueError(f"mora_dropout={self.mora_dropout} must lie in [0, 1).")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))
