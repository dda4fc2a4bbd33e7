"""`benchmarks/speed.py` measures training steps in training mode, whatever mode the model arrives in.

`from_pretrained` returns a model in eval mode; until session 4 the SmolLM2 rows were therefore measured without
gradient checkpointing (transformers checkpoints only in training mode) and without the adapters' dropout.
"""


import torch

from rasa_lora.models import tiny_llama
from tests.benchmark_scripts import load_benchmark


def _speed_module():
    return load_benchmark("speed")


def test_training_steps_run_in_training_mode_with_checkpointing():
    speed = _speed_module()
    model = tiny_llama(seed=0).eval()  # as from_pretrained returns it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    speed.timed_steps(model, 1, 8, model.config.vocab_size, 1, 0, torch.device("cpu"), train=True)
    assert calls == [True, True]  # the forward and checkpointing's recomputation, in training mode
    calls.clear()
    speed.timed_steps(model, 1, 8, model.config.vocab_size, 1, 0, torch.device("cpu"), train=False)
    assert calls == [False]  # inference rows: eval mode, one forward
