"""Process-wide switches, read from the environment by one rule (`env_flag`), settable from code.

Imports nothing heavy (no torch): `rasa_lora.ops` and `rasa_lora.train` both read their switches here, and
nothing here imports them back.

| switch | environment | default | what |
| --- | --- | --- | --- |
| `FUSED` | RASA_LORA_FUSED | on with CUDA | the layer's fused path (`rasa_lora.ops`), else the reference path |
| `GEMM_ADDS` | RASA_LORA_GEMM_ADDS | on | Triton backend: the base GEMMs add into the adapter's term (beta = 1) |
| `KEEP_U` | RASA_LORA_KEEP_U | on | under gradient checkpointing, the forward keeps u for its recomputation |
| `FAST_LAUNCH` | RASA_LORA_FAST_LAUNCH | on | Triton launches through the cache of compiled kernels |
| `KERNELS` | RASA_LORA_KERNELS | auto | the fused path's backend: "triton", "cublas", "torch" or auto |
| `DEVICE_SEED` | RASA_LORA_DEVICE_SEED | off | eager layers seed dropout on the device, as under torch.compile |

`DEVICE_SEED`: the layers derive each call's mask seed on the device from a [seed, counter] state (`ops.dropout`),
and the fused path runs the registered operators (`ops.registered`); under torch.compile they always do.
"""

from __future__ import annotations

import os

_OFF = frozenset({"0", "false", "no", "off", "n", "f", ""})
_ON = frozenset({"1", "true", "yes", "on", "y", "t"})


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on (any case) on, 0/false/no/off or empty off, unset `default`;
    any other value is a `ValueError` naming the variable (a typo must not silently pick a side)."""
    value = os.environ.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean: set it to 1 or 0 (true/false, yes/no, on/off)")


class Switch:
    """A boolean setting: the value forced from code (`force`), else the environment variable `env` if set, else
    `default()`. The environment is read once (the switches are read on every forward)."""

    __slots__ = ("env", "default", "forced", "from_env")

    def __init__(self, env: str, default) -> None:
        self.env, self.default = env, default
        self.forced: bool | None = None
        self.from_env: bool | None = None

    def __call__(self) -> bool:
        if self.forced is not None:
            return self.forced
        if self.from_env is None:
            self.from_env = env_flag(self.env, self.default())
        return self.from_env

    def force(self, value: bool | None) -> None:
        """Force the value; None returns to the environment's (or the default)."""
        self.forced = value


class Choice:
    """A named setting among `options`: forced from code, else the environment variable `env`, else None (auto)."""

    __slots__ = ("env", "options", "forced", "from_env", "read")

    def __init__(self, env: str, options: tuple[str, ...]) -> None:
        self.env, self.options = env, options
        self.forced: str | None = None
        self.from_env: str | None = None
        self.read = False

    def __call__(self) -> str | None:
        if self.forced is not None:
            return self.forced
        if not self.read:
            value = os.environ.get(self.env) or None
            if value is not None and value not in self.options:
                raise ValueError(f"{self.env}={value!r}: use one of {', '.join(self.options)} (or unset it: auto)")
            self.from_env, self.read = value, True
        return self.from_env

    def force(self, value: str | None) -> None:
        if value not in (None, *self.options):
            raise ValueError(f"unknown kernel backend {value!r}: use one of {self.options} or None")
        self.forced = value


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


FUSED = Switch("RASA_LORA_FUSED", _cuda_available)
GEMM_ADDS = Switch("RASA_LORA_GEMM_ADDS", lambda: True)
KEEP_U = Switch("RASA_LORA_KEEP_U", lambda: True)
FAST_LAUNCH = Switch("RASA_LORA_FAST_LAUNCH", lambda: True)
DEVICE_SEED = Switch("RASA_LORA_DEVICE_SEED", lambda: False)
KERNELS = Choice("RASA_LORA_KERNELS", ("triton", "torch", "cublas"))
