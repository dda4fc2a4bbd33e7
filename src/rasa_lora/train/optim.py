"""Optimizers and the learning-rate schedule of the paper's recipe: decoupled LionW, AdamW, cosine with warmup.

Why LionW is written here: the authors trained with MosaicML's `DecoupledLionW` (composer / llm-foundry), whose
weight decay is `p *= 1 - wd * lr / initial_lr`: it follows the schedule but is not multiplied by the learning rate
itself. Maintained Lions have these semantics when asked: `lion-pytorch`'s `Lion(decoupled_weight_decay=True)` and
torch-optimi's `Lion(decouple_lr=True)` (their default, `1 - lr * wd`, is a ~2000x weaker decay at lr 5e-4), and
`tests/train/test_optim.py` checks this class against lion-pytorch's decoupled mode step for step. It stays here
because the update is ten lines, while a dependency would be one more package on every machine (composer would
bring a whole training framework):

    u = sign(b1 * m + (1 - b1) * g)        # the step direction (b1 = betas[0])
    p = p * (1 - wd * lr / lr_0) - lr * u  # decoupled decay relative to the initial lr, then the step
    m = b2 * m + (1 - b2) * g              # momentum update after the step (b2 = betas[1])

With weight decay 0 (the paper's setting) the two conventions agree. Limits: no fused / foreach kernel (the
adapter's parameters are small), sparse gradients are refused. AdamW is `torch.optim.AdamW` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class DecoupledLionW(torch.optim.Optimizer):
    """Lion (Chen et al., 2023) with MosaicML's decoupled weight decay; see the module docstring for the update.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the peak one: the schedule scales it; the decay is relative to it).
        betas: (b1, b2) - b1 interpolates the step direction, b2 the momentum. The authors used (0.9, 0.95).
        weight_decay: decoupled decay coefficient, applied as `1 - wd * lr / initial_lr` per step.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            decay_factor = lr / group["initial_lr"] if group["initial_lr"] else 1.0
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("DecoupledLionW does not support sparse gradients")
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param)
                momentum, grad = state["exp_avg"], param.grad
                if decay:
                    param.mul_(1 - decay_factor * decay)
                direction = momentum.lerp(grad, 1 - beta1).sign_()
                param.add_(direction, alpha=-lr)
                momentum.lerp_(grad, 1 - beta2)
        return loss


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """The optimizer a config names, over the trainable parameters."""
    trainable = [param for param in parameters if param.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter; check method and target_modules")
    betas = tuple(float(beta) for beta in config.betas)
    if config.optimizer == "lionw":
        return DecoupledLionW(trainable, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay)


def warmup_schedule(step: int, total_steps: int, warmup_steps: int, kind: str = "cosine") -> float:
    """Multiplier of the peak lr at `step`: linear warmup from 1/(warmup+1), then cosine to 0 or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    config: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """LambdaLR with `ceil(warmup_ratio * total_steps)` warmup steps."""
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_schedule(step, total_steps, warmup_steps, config.lr_scheduler)
    )
