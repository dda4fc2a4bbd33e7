"""One code path from a recipe to a trainable model: RaSA, PEFT's baselines, or full fine-tuning.

| method  | built with                                                        | alpha / dropout used as |
| ------- | ----------------------------------------------------------------- | ----------------------- |
| rasa    | `rasa_lora.RasaConfig(r, rasa_k, rasa_alpha, rasa_dropout)`       | D's init / input dropout |
| lora    | `peft.LoraConfig(r, lora_alpha, lora_dropout)`                    | alpha / r               |
| olora   | `LoraConfig(init_lora_weights="olora")` (QR init; moves base)     | alpha / r               |
| pissa   | `LoraConfig(init_lora_weights="pissa")` (SVD init; moves base)    | alpha / r               |
| dora    | `LoraConfig(use_dora=True)`                                       | alpha / r               |
| vera    | `peft.VeraConfig(r, vera_dropout)` (shared frozen random A, B)    | - / dropout             |
| adalora | `peft.AdaLoraConfig(init_r=ceil(1.5 r), target_r=r, total_step)` | alpha / dropout         |
| mora    | `rasa_lora.MoraConfig(r, mora_type, mora_dropout)` (r^ x r^ matrix) | - / dropout             |
| prilora | `rasa_lora.PriloraConfig(r, lora_alpha, lora_dropout, prune_*)`   | alpha / r_i / dropout   |
| fft     | every parameter trainable, no adapter                             | - / -                   |

Choices: the baselines are PEFT's own implementations, never re-written here. AdaLoRA's initial rank keeps
PEFT's default ratio (init_r 12 for target_r 8) and its budget schedule needs `total_step`, so the model is
built knowing the number of optimizer steps; the trainer calls `update_and_allocate` after each step. OLoRA and
PiSSA rewrite the base weights at init; `initial_adapter_needed` tells the trainer to keep the initial adapter so
the final one can be converted (PEFT's `path_initial_model_for_weight_conversion`) into a plain LoRA adapter that
applies to the untouched base model. MoRA and PriLoRA are not in PEFT: they are this package's
(`rasa_lora.baselines`); PriLoRA's pruning runs after each optimizer step (`after_optimizer_step`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rasa_lora.train.config import CONVERTED_ON_SAVE, UNSUPPORTED_METHODS


def peft_config_for(config: Any, total_steps: int) -> Any:
    """The PEFT config object of an adapter method (not for fft)."""
    import peft

    common = {"r": config.r, "target_modules": list(config.target_modules)}
    experts = list(getattr(config, "target_parameters", None) or [])
    if config.method == "rasa":
        import rasa_lora

        return rasa_lora.RasaConfig(**common, rasa_k=config.shared_ranks, rasa_alpha=config.alpha,
                                    rasa_dropout=config.dropout, task_type="CAUSAL_LM",
                                    **({"target_parameters": experts} if experts else {}))
    if config.method in ("mora", "prilora"):
        import rasa_lora

        if config.method == "mora":
            return rasa_lora.MoraConfig(**common, mora_type=config.mora_type, mora_dropout=config.dropout,
                                        task_type="CAUSAL_LM")
        return rasa_lora.PriloraConfig(**common, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                       prune_ratio=config.prilora_prune_ratio,
                                       prune_interval=config.prilora_prune_interval, task_type="CAUSAL_LM")
    if config.method == "vera":
        return peft.VeraConfig(**common, vera_dropout=config.dropout, task_type="CAUSAL_LM")
    if config.method == "adalora":
        return peft.AdaLoraConfig(target_modules=common["target_modules"], target_r=config.r,
                                  init_r=math.ceil(1.5 * config.r), total_step=total_steps, lora_alpha=config.alpha,
                                  lora_dropout=config.dropout, task_type="CAUSAL_LM")
    init = {"lora": True, "dora": True, "olora": "olora", "pissa": "pissa"}
    if config.method not in init:
        hint = UNSUPPORTED_METHODS.get(config.method, "unknown method")
        raise NotImplementedError(f"method={config.method!r} is not yet supported ({hint})")
    return peft.LoraConfig(**common, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           init_lora_weights=init[config.method], use_dora=config.method == "dora",
                           task_type="CAUSAL_LM", **({"target_parameters": experts} if experts else {}))


def initial_adapter_needed(method: str) -> bool:
    """OLoRA and PiSSA move the base weights; their final adapter is converted against the initial one."""
    return method in CONVERTED_ON_SAVE


def apply_method(model: torch.nn.Module, config: Any, total_steps: int) -> torch.nn.Module:
    """Wrap `model` for training with `config.method` (seeded, so the adapter's init is reproducible)."""
    torch.manual_seed(config.seed)
    if config.method == "fft":
        model.requires_grad_(True)
        return model
    import warnings

    import peft

    with warnings.catch_warnings():
        # PEFT (0.21.x) asks transformers' deprecated `is_gradient_checkpointing`: a FutureWarning users cannot act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, peft_config_for(config, total_steps))


def enable_gradient_checkpointing(model: torch.nn.Module, use_reentrant: bool) -> None:
    """Checkpoint each decoder layer; the reentrant form needs inputs that require grad to reach the adapters."""
    import inspect

    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers: the older name warns
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "config"):
        model.config.use_cache = False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once. Sharded parameters count whole: a
    DTensor's numel is its global one, and a ZeRO-3 partitioned parameter (whose local data is empty outside a
    gather) carries its full count as `ds_numel`."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = getattr(param, "ds_numel", None) or param.numel()
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every trainable parameter (what a checkpoint must restore)."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def after_optimizer_step(model: torch.nn.Module, config: Any, step: int) -> None:
    """Per-step hooks of methods that have one (AdaLoRA's rank budget, PriLoRA's statistics and pruning)."""
    if config.method == "adalora":
        model.base_model.update_and_allocate(step)
    elif config.method == "prilora":
        model.base_model.update_and_prune(step)
