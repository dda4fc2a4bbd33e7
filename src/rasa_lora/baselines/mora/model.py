"""`MoraModel`: the PEFT tuner that replaces target linear layers with MoRA layers (no shared state)."""

from __future__ import annotations

from rasa_lora.baselines.common import DeltaTuner
from rasa_lora.baselines.mora.layer import Linear, MoraLayer


class MoraModel(DeltaTuner):
    """Creates MoRA adapters on a model; use it through `peft.get_peft_model(model, MoraConfig(...))`."""

    prefix: str = "mora_"
    tuner_layer_cls = MoraLayer
    layer_cls = Linear
