"""`rasa-lora params`: trainable parameters of LoRA, RaSA, MoRA and PriLoRA for an architecture, without its weights.

The model is built on the meta device (no memory, no download of weights) and each method is applied
through PEFT, so the counts are those of the real modules. For Llama-3.1-8B and Mistral-7B-v0.3 with all
seven projections this reproduces the parameter column of the paper's Tables 1-2 (MoRA: with `--mora-type 1`-`4`;
the rotation the authors ran, type 6, needs an even r^ and has 0.25% / 0.06% fewer at r = 16 / 32, see
docs/baselines.md), and PriLoRA's extra column is the size of its importance statistics.
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

METHODS = ("lora", "rasa", "mora", "prilora")

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
    extra: int | None = None
    """Memory a method keeps beside its trainable parameters to train them (PriLoRA's importance statistics)."""


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


def count_trainable(model_config, method: str, r: int, k: int | None, target_modules, mora_type: int = 6) -> ParamRow:
    """Build the model on the meta device, apply the method, and count its trainable parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import rasa_lora
    from rasa_lora.adapter import RasaLayer

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config)
    if method == "lora":
        peft_config = LoraConfig(r=r, lora_alpha=32, target_modules=target_modules)
    elif method == "mora":
        peft_config = rasa_lora.MoraConfig(r=r, mora_type=mora_type, target_modules=target_modules)
    elif method == "prilora":
        peft_config = rasa_lora.PriloraConfig(r=r, target_modules=target_modules)
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
    if method == "mora":
        ranks = {m.mora_rank["default"]: m.mora_rank["default"] for m in model.modules() if hasattr(m, "mora_rank")}
    if method == "prilora":
        ranks = {m.r["default"]: m.r["default"] for m in model.modules() if hasattr(m, "prilora_A")}
        return ParamRow(method=method, r=r, k=None, trainable=trainable, effective_rank=ranks,
                        extra=model.base_model.extra_numel())
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


def _rank_text(row: ParamRow) -> str:
    ranks = sorted(set(row.effective_rank.values()))
    if row.method == "rasa":
        return f"r-k+Lk = {', '.join(map(str, ranks))}"
    if row.method == "mora":
        return f"r^ = {', '.join(map(str, ranks))}"
    if row.method == "prilora":
        return f"r_i = {ranks[0]} .. {ranks[-1]} (growing with depth)"
    return f"r = {row.r}"


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
    parser.add_argument("--methods", type=_name_list, nargs="+", default=[list(METHODS)],
                        help=f"comma-separated, of {', '.join(METHODS)} (default all)")
    parser.add_argument("--mora-type", type=int, default=6, choices=[1, 2, 3, 4, 6],
                        help="MoRA's compression (6, rotation, needs an even r^; 1-4 keep the paper's r^)")
    parser.add_argument("--target-modules", type=_name_list, nargs="+", default=[ALL_PROJ],
                        help="module names, comma-separated as in rasa-lora train (q_proj,v_proj); spaces also work")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    args.ranks, args.target_modules = _flatten(args.ranks), _flatten(args.target_modules)
    args.methods = _flatten(args.methods)
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: choose from {','.join(METHODS)}")
    if args.rasa_k is not None and not 0 <= args.rasa_k <= min(args.ranks):
        parser.error(f"--rasa-k {args.rasa_k} must be between 0 and the smallest rank ({min(args.ranks)})")

    model_config = load_config(args.architecture)
    rows = [count_trainable(model_config, method, r, args.rasa_k, args.target_modules, args.mora_type)
            for r in args.ranks for method in args.methods]
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(f"Trainable parameters on {args.architecture} ({', '.join(args.target_modules)})")
    print(f"{'method':<7} {'r':>3} {'k':>3} {'trainable':>12} {'rounded':>8} {'extra':>7}  rank per layer")
    for row in rows:
        print(f"{row.method:<7} {row.r:>3} {'-' if row.k is None else row.k:>3} {row.trainable:>12,} "
              f"{human(row.trainable):>8} {'-' if row.extra is None else human(row.extra):>7}  {_rank_text(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
