"""`rasa-lora params`: trainable parameters of LoRA and RaSA for an architecture, without its weights.

The model is built on the meta device (no memory, no download of weights) and both methods are applied
through PEFT, so the counts are those of the real modules. For Llama-3.1-8B and Mistral-7B-v0.3 with all
seven projections this reproduces the parameter column of the paper's Tables 1-2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rasa_lora.errors import ArgumentParser
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ

# Shapes of the architectures of the paper, so no config needs to be fetched.
BUILTIN = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "mistral-7b-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
}


@dataclass
class ParamRow:
    method: str
    r: int
    k: int | None
    trainable: int
    effective_rank: dict[str, int]


def load_config(architecture: str):
    """A transformers config for a built-in name, the embedded model's alias ("smollm2"), a local path or a hub
    name (refused at once, with what would work, when the Hub cannot be reached)."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig

    from rasa_lora.models import ModelNotFoundError, is_embedded, resolve_model

    if architecture.lower() in BUILTIN:
        fields = dict(BUILTIN[architecture.lower()])
        config_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[fields.pop("model_type")]
        return config_cls(**fields)
    if not is_embedded(architecture) and not Path(architecture).expanduser().exists() \
            and "/" not in architecture and not architecture.endswith(".gguf"):
        # not a path nor a hub id with an owner: most likely a typo of a built-in name
        close = difflib.get_close_matches(architecture.lower(), [*BUILTIN, "smollm2"], n=2, cutoff=0.6)
        if close:
            raise ModelNotFoundError(f"unknown architecture {architecture!r}; did you mean {' or '.join(close)}? "
                                     f"Built-in: {', '.join(BUILTIN)}, smollm2; or a checkpoint folder or hub name")
    try:
        source, gguf_file = resolve_model(architecture)
    except FileNotFoundError as error:
        if isinstance(error, ModelNotFoundError):
            raise
        raise ModelNotFoundError(f"{error} Built-in names: {', '.join(BUILTIN)}, smollm2.") from None
    try:
        return AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as error:
        raise ModelNotFoundError(
            f"cannot read a config for {architecture!r} ({str(error).splitlines()[0][:200]}). Use a built-in name "
            f"({', '.join(BUILTIN)}), smollm2, a local checkpoint directory, or a hub name with a network."
        ) from None


def count_trainable(model_config, method: str, r: int, k: int | None, target_modules) -> ParamRow:
    """Build the model on the meta device, apply LoRA or RaSA, and count its trainable parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import rasa_lora
    from rasa_lora.adapter import RasaLayer

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config)
    if method == "lora":
        peft_config = LoraConfig(r=r, lora_alpha=32, target_modules=target_modules)
    else:
        peft_config = rasa_lora.RasaConfig(r=r, rasa_k=k, target_modules=target_modules)
    model = get_peft_model(base, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks: dict[str, int] = {}
    if method == "rasa":
        for module in model.modules():
            if isinstance(module, RasaLayer):
                ranks[module.rasa_group["default"]] = module.rasa_D["default"].numel()
        k = peft_config.rasa_k
    return ParamRow(method=method, r=r, k=k, trainable=trainable, effective_rank=ranks)


def _int_list(text: str) -> list[int]:
    """`8,16,32` (as `rasa-lora train` writes lists) or one number; each at least 1."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: ranks are whole numbers of at least 1, e.g. 8,16,32")
        values.append(int(part))
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _flatten(groups: list[list]) -> list:
    return [value for group in groups for value in group]


def human(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="rasa-lora params", description=__doc__.splitlines()[0])
    parser.add_argument("architecture", nargs="?", default="llama-3.1-8b",
                        help=f"built-in name ({', '.join(BUILTIN)}), smollm2 (the embedded model), a local checkpoint "
                             "or config dir, or a hub name")
    parser.add_argument("--ranks", type=_int_list, nargs="+", default=[[8, 16, 32]],
                        help="ranks, comma-separated as in rasa-lora train (8,16,32); spaces also work")
    parser.add_argument("--rasa-k", type=int, default=None, help="shared ranks per layer (default: max(r/8, 1))")
    parser.add_argument("--target-modules", type=_name_list, nargs="+", default=[ALL_PROJ],
                        help="module names, comma-separated as in rasa-lora train (q_proj,v_proj); spaces also work")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    args.ranks, args.target_modules = _flatten(args.ranks), _flatten(args.target_modules)
    if args.rasa_k is not None and not 0 <= args.rasa_k <= min(args.ranks):
        parser.error(f"--rasa-k {args.rasa_k} must be between 0 and the smallest rank ({min(args.ranks)})")

    model_config = load_config(args.architecture)
    rows = [count_trainable(model_config, method, r, args.rasa_k, args.target_modules)
            for r in args.ranks for method in ("lora", "rasa")]
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(f"Trainable parameters on {args.architecture} ({', '.join(args.target_modules)})")
    print(f"{'method':<6} {'r':>3} {'k':>3} {'trainable':>12} {'rounded':>8}  effective rank per layer")
    for row in rows:
        ranks = sorted(set(row.effective_rank.values()))
        rank_text = f"r-k+Lk = {', '.join(map(str, ranks))}" if ranks else f"r = {row.r}"
        k_text = "-" if row.method == "lora" else str(row.k)
        print(f"{row.method:<6} {row.r:>3} {k_text:>3} {row.trainable:>12,} {human(row.trainable):>8}  {rank_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
