"""rasa-lora: RaSA (Rank-Sharing Low-Rank Adaptation, ICLR 2025) as a PEFT method.

`import rasa_lora` registers the method with PEFT, so `peft.get_peft_model(model, rasa_lora.RasaConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` work as for LoRA; it registers the paper's two baselines
that PEFT lacks, MoRA and PriLoRA, the same way (`rasa_lora.baselines`). Training, evaluation and the
analysis live in sub-packages that are imported only when used.
"""

from rasa_lora.adapter import RasaConfig, RasaLayer, RasaModel
from rasa_lora.baselines import MoraConfig, PriloraConfig

__version__ = "0.1.0"
__all__ = ["MoraConfig", "PriloraConfig", "RasaConfig", "RasaLayer", "RasaModel", "__version__"]
