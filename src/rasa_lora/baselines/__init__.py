"""The paper's baselines that PEFT does not have, as PEFT methods: MoRA (`rasa_lora.baselines.mora`) and PriLoRA
(`rasa_lora.baselines.prilora`). `import rasa_lora` registers both, as it registers RaSA."""

from rasa_lora.baselines.mora import MoraConfig, MoraLayer, MoraModel
from rasa_lora.baselines.prilora import PriloraConfig, PriloraLayer, PriloraModel

__all__ = ["MoraConfig", "MoraLayer", "MoraModel", "PriloraConfig", "PriloraLayer", "PriloraModel"]
