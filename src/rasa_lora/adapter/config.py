"""`RasaConfig`: the configuration of a RaSA adapter, with the field names of the authors' code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from rasa_lora.adapter.registration import ensure_peft_type_member


def default_rasa_k(r: int) -> int:
    """The paper's default number of shared ranks per layer (Sec. 4.1): k = max(r / 8, 1)."""
    return max(r // 8, 1)


def check_ranks(r, rasa_k) -> int:
    """RaSA's rank settings checked, the one place for it (`RasaConfig`, and `TrainConfig` through it): r a
    positive integer, rasa_k an integer in 0..r, None for the paper's default. Returns rasa_k."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r} must be a positive integer (LoRA's rank), e.g. r=8.")
    if rasa_k is None:
        return default_rasa_k(r)
    if not isinstance(rasa_k, int) or rasa_k < 0:
        raise ValueError(f"rasa_k={rasa_k!r} must be an integer with 0 <= rasa_k <= r={r}.")
    if rasa_k > r:
        raise ValueError(f"rasa_k={rasa_k} is larger than r={r}; choose 0 <= rasa_k <= r.")
    return rasa_k


@dataclass
class RasaConfig(PeftConfig):
    """Configuration of a RaSA adapter (Rank-Sharing Low-Rank Adaptation, ICLR 2025).

    Each targeted layer keeps r - k private ranks and lends k ranks to a pool shared by the L layers of its
    group (all modules with the same path once the layer index is removed, e.g. every `mlp.down_proj`);
    every layer then uses r - k + L*k ranks, weighted by its own trainable diagonal D_i.

    Field names follow the authors' code (`r`, `rasa_k`, `rasa_alpha`, `rasa_dropout`, ...). Three defaults differ
    from their fork's: `r` (8 here, 256 there), `rasa_k` (max(r // 8, 1) here, 1 there) and `target_modules=None`
    (every linear layer of the blocks here; PEFT's LoRA list for the architecture there, q_proj and v_proj on
    Llama). A config file written by their fork (it has no `init_weights` key) is read with their defaults, and
    their checkpoints load converted (`rasa_lora.adapter.authors`), so their saved adapters work unchanged.
    """

    r: int = field(default=8, metadata={"help": "Rank of each layer's update before sharing (LoRA's r)."})
    rasa_k: int | None = field(
        default=None, metadata={"help": "Ranks each layer gives to the shared pool; None means max(r // 8, 1)."}
    )
    rasa_alpha: float = field(
        default=8.0, metadata={"help": "Scale alpha; D_i starts at alpha/(2(r-k)) and alpha/(2Lk). Not LoRA's alpha: "
                               "rasa_lora.step_size.matched_alpha gives the one whose step equals a LoRA's."}
    )
    rasa_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter's input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt; 'all-linear' or None adapts every linear layer of the "
            "decoder blocks (the output layer excluded)."
        },
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "3-D expert parameters to adapt, as PEFT's LoRA names them (e.g. ['mlp.experts.gate_up_proj', "
            "'mlp.experts.down_proj'] for Mixtral in transformers >= 5): each expert of each layer gets eq. 5, with "
            "one pool per expert index across layers (rasa_lora.adapter.experts). With target_parameters and "
            "target_modules=None, no module is adapted; name modules too to adapt both."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Module names or a regex to skip."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the layer stores its weight as (in, out), as GPT-2's Conv1D does."}
    )
    bias: Literal["none", "all", "rasa_only"] = field(default="none", metadata={"help": "Which biases to train."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train in full and save with the adapter."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h'), used with layers_to_transform."}
    )
    default_targets: Literal["all-linear", "lora"] = field(
        default="all-linear",
        metadata={
            "help": "What target_modules=None adapts: 'all-linear' (this package's default) or 'lora' (PEFT's LoRA "
            "modules for the architecture, q_proj and v_proj on Llama: the authors' fork's default)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the paper's init (Kaiming-uniform A, zero B, D by eq. 6), so the adapter starts as a "
            "no-op. False: random B too (for tests only)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type_member()
        self.rasa_k = check_ranks(self.r, self.rasa_k)
        if not 0.0 <= self.rasa_dropout < 1.0:
            raise ValueError(f"rasa_dropout={self.rasa_dropout} must lie in [0, 1).")
        if self.bias not in ("none", "all", "rasa_only"):
            raise ValueError(f"bias={self.bias!r}; choose 'none', 'all' or 'rasa_only'.")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str):
                self.target_parameters = [self.target_parameters]
            self.target_parameters = list(self.target_parameters)
            if self.target_modules is None:
                self.target_modules = set()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))
        if self.default_targets not in ("all-linear", "lora"):
            raise ValueError(f"default_targets={self.default_targets!r}; choose 'all-linear' or 'lora'.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform; set both or neither.")

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Called by `from_pretrained` on the saved config: a config file of the authors' fork is read with their
        defaults (see the class docstring)."""
        from rasa_lora.adapter.authors import check_authors_config, is_authors_config

        kwargs = super().check_kwargs(**kwargs)
        return check_authors_config(kwargs) if is_authors_config(kwargs) else kwargs

    @property
    def num_private_ranks(self) -> int:
        return self.r - self.rasa_k
