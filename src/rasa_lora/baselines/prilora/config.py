"""`PriloraConfig`: the configuration of a PriLoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from rasa_lora.adapter.registration import ensure_peft_type_member


def layer_rank(index: int, num_layers: int, r_start: float, r_end: float) -> int:
    """Rank of layer `index` (0-based) of `num_layers`: linear from r_start to r_end in steps of
    (r_end - r_start) / L, the last layer at r_end, rounded half to even (Python's `round`, so the ranks add up to
    the unrounded values' sum). With r_start = r/2 and r_end = 3r/2 that sum is L r + r/2, which gives the RaSA
    paper's PriLoRA counts (Table 2: 21.3M / 42.6M / 85.2M at r = 8 / 16 / 32 on Llama-3.1-8B); a ramp that starts
    exactly at r_start sums to L r (LoRA's 21.0M), rounding halves up to L r + 4 at r = 8 (21.6M)."""
    return max(1, round(r_start + (r_end - r_start) * (index + 1) / num_layers))


@dataclass
class PriloraConfig(PeftConfig):
    """Configuration of a PriLoRA adapter (Benedek & Wolf, Findings of EACL 2024, "PRILoRA: Pruned and
    rank-increasing low-rank adaptation"): LoRA whose rank grows linearly with the layer's depth, with A pruned
    during training by an importance that combines |A| with statistics of the layer's input."""

    r: int = field(default=8, metadata={"help": "Mean rank (LoRA's r of the same budget)."})
    r_start: float | None = field(default=None, metadata={"help": "Rank at the bottom of the ramp; None: r / 2."})
    r_end: float | None = field(default=None, metadata={"help": "Rank of the last layer; None: 3 r / 2."})
    lora_alpha: float = field(default=8.0, metadata={"help": "Scale numerator: the update is (alpha / r_i) B A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    prune_ratio: float = field(default=0.5, metadata={"help": "Fraction of each row of A zeroed at a pruning step."})
    prune_interval: int = field(default=10, metadata={"help": "Prune every this many optimizer steps (0: never)."})
    importance_beta: float = field(default=0.85, metadata={"help": "EMA factor of the importance statistics."})
    rank_pattern: dict = field(default_factory=dict, metadata={
        "help": "Module path -> rank, filled when the adapter is created (saved, so loading rebuilds the ranks)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to adapt; None or 'all-linear': every linear layer "
                                        "of the decoder blocks."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Module names or a regex to skip."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Set for transformers' Conv1D (weight (in, out))."})
    bias: Literal["none", "all", "prilora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained in full."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only these layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    init_weights: bool = field(default=True, metadata={"help": "True: Kaiming-uniform A, zero B (LoRA's init); "
                                                               "False: random B too (tests only)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type_member("prilora")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer (the mean rank), e.g. r=8.")
        self.r_start = self.r / 2 if self.r_start is None else self.r_start
        self.r_end = 3 * self.r / 2 if self.r_end is None else self.r_end
        if not 0 < self.r_start <= self.r_end:
            raise ValueError(f"r_start={self.r_start} and r_end={self.r_end} must satisfy 0 < r_start <= r_end "
                             "(the rank increases with depth).")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio={self.prune_ratio} must lie in [0, 1).")
        if self.prune_interval < 0:
            raise ValueError(f"prune_interval={self.prune_interval} must be >= 0 (0 turns pruning off).")
        if not 0.0 <= self.importance_beta < 1.0:
            raise ValueError(f"importance_beta={self.importance_beta} must lie in [0, 1).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must lie in [0, 1).")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))
