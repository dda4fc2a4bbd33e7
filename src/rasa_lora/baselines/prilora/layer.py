r"""The PriLoRA layer: LoRA at this layer's rank r_i, plus the statistics its pruning needs.

    y = x W^T + c + (alpha / r_i) B A dropout(x)        A: (r_i, a) (`prilora_A`), B: (b, r_i) (`prilora_B`)

r_i grows with the layer's depth (`config.layer_rank`). While training, each forward adds the squared column norms
of its input to an accumulator (a,); at each optimizer step the tuner turns it into the step's importance
I = |A| * ||X_col||_2 (one value per entry of A, as Wanda scores weights) and keeps its exponential moving average
(`prilora_importance`, the shape of A: the method's extra memory); every `prune_interval` steps the entries of each
row of A with the lowest averaged importance are set to zero (they may grow back: pruning acts on the current
weights, again and again). The statistics are buffers, not parameters: not trained, not saved with the adapter
(training checkpoints keep them, `PriloraModel.statistics_state`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rasa_lora.baselines.common import DeltaLayer


class PriloraLayer(DeltaLayer):
    adapter_layer_names = ("prilora_A", "prilora_B")
    other_param_names = ("r", "prilora_alpha", "scaling", "prilora_dropout", "input_sq_norm", "prilora_importance",
                         "importance_steps")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_delta_layer(base_layer)
        self.r: dict[str, int] = {}
        self.prilora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.prilora_dropout = nn.ModuleDict({})
        self.prilora_A = nn.ParameterDict({})
        self.prilora_B = nn.ParameterDict({})
        self.input_sq_norm: dict[str, torch.Tensor] = {}  # (a,), summed over this step's tokens
        self.prilora_importance: dict[str, torch.Tensor] = {}  # EMA of |A| * ||X_col||, shape of A
        self.importance_steps: dict[str, int] = {}  # optimizer steps folded into the EMA
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config, rank: int) -> None:
        self.r[adapter_name] = rank
        self.prilora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / rank
        self.prilora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        factory = self.adapter_factory()
        device = factory["device"]
        A = torch.empty(rank, self.in_features, **factory)
        B = torch.zeros(self.out_features, rank, **factory)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if not config.init_weights:
            nn.init.normal_(B, std=0.02)
        self.prilora_A[adapter_name] = nn.Parameter(A)
        self.prilora_B[adapter_name] = nn.Parameter(B)
        self.prilora_importance[adapter_name] = torch.zeros(rank, self.in_features, device=device)
        self.input_sq_norm[adapter_name] = torch.zeros(self.in_features, device=device)
        self.importance_steps[adapter_name] = 0
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delta_weight_float(self, name: str) -> torch.Tensor:
        A, B = self.prilora_A[name], self.prilora_B[name]
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * self.scaling[name]

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.prilora_A[name], self.prilora_B[name]
        x = self._cast_input_dtype(x, A.dtype)
        if self.training and A.requires_grad:
            self._accumulate(name, x)
        return (self.prilora_dropout[name](x) @ A.t() @ B.t()) * self.scaling[name]

    @torch.no_grad()
    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        total = self.input_sq_norm[name]
        if total.device != x.device:
            total = self.input_sq_norm[name] = total.to(x.device)
        total += x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(dim=0)

    @torch.no_grad()
    def update_importance(self, name: str, beta: float) -> None:
        """Fold this step's input statistics into the importance EMA (the first step starts it), then reset them."""
        A = self.prilora_A[name]
        step = A.detach().float().abs() * self.input_sq_norm[name].to(A.device).sqrt()
        seen = self.importance_steps[name]
        average = self.prilora_importance[name].to(A.device)
        self.prilora_importance[name] = step if seen == 0 else beta * average + (1 - beta) * step
        self.importance_steps[name] = seen + 1
        self.input_sq_norm[name].zero_()

    @torch.no_grad()
    def prune(self, name: str, ratio: float) -> int:
        """Zero, in each row of A, the `ratio` fraction of entries with the lowest averaged importance; returns
        how many entries were pruned."""
        A = self.prilora_A[name]
        count = int(ratio * A.shape[1])
        if count == 0 or self.importance_steps[name] == 0:
            return 0
        lowest = self.prilora_importance[name].to(A.device).topk(count, dim=1, largest=False).indices
        A.scatter_(1, lowest, 0.0)
        return lowest.numel()

    def extra_numel(self, name: str) -> int:
        """Size of the importance statistics kept for the adapter (the method's "extra parameters")."""
        return self.prilora_importance[name].numel()


class Linear(nn.Module, PriloraLayer):
    """PriLoRA on an `nn.Linear` or a transformers `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, rank: int) -> None:
        super().__init__()
        PriloraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, rank)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.delta_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "prilora." + super().__repr__()
