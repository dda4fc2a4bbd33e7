"""The tiny Llama and tokenizer on disk, shared with tests/train (the launched runs of `test_launch_resume.py`)."""

from tests.train.conftest import tiny_model_dir  # noqa: F401
