"""Adapters saved by the authors' PEFT fork (github.com/zwhe99/RaSA, `peft/src/peft/tuners/rasa/`), read as they are.

Their checkpoint keys, against this package's (adapter name removed, as PEFT saves them):

    <layer>.rasa_A.weight                          ->  <layer>.rasa_A          A~_i (r-k, a): an nn.Linear there
    <layer>.rasa_B.weight                          ->  <layer>.rasa_B          B~_i (b, r-k)
    <layer>.rasa_mixing.weight                     ->  <layer>.rasa_D          D_i (r-k+Lk,), private ranks first
    base_model.rasa_shared_A.<module>.weight       ->  base_model.rasa_shared_A.<pool key>   A_S (Lk, a)
    base_model.rasa_shared_B.<module>.weight       ->  base_model.rasa_shared_B.<pool key>   B_S (b, Lk)

where `<module>` is the module path after `layers.<i>.` with dots written `__` (`self_attn__q_proj`): their pools
are grouped by that name, ours by the full path with the index starred (`model.layers.*.self_attn.q_proj`). The
tensors keep their layout and eq. 5 is the same (their `scaling` is 1), so the conversion only renames keys.

Their config defaults differ from ours: `r=256`, `rasa_k=1`, and `target_modules=None` means PEFT's LoRA list for
the architecture (q_proj and v_proj on Llama), not all linear layers. A config file written by their fork has no
`init_weights` key (this package always writes it); `RasaConfig.check_kwargs` reads such a file with their defaults.
"""

from __future__ import annotations

import re
import warnings

import torch

from rasa_lora.adapter.registration import RASA_PREFIX

_LAYER_KEY = re.compile(r"\.rasa_(A|B|mixing)\.weight$")
_POOL_KEY = re.compile(r"(^|\.)rasa_shared_(A|B)\.([^.]+)\.weight$")
_OURS = {"A": "rasa_A", "B": "rasa_B", "mixing": "rasa_D"}
# Fields of the authors' RasaConfig that this package does not have, with the only value it can honour.
AUTHORS_ONLY_FIELDS = {"rasa_d_init": "default"}
AUTHORS_DEFAULTS = {"r": 256, "rasa_k": 1}


def is_authors_state_dict(state_dict: dict) -> bool:
    return any(_LAYER_KEY.search(key) or _POOL_KEY.search(key) for key in state_dict)


def is_authors_config(config: dict) -> bool:
    """A config dict written by the authors' fork: RaSA, but without the `init_weights` field this package writes."""
    return str(config.get("peft_type", "")).upper() == "RASA" and "init_weights" not in config


def authors_module_name(group: str) -> str | None:
    """The authors' pool name of a group (`model.layers.*.self_attn.q_proj` -> `self_attn__q_proj`); None when the
    group has no `layers.*.` part (their fork only adapted modules under `layers.<i>.`)."""
    match = re.search(r"(^|\.)layers\.\*\.(.+)$", group)
    return match.group(2).replace(".", "__") if match else None


def pool_names(groups: list[str]) -> dict[str, str]:
    """Authors' pool name -> this package's pool key, for the groups of one adapter."""
    from rasa_lora.adapter.model import pool_key

    names: dict[str, str] = {}
    for group in groups:
        theirs = authors_module_name(group)
        if theirs is None:
            continue
        if theirs in names and names[theirs] != pool_key(group):
            raise ValueError(
                f"Two groups map to the authors' pool name {theirs!r} ({names[theirs]} and {pool_key(group)}), so "
                "their checkpoint is ambiguous for this model; target one of them only (`target_modules`)."
            )
        names[theirs] = pool_key(group)
    return names


def convert_state_dict(state_dict: dict[str, torch.Tensor], groups: list[str]) -> dict[str, torch.Tensor]:
    """The authors' checkpoint (adapter name already removed) as this package's; `groups` are the adapter's group
    keys in the model. Zero-element tensors (their k = 0 or k = r) are dropped: this package registers none."""
    names = pool_names(groups)
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if hasattr(value, "numel") and value.numel() == 0 and RASA_PREFIX in key:
            continue
        match = _POOL_KEY.search(key)
        if match:
            theirs = match.group(3)
            if theirs not in names:
                unknown.append(theirs)
                continue
            key = key[:match.start()] + f"{match.group(1)}rasa_shared_{match.group(2)}.{names[theirs]}"
        else:
            match = _LAYER_KEY.search(key)
            if match:
                key = key[:match.start()] + "." + _OURS[match.group(1)]
        converted[key] = value
    if unknown:
        raise ValueError(
            f"The authors' checkpoint has shared pools for {sorted(set(unknown))}, which this config does not target "
            f"(it targets {sorted(names) or 'no module under layers.<i>.'}); load it with the config saved beside it."
        )
    return converted


def check_authors_config(kwargs: dict) -> dict:
    """Read an authors' config dict with their defaults and without the fields this package lacks."""
    kwargs = dict(kwargs)
    for name, default in AUTHORS_DEFAULTS.items():
        if kwargs.get(name) is None:
            kwargs[name] = default
    for name, supported in AUTHORS_ONLY_FIELDS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value != supported:
                raise ValueError(f"{name}={value!r} in the authors' config is not supported by rasa-lora (only "
                                 f"{supported!r}, their default); the adapter would not load as it was trained.")
    if kwargs.get("target_modules") is None:
        kwargs["default_targets"] = "lora"
    known = _config_fields()
    dropped = sorted(k for k in kwargs if k not in known)
    if dropped:
        warnings.warn(f"Ignoring fields of the authors' RaSA config that rasa-lora does not use: {dropped}")
        kwargs = {k: v for k, v in kwargs.items() if k in known}
    kwargs["init_weights"] = True
    return kwargs


def _config_fields() -> set[str]:
    import dataclasses

    from rasa_lora.adapter.config import RasaConfig

    return {f.name for f in dataclasses.fields(RasaConfig)}
