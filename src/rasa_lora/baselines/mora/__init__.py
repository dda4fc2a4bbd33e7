"""MoRA (Jiang et al., 2024, arXiv:2405.12130) as a PEFT method: a square matrix of side r^ between
parameter-free compression and decompression, r^ chosen so its parameters equal LoRA's at rank r.

Followed: the official code, github.com/kongds/MoRA (`peft-mora/src/peft/tuners/lora/layer.py`: `_apply_mora` for
the forward, `get_delta_weight` for the merge, `update_layer` for r^ and the zero init; its README for the types),
and the RaSA authors' use of it (github.com/zwhe99/RaSA, `sft.py`: `mora_type=6`, no alpha; their copy of the layer
rounds r^ down to even for type 6). Not covered: ReMoRA (periodic merge and type switching, a pretraining recipe).
"""

from rasa_lora.baselines.common import register
from rasa_lora.baselines.mora.config import MORA_TYPES, MoraConfig, mora_rank
from rasa_lora.baselines.mora.layer import Linear, MoraLayer
from rasa_lora.baselines.mora.model import MoraModel

register("mora", MoraConfig, MoraModel)

__all__ = ["MORA_TYPES", "Linear", "MoraConfig", "MoraLayer", "MoraModel", "mora_rank"]
