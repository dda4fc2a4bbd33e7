"""Compress a full fine-tune into a RaSA adapter: fit RaSA factors to dW = W_tuned - W_base, save a PEFT adapter.

For every group the factors come from `fit_rasa` with the analysis' start and convergence criterion (default
``"auto"``: the data start, Theorem 3.1's construction and a random start, the best kept, so never worse than
LoRA's best at the same rank; each start runs until the error falls by less than `tol` per iteration). The
adapter is built with `peft.get_peft_model(base, RasaConfig(r, rasa_k, target_modules=<the fitted modules>))`
and the fitted factors are copied into the parameters of DEVELOPERS.md's contract:

    rasa_A[name] = A~_i (r-k, a),   rasa_B[name] = B~_i (b, r-k),   rasa_D[name] = [ones(r-k), d_i]
    tuner.rasa_shared_A[name][pool_key(group)] = A_S (L*k, a),  tuner.rasa_shared_B[...] = B_S (b, L*k)

that is, eq. 11's D_i (on the shared part only) becomes eq. 5's D_i with ones on the private ranks, the
private scale staying inside B~_i = U S^1/2 and A~_i = S^1/2 V^T. Each layer's `get_delta_weight` is checked
against the fitted reconstruction before saving. The adapter is saved in float32.

Limits: the fit needs every targeted group's deltas (L, b, a) in memory of the chosen device, one group at a
time; the base model is loaded once more (in float32) to build the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rasa_lora.analysis.reconstruction import (
    DEFAULT_INIT,
    DEFAULT_MAX_ITERS,
    DEFAULT_TOL,
    RasaFactors,
    fit_rasa,
    lora_solution,
)
from rasa_lora.analysis.sources import Group, checkpoint_groups
from rasa_lora.atomic import write_atomic


@dataclass
class FittedGroup:
    name: str
    modules: list[str]
    factors: RasaFactors
    lora_error: float
    rasa_error: float
    total_energy: float
    start: str = ""
    iterations: int = 0
    converged: bool = False
    start_spread: float = 0.0


def fit_groups(groups: Sequence[Group] | object, r: int, k: int, iters: int = DEFAULT_MAX_ITERS,
               init: str = DEFAULT_INIT, variant: str = "fast", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0, tol: float = DEFAULT_TOL,
               restarts: int = 1) -> list[FittedGroup]:
    """Fit RaSA to each group; factors come back on the CPU in float32."""
    fitted = []
    for group in groups:
        M = group.deltas.to(device=device, dtype=dtype)
        lora = lora_solution(M, r, variant, seed=seed)
        result = fit_rasa(M, r, k, iters, init=init, variant=variant, dtype=dtype, seed=seed, lora=lora, tol=tol,
                          restarts=restarts)
        fitted.append(FittedGroup(group.name, group.modules, result.factors.to(torch.float32, "cpu"),
                                  result.lora_error, result.final_error, result.total_energy, result.init,
                                  result.iterations, result.converged, result.start_spread))
    return fitted


def build_adapter(base_model, fitted: Sequence[FittedGroup], r: int, k: int, adapter_name: str = "default",
                  alpha: float = 8.0):
    """Wrap `base_model` in a RaSA PeftModel whose factors are the fitted ones; returns the PeftModel."""
    from peft import get_peft_model

    from rasa_lora import RasaConfig

    targets = [module for group in fitted for module in group.modules]
    config = RasaConfig(r=r, rasa_k=k, rasa_alpha=alpha, target_modules=targets)
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    tuner = model.base_model
    with torch.no_grad():
        for group in fitted:
            adapter_D = group.factors.adapter_D()
            for i, module_name in enumerate(group.modules):
                layer = tuner.model.get_submodule(module_name)
                A_p, B_p = layer.private_factors(adapter_name)  # zero-element (not registered) when k = r
                _copy(A_p, group.factors.private_A[i], module_name)
                _copy(B_p, group.factors.private_B[i], module_name)
                _copy(layer.rasa_D[adapter_name], adapter_D[i], module_name)
            first = tuner.model.get_submodule(group.modules[0])
            A_s, B_s = first.shared_factors(adapter_name)  # zero-element (no pool) when k = 0
            _copy(A_s, group.factors.shared_A, group.name)
            _copy(B_s, group.factors.shared_B, group.name)
    return model


def _copy(parameter: torch.nn.Parameter, value: torch.Tensor, where: str) -> None:
    if tuple(parameter.shape) != tuple(value.shape):
        raise ValueError(f"{where}: the adapter expects shape {tuple(parameter.shape)} but the fit has "
                         f"{tuple(value.shape)}; were r, k or the layer count changed between fit and build?")
    parameter.copy_(value.to(parameter))


@torch.no_grad()
def check_adapter(model, fitted: Sequence[FittedGroup], adapter_name: str = "default") -> float:
    """Largest |get_delta_weight - fitted reconstruction|, relative to the largest fitted entry."""
    worst = 0.0
    for group in fitted:
        reconstruction = group.factors.reconstruct()
        scale = float(reconstruction.abs().max()) or 1.0
        for i, module_name in enumerate(group.modules):
            layer = model.base_model.model.get_submodule(module_name)
            delta = layer.get_delta_weight(adapter_name).float().cpu()
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            worst = max(worst, float((delta - reconstruction[i]).abs().max()) / scale)
    return worst


def compress(base: str, tuned: str, out_dir: str | Path, r: int = 8, k: int = 1, iters: int = DEFAULT_MAX_ITERS,
             init: str = DEFAULT_INIT, targets: Sequence[str] | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0, tol: float = DEFAULT_TOL,
             restarts: int = 1) -> dict:
    """Fit and save; returns the summary also written to OUT/compress.json."""
    from rasa_lora.models import load_model

    fitted = fit_groups(checkpoint_groups(base, tuned, targets), r, k, iters, init, "fast", device, dtype, seed,
                        tol, restarts)
    model = build_adapter(load_model(base), fitted, r, k)
    mismatch = check_adapter(model, fitted)
    if mismatch > 1e-4:
        raise RuntimeError(f"The built adapter's delta weights differ from the fit by {mismatch:.2e} (relative); "
                           "this is a bug in the factor mapping, please report it.")
    model.save_pretrained(str(out_dir))
    summary = {
        "base": str(base), "tuned": str(tuned), "r": r, "k": k, "iters": iters, "init": init, "tol": tol,
        "restarts": restarts, "adapter_vs_fit_max_relative_difference": mismatch,
        "groups": {g.name: {"num_layers": len(g.modules), "lora_relative_error": g.lora_error / g.total_energy,
                            "rasa_relative_error": g.rasa_error / g.total_energy, "rasa_start": g.start,
                            "iterations": g.iterations, "converged": g.converged, "start_spread": g.start_spread}
                   for g in fitted},
        "lora_relative_error": sum(g.lora_error for g in fitted) / sum(g.total_energy for g in fitted),
        "rasa_relative_error": sum(g.rasa_error for g in fitted) / sum(g.total_energy for g in fitted),
    }
    write_atomic(Path(out_dir) / "compress.json", json.dumps(summary, indent=1))
    return summary
