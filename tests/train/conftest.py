"""Fixtures of the training tests: a tiny random Llama with a tiny byte-level BPE tokenizer, saved to disk.

The tokenizer (384 tokens) is trained offline in a few seconds on generated arithmetic text, so the tests need
neither a network nor the embedded SmolLM2, and the model's 384-row embedding keeps every step cheap.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rasa_lora.train.data import PROMPT, arithmetic_problems

    corpus = [PROMPT.format(instruction=p["instruction"]) + p["output"] for p in arithmetic_problems(100, seed=0)]
    corpus += ["The answer is: \\boxed{\\frac{1}{2}} def f(x): return x ** 2"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine spin-waiting OpenMP threads cost 3-5x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding `tiny_llama()` (vocab resized to the tokenizer) and the tiny tokenizer."""
    from rasa_lora.models import tiny_llama

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory) -> Path:
    """A directory holding `tiny_mixtral()` (experts as 3-D parameters) and the tiny tokenizer."""
    from rasa_lora.models import tiny_mixtral

    directory = tmp_path_factory.mktemp("tiny-mixtral")
    tokenizer = build_tiny_tokenizer()
    tiny_mixtral(vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_overrides(model_dir: Path, output_dir: Path, **extra) -> dict:
    """Recipe keys for a fast CPU run on the tiny model."""
    values = {"base_model": str(model_dir), "output_dir": str(output_dir), "global_batch_size": 4,
              "micro_batch_size": 2, "num_examples": 16, "max_steps": 2, "progress_bar": False,
              "gradient_checkpointing": False, "cutoff_len": 256}
    values.update(extra)
    return values
