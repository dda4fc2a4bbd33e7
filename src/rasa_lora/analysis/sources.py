"""Where the matrices {M_i} come from: groups of per-layer weight deltas dW_i, one group per module type.

A *group* is every weight whose module path is the same once the layer index is removed, e.g.
`model.layers.*.self_attn.q_proj` (the first integer component of the path is the layer index; matrices are
kept in layer order). Three sources:

(a) `checkpoint_groups(base, tuned)`: dW_i = W_tuned - W_base for two checkpoints of one architecture. A
    checkpoint is anything `rasa_lora.models.resolve_model` accepts (directory, hub name, `.gguf` file, or
    "smollm2" for the embedded default). safetensors directories are read lazily, one group at a time, so
    an 8B model never sits in memory twice; GGUF files and hub names are loaded whole through `load_model`.
(b) `adapter_groups(adapter_dir, base)`: dW_i of a LoRA or RaSA adapter, from PEFT's own `get_delta_weight`
    (so alpha, rsLoRA, rank patterns and RaSA's shared pools are all taken into account).
(c) `synthetic_groups(shapes, num_layers, seed)`: seeded layer-correlated high-rank matrices
    M_i = U_S diag(c_i) V_S^T + U_i diag(s) V_i^T + noise * G_i (a basis shared by all layers with per-layer
    weights, a private low-rank part, and full-rank Gaussian noise), generated on the requested device.

Every delta is returned as float32 (or the dtype asked for) in the base weight's `(out, in)` layout; a
`Conv1D` weight (GPT-2 style, stored `(in, out)`) is transposed so that all groups read `(b, a)`.
Errors name the bad input: different architectures, shapes or module sets, no targeted weights, NaN.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.)")

# Shapes (out, in) of the seven projections of two real architectures, with their layer counts.
PRESETS: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {
    "llama3-8b": (32, {
        "model.layers.*.self_attn.q_proj": (4096, 4096), "model.layers.*.self_attn.k_proj": (1024, 4096),
        "model.layers.*.self_attn.v_proj": (1024, 4096), "model.layers.*.self_attn.o_proj": (4096, 4096),
        "model.layers.*.mlp.gate_proj": (14336, 4096), "model.layers.*.mlp.up_proj": (14336, 4096),
        "model.layers.*.mlp.down_proj": (4096, 14336)}),
    "smollm2-135m": (30, {
        "model.layers.*.self_attn.q_proj": (576, 576), "model.layers.*.self_attn.k_proj": (192, 576),
        "model.layers.*.self_attn.v_proj": (192, 576), "model.layers.*.self_attn.o_proj": (576, 576),
        "model.layers.*.mlp.gate_proj": (1536, 576), "model.layers.*.mlp.up_proj": (1536, 576),
        "model.layers.*.mlp.down_proj": (576, 1536)}),
    "tiny": (16, {"layers.*.attn": (48, 40), "layers.*.mlp": (64, 40)}),
}


@dataclass
class Group:
    """One module type: `deltas[i]` is dW of `modules[i]`, shape (L, b, a)."""

    name: str
    modules: list[str]
    deltas: Tensor


class GroupStream:
    """Groups made one at a time when iterated (one group's deltas in memory), with their count known ahead
    (`len`), so that progress bars have a total."""

    def __init__(self, names: dict[str, list[str]], make: Callable[[str, list[str]], Group]) -> None:
        self.names, self._make = names, make

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Group]:
        for name, members in self.names.items():
            yield self._make(name, members)


def split_layer_index(name: str) -> tuple[str, int] | None:
    """`model.layers.12.mlp.up_proj` -> (`model.layers.*.mlp.up_proj`, 12); None for a path without an index."""
    match = _LAYER_INDEX.search(name + ".")
    if match is None:
        return None
    return name[:match.start()] + ".*" + name[match.end():], int(match.group(1))


def _matches(module: str, targets: Sequence[str] | None) -> bool:
    """A module is targeted when `targets` is None or its last path component (or its full path) is listed."""
    return targets is None or module.rsplit(".", 1)[-1] in targets or module in targets


def group_names(names: Sequence[str], targets: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Group module paths (no `.weight` suffix) by path without the layer index, each list in layer order."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for module in names:
        split = split_layer_index(module)
        if split is not None and _matches(module, targets):
            groups.setdefault(split[0], []).append((split[1], module))
    return {key: [module for _, module in sorted(members)] for key, members in sorted(groups.items())}


# ------------------------------------------------------------------------------------ (a) checkpoints


class WeightSource:
    """Read access to the 2-D weights of one checkpoint: lazily from safetensors, else via `load_model`."""

    def __init__(self, name_or_path: str | Path | None) -> None:
        from rasa_lora.models import resolve_model

        self.label = str(name_or_path)
        source, gguf_file = resolve_model(name_or_path)
        directory = Path(source)
        self.config = _read_config(directory) if directory.is_dir() else {}
        self._files = sorted(directory.glob("*.safetensors")) if directory.is_dir() and not gguf_file else []
        self._index: dict[str, Path] = {}
        self._state: dict[str, Tensor] = {}
        if self._files:
            from safetensors import safe_open

            for file in self._files:
                with safe_open(file, framework="pt") as handle:
                    self._index.update(dict.fromkeys(handle.keys(), file))
        else:
            from rasa_lora.models import load_model

            model = load_model(name_or_path)
            self.config = self.config or model.config.to_dict()
            # A tied weight (SmolLM2's lm_head is its embedding) once, under its first name: `save_pretrained` writes
            # it so, and the other side of a comparison may be such a folder (a full fine-tune of a GGUF base).
            self._state, seen = {}, set()
            for key, value in model.state_dict().items():
                storage = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
                if storage not in seen or value.numel() == 0:
                    seen.add(storage)
                    self._state[key] = value.detach()
        self.weights = sorted(key for key in (self._index or self._state) if key.endswith(".weight"))

    def get(self, key: str) -> Tensor:
        if self._state:
            return self._state[key]
        from safetensors import safe_open

        with safe_open(self._index[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._state:
            return tuple(self._state[key].shape)
        from safetensors import safe_open

        with safe_open(self._index[key], framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_same_architecture(base: WeightSource, tuned: WeightSource) -> None:
    base_type, tuned_type = base.config.get("model_type"), tuned.config.get("model_type")
    if base_type and tuned_type and base_type != tuned_type:
        raise ValueError(f"The checkpoints have different architectures: base {base.label!r} is {base_type!r}, "
                         f"tuned {tuned.label!r} is {tuned_type!r}. Compare a model with its own fine-tune.")
    missing = sorted(set(base.weights) ^ set(tuned.weights))
    if missing:
        raise ValueError(f"The checkpoints hold different weights ({len(missing)} differ, e.g. {missing[:3]}): "
                         f"{base.label!r} and {tuned.label!r} are not the same architecture.")


def checkpoint_groups(base: str | Path | None, tuned: str | Path | None, targets: Sequence[str] | None = None,
                      dtype: torch.dtype = torch.float32) -> GroupStream:
    """The groups of dW = W_tuned - W_base, made one at a time (see the module docstring); the checkpoints
    are checked at the call."""
    base_source, tuned_source = WeightSource(base), WeightSource(tuned)
    _check_same_architecture(base_source, tuned_source)
    modules = [key[: -len(".weight")] for key in base_source.weights if len(base_source.shape(key)) == 2]
    groups = group_names(modules, targets)
    if not groups:
        raise ValueError(f"No 2-D layer weight of {base_source.label!r} matches targets={list(targets or [])}; "
                         "name module types such as q_proj, or pass no targets for all of them.")
    transpose = "gpt2" in str(base_source.config.get("model_type", ""))

    def make(name: str, members: list[str]) -> Group:
        return Group(name, members, torch.stack([_delta(base_source, tuned_source, module, dtype, transpose)
                                                 for module in members]))

    return GroupStream(groups, make)


def _delta(base: WeightSource, tuned: WeightSource, module: str, dtype: torch.dtype, transpose: bool) -> Tensor:
    key = module + ".weight"
    if base.shape(key) != tuned.shape(key):
        raise ValueError(f"{key} has shape {base.shape(key)} in {base.label!r} but {tuned.shape(key)} in "
                         f"{tuned.label!r}: the checkpoints are not the same architecture.")
    delta = tuned.get(key).to(dtype) - base.get(key).to(dtype)
    if not torch.isfinite(delta).all():
        raise ValueError(f"{key}: the weight delta holds NaN or infinite values (base {base.label!r}, tuned "
                         f"{tuned.label!r}); check the checkpoints.")
    return delta.T if transpose else delta


# --------------------------------------------------------------------------------------- (b) adapters


def adapter_groups(adapter_dir: str | Path, base: str | Path | None = None,
                   dtype: torch.dtype = torch.float32) -> list[Group]:
    """The dW_i of a LoRA or RaSA adapter, grouped; `base` defaults to the adapter's `base_model_name_or_path`."""
    from peft import PeftConfig, PeftModel

    import rasa_lora  # noqa: F401  (registers RaSA with PEFT before the adapter is read)
    from rasa_lora.models import load_model

    config = PeftConfig.from_pretrained(str(adapter_dir))
    base = base if base is not None else config.base_model_name_or_path
    model = PeftModel.from_pretrained(load_model(base), str(adapter_dir))
    name = model.active_adapter
    deltas: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and name in getattr(module, "active_adapters", [name]):
            with torch.no_grad():
                delta = module.get_delta_weight(name).to(dtype)
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            deltas[module_name.removeprefix("base_model.model.")] = delta
    groups = group_names(list(deltas))
    if not groups:
        raise ValueError(f"The adapter in {str(adapter_dir)!r} adapts no per-layer module; nothing to analyse.")
    return [Group(key, members, torch.stack([deltas[m] for m in members])) for key, members in groups.items()]


# -------------------------------------------------------------------------------------- (c) synthetic


def synthetic_groups(shapes: dict[str, tuple[int, int]], num_layers: int, seed: int = 0, shared_rank: int = 32,
                     private_rank: int = 16, noise: float = 0.5, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> Iterator[Group]:
    """Yield seeded layer-correlated high-rank groups, M_i = U_S diag(c_i) V_S^T + U_i diag(s) V_i^T + noise G_i.

    U_S, V_S, U_i, V_i have N(0, 1/dim) entries (near-orthonormal columns); c_i = |N(0, 1)| * j^-1/2 for
    shared direction j, s_j = j^-1/2 for private direction j, and G_i has N(0, 1/max(b, a)) entries, so each
    of the three parts has a spectral scale of about 1 and `noise` sets the full-rank part's weight.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: a group needs at least one layer.")
    for index, (name, (b, a)) in enumerate(shapes.items()):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1000 + index)
        yield Group(name, [name.replace("*", str(i)) for i in range(num_layers)],
                    _synthetic_stack(num_layers, b, a, shared_rank, private_rank, noise, gen, device, dtype))


def _synthetic_stack(L: int, b: int, a: int, shared_rank: int, private_rank: int, noise: float,
                     gen: torch.Generator, device: str | torch.device, dtype: torch.dtype) -> Tensor:
    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    decay_shared = torch.arange(1, shared_rank + 1, device=device, dtype=dtype).rsqrt()
    decay_private = torch.arange(1, private_rank + 1, device=device, dtype=dtype).rsqrt()
    U_shared, V_shared = randn(b, shared_rank) / b ** 0.5, randn(shared_rank, a) / a ** 0.5
    weights = randn(L, shared_rank).abs() * decay_shared
    M = noise / max(a, b) ** 0.5 * randn(L, b, a)
    M += U_shared @ (weights[:, :, None] * V_shared)
    M += (randn(L, b, private_rank) / b ** 0.5 * decay_private) @ (randn(L, private_rank, a) / a ** 0.5)
    return M


def preset_shapes(name: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """(num_layers, {group: (b, a)}) of a preset: one of `PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"Unknown shape preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def perturbation_groups(base: str | Path | None, seed: int = 0, relative_scale: float = 0.01,
                        targets: Sequence[str] | None = None, **synthetic_kwargs) -> GroupStream:
    """A seeded stand-in for a fine-tune of `base`: synthetic deltas with the shapes of its layer weights,
    each group scaled so that ||dW_i||_F is on average `relative_scale` * ||W_i||_F."""
    source = WeightSource(base)
    modules = [key[: -len(".weight")] for key in source.weights if len(source.shape(key)) == 2]
    groups = group_names(modules, targets)
    if not groups:
        raise ValueError(f"No 2-D layer weight of {source.label!r} matches targets={list(targets or [])}.")
    index = {name: number for number, name in enumerate(groups)}

    def make(name: str, members: list[str]) -> Group:
        b, a = source.shape(members[0] + ".weight")
        group = next(synthetic_groups({name: (b, a)}, len(members), seed * 1000 + index[name], **synthetic_kwargs))
        weight_norm = sum(float(source.get(m + ".weight").float().norm()) for m in members) / len(members)
        group.deltas *= relative_scale * weight_norm / group.deltas.flatten(1).norm(dim=1).mean()
        return Group(name, members, group.deltas)

    return GroupStream(groups, make)


def write_perturbed_copy(base: str | Path | None, out_dir: str | Path, seed: int = 0,
                         relative_scale: float = 0.01) -> Path:
    """Save base + `perturbation_groups(base, seed)` as a transformers checkpoint (a CPU stand-in fine-tune)."""
    from rasa_lora.models import load_model

    model = load_model(base)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for group in perturbation_groups(base, seed, relative_scale):
            for module, delta in zip(group.modules, group.deltas, strict=True):
                parameters[module + ".weight"] += delta
    model.save_pretrained(out_dir)
    return Path(out_dir)
