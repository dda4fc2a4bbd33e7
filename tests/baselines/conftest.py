"""The training fixtures (tiny Llama and tokenizer on disk, one torch thread) shared with tests/train."""

from tests.train.conftest import one_torch_thread, tiny_model_dir  # noqa: F401
