"""Supervised fine-tuning: the paper's recipe (App. C) for RaSA, its PEFT baselines and full fine-tuning.

`rasa-lora train [CONFIG.yaml] [--key value ...]` runs it (see `rasa_lora.train.cli`); the pieces are importable
for scripts and for wrapping with `accelerate`: `config.TrainConfig`, `data`, `optim.DecoupledLionW`,
`methods.build_model`, `trainer.train`.
"""

from rasa_lora.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
