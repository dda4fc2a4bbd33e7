"""rasa-lora: RaSA (Rank-Sharing Low-Rank Adaptation, ICLR 2025) as a PEFT method.

`import rasa_lora` registers the method with PEFT, so `peft.get_peft_model(model, rasa_lora.RasaConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` work as for LoRA; it registers the paper's two baselines
that PEFT lacks, MoRA and PriLoRA, the same way (`rasa_lora.baselines`). Training, evaluation and the
analysis live in sub-packages that are imported only when used.

The import itself is light (no torch, no PEFT): `rasa-lora --help` must answer at once. If PEFT is already
imported, RaSA is registered now; otherwise it is registered the moment PEFT is imported (a post-import hook on
`peft`), and `rasa_lora.RasaConfig` & co. are imported on first use. Either way a RaSA adapter loads after
`import rasa_lora`, whatever the order of the imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["MoraConfig", "PriloraConfig", "RasaConfig", "RasaLayer", "RasaModel", "__version__"]


_SUBMODULES = ("adapter", "analysis", "baselines", "evaluation", "models", "ops", "params", "reference", "step_size",
               "train")


def __getattr__(name: str):
    if name in ("RasaConfig", "RasaLayer", "RasaModel"):
        from rasa_lora import adapter

        return getattr(adapter, name)
    if name in ("MoraConfig", "PriloraConfig"):
        from rasa_lora import baselines

        return getattr(baselines, name)
    if name in _SUBMODULES:  # `rasa_lora.models.load_model(...)` without importing the submodule first
        import importlib

        return importlib.import_module(f"rasa_lora.{name}")
    raise AttributeError(f"module 'rasa_lora' has no attribute {name!r}")


def _register() -> None:
    import rasa_lora.adapter  # noqa: F401  (registers RaSA with PEFT on import)
    import rasa_lora.baselines  # noqa: F401  (and MoRA, PriLoRA)


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `peft` is looked up it lets the other finders find it, and wraps the loader of
    what they found so that RaSA is registered right after PEFT's own `__init__` has run. A lookup is not always an
    import (transformers' `is_peft_available` only calls `find_spec`), so the hook stays until PEFT has loaded."""

    _busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "peft" or self._busy:
            return None
        self._busy = True  # the lookup below must not come back here
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _remove_hook()
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterPeft)]


if "peft" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeft())
