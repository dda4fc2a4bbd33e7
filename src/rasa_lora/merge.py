"""`rasa-lora merge BASE ADAPTER OUT`: fold an adapter into its base model and save a plain transformers model.

BASE is what `rasa_lora.models.load_model` accepts ("smollm2" for the embedded default, a directory, a .gguf file or
a hub name); ADAPTER is a PEFT adapter directory (RaSA or any PEFT method; `import rasa_lora` registers RaSA).
OUT receives `model.safetensors`, `config.json` and the tokenizer (the adapter directory's if it has one, else the
base's), so `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it with no
PEFT installed.

Choices: the merge is PEFT's `merge_and_unload` in float32 (RaSA's merge is exact up to float rounding); the result
is written to a temporary directory next to OUT and renamed, so a failure leaves no half-written model. An existing
OUT is refused unless `--overwrite`. Limits: adapters whose method moves the base weights at init (OLoRA, PiSSA)
must have been saved converted (`rasa-lora train` does this).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from rasa_lora.errors import ArgumentParser

DEFAULT_BASE = "smollm2"


def merge(base: str, adapter: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Merge `adapter` into `base` and save to `out`; returns `out`."""
    from rasa_lora.models import (
        check_adapter_files,
        load_adapter,
        load_model,
        load_tokenizer,
        owner_default_permissions,
    )

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(adapter)!r} holds no adapter_config.json; give a PEFT adapter directory "
                                "(a full fine-tune needs no merge)")
    check_adapter_files(adapter)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; pass --overwrite or choose another OUT")
    model = load_adapter(load_model(base, dtype=dtype), adapter)
    merged = model.merge_and_unload()
    has_tokenizer = any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        owner_default_permissions(staging)  # mkdtemp makes it 0700; the merged model is an ordinary folder
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="rasa-lora merge", description=__doc__.splitlines()[0])
    parser.add_argument("base", help='base model: "smollm2", a directory, a .gguf file or a hub name')
    parser.add_argument("adapter", help="PEFT adapter directory (e.g. the output_dir of rasa-lora train)")
    parser.add_argument("out", help="directory for the merged model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    try:
        out = merge(args.base, args.adapter, args.out, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"rasa-lora merge: error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0
