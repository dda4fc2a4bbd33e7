"""`PriloraModel`: the PEFT tuner that gives each targeted layer its rank and runs the pruning (`update_and_prune`,
called by the trainer after each optimizer step, as AdaLoRA's `update_and_allocate`)."""

from __future__ import annotations

import re

import torch
from torch import nn

from rasa_lora.baselines.common import DeltaTuner
from rasa_lora.baselines.prilora.config import PriloraConfig, layer_rank
from rasa_lora.baselines.prilora.layer import Linear, PriloraLayer

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def plan_ranks(module_paths: list[str], config: PriloraConfig) -> dict[str, int]:
    """Rank of each targeted module: by the position of its layer index among the targeted layers' indices
    (modules outside numbered layers get r)."""
    index_of = {path: int(m.group(1)) for path in module_paths if (m := _LAYER_INDEX.search(path))}
    layers = sorted(set(index_of.values()))
    position = {layer: i for i, layer in enumerate(layers)}
    return {path: layer_rank(position[index_of[path]], len(layers), config.r_start, config.r_end)
            if path in index_of else config.r for path in module_paths}


class PriloraModel(DeltaTuner):
    """Creates PriLoRA adapters on a model; use it through `peft.get_peft_model(model, PriloraConfig(...))`."""

    prefix: str = "prilora_"
    tuner_layer_cls = PriloraLayer
    layer_cls = Linear

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Plan the ranks (here, not in `_pre_injection_hook`: `PeftModel.add_adapter` skips that hook), then
        inject. A config loaded from a saved adapter keeps its ranks."""
        config = self.peft_config[adapter_name]
        if not config.rank_pattern:
            from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

            planned = _maybe_include_all_linear_layers(self._prepare_adapter_config(config, {}), model)
            paths = []
            for key, _ in model.named_modules():
                found = self._check_target_module_exists(planned, key) if key else False
                if found and type(found).__name__ != "_ExcludedModule":
                    paths.append(key)
            config.rank_pattern = plan_ranks(paths, config)
        super().inject_adapter(model, adapter_name, **kwargs)

    def layer_kwargs(self, config: PriloraConfig, adapter_name: str, current_key: str) -> dict:
        return {"rank": config.rank_pattern.get(current_key, config.r)}

    def update_and_prune(self, step: int, adapter_name: str | None = None) -> int:
        """After optimizer step `step` (1-based): update the importance statistics and, every `prune_interval`
        steps, prune. Returns the number of entries of A set to zero."""
        names = [adapter_name] if adapter_name else list(self.active_adapters)
        self._sum_statistics_over_processes(names)
        pruned = 0
        for module in self.model.modules():
            if not isinstance(module, PriloraLayer):
                continue
            for name in names:
                if name not in module.prilora_A:
                    continue
                config = self.peft_config[name]
                module.update_importance(name, config.importance_beta)
                if config.prune_interval and step % config.prune_interval == 0:
                    pruned += module.prune(name, config.prune_ratio)
        return pruned

    def _sum_statistics_over_processes(self, names: list[str]) -> None:
        """Under data parallelism each process saw its own inputs: sum them (one all-reduce) so that every process
        prunes the same entries and the replicas of A stay equal."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        totals = [m.input_sq_norm[name] for m in self.model.modules() if isinstance(m, PriloraLayer)
                  for name in names if name in m.input_sq_norm]
        if totals:
            flat = torch.cat(totals)
            dist.all_reduce(flat)
            for total, summed in zip(totals, flat.split([t.numel() for t in totals])):
                total.copy_(summed)

    def statistics_state(self) -> dict[str, dict]:
        """The pruning statistics of every layer and adapter (training checkpoints keep them: a resumed run prunes
        as an uninterrupted one would)."""
        state = {}
        for path, module in self.model.named_modules():
            if isinstance(module, PriloraLayer):
                state[path] = {name: (module.prilora_importance[name].detach().cpu().clone(),
                                      module.input_sq_norm[name].detach().cpu().clone(),
                                      module.importance_steps[name]) for name in module.prilora_importance}
        return state

    def load_statistics_state(self, state: dict[str, dict]) -> None:
        modules = dict(self.model.named_modules())
        for path, adapters in state.items():
            module = modules[path]
            for name, (importance, sq_norm, steps) in adapters.items():
                device = module.prilora_A[name].device
                module.prilora_importance[name] = importance.to(device)
                module.input_sq_norm[name] = sq_norm.to(device)
                module.importance_steps[name] = steps

    def extra_numel(self, adapter_name: str = "default") -> int:
        """Size of the importance statistics kept for the adapter (the paper's "# Extra Param.")."""
        return sum(m.extra_numel(adapter_name) for m in self.model.modules()
                   if isinstance(m, PriloraLayer) and adapter_name in m.prilora_A)
