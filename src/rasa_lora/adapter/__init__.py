"""RaSA as a PEFT method: config, layer, tuner, and their registration with PEFT."""

from rasa_lora.adapter.config import RasaConfig, default_rasa_k
from rasa_lora.adapter.layer import Linear, RasaLayer
from rasa_lora.adapter.model import RasaModel, group_of, pool_key
from rasa_lora.adapter.registration import register_rasa

register_rasa(RasaConfig, RasaModel)

__all__ = ["Linear", "RasaConfig", "RasaLayer", "RasaModel", "default_rasa_k", "group_of", "pool_key"]
