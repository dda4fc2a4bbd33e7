"""`rasa-lora params`: trainable parameters of LoRA and RaSA for an architecture, without its weights.

The model is built on the meta device (no memory, no download of weights) and both methods are applied
through PEFT, so the counts are those of the real modules. For Llama-3.1-8B and Mistral-7B-v0.3 with all
seven projections this reproduces the parameter column of the paper's Tables 1-2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

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
    """A transformers config for a built-in name, a local path or a hub name."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig

    if architecture.lower() in BUILTIN:
        fields = dict(BUILTIN[architecture.lower()])
        config_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[fields.pop("model_type")]
        return config_cls(**fields)
    try:
        return AutoConfig.from_pretrained(architecture)
    except OSError as error:
        raise SystemExit(
            f"rasa-lora params: cannot read a config for {architecture!r} ({error}). Use a built-in name "
            f"({', '.join(BUILTIN)}), a local checkpoint directory, or a hub name with a network."
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


def human(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rasa-lora params", description=__doc__.splitlines()[0])
    parser.add_argument("architecture", nargs="?", default="llama-3.1-8b",
                        help=f"built-in name ({', '.join(BUILTIN)}), a local checkpoint or config dir, or a hub name")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rasa-k", type=int, default=None, help="shared ranks per layer (default: max(r/8, 1))")
    parser.add_argument("--target-modules", nargs="+", default=ALL_PROJ)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

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
