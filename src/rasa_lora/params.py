"""`rasa-lora params`: trainable parameters of LoRA, RaSA, MoRA and PriLoRA for an architecture, without its weights.

The model is built on the meta device (no memory, no download of weights) and each method is applied
through PEFT, so the counts are those of the real modules. For Llama-3.1-8B and Mistral-7B-v0.3 with all
seven projections this reproduces the parameter column of the paper's Tables 1-2 (MoRA: with `--mora-type 1`-`4`;
the rotation the authors ran, type 6, needs an even r^ and has 0.25% / 0.06% fewer at r = 16 / 32, see
docs/baselines.md), and PriLoRA's extra column is the size of its importance statistics.

Mixture-of-experts models (Mixtral-8x7B) keep their experts as 3-D parameters in transformers >= 5: they are
counted through `target_parameters` (default: `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`, with q, k,
v, o as modules), for LoRA (PEFT's `target_parameters`) and RaSA (`rasa_lora.adapter.experts`); MoRA and PriLoRA
have no expert support. The paper's Figure 6 names Llama-3.1-70B and Mixtral-8x7B at r = 4 but gives no counts.

Each RaSA row also gives its step: how far one LionW step moves a layer's dW_i at init, over LoRA's at the same r
and alpha (`rasa_lora.step_size`; 0.59 at r = 8, k = 1 on 30-32 layers), and the RaSA alpha whose step equals
LoRA's at `--alpha`: the alphas to compare the two at equal update size (docs/training.md, "RaSA's alpha against
LoRA's"; measured under LionW only, docs/replication.md).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rasa_lora.errors import ArgumentParser, UserError
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ

METHODS = ("lora", "rasa", "mora", "prilora")

# Shapes of the architectures of the paper, so no config needs to be fetched.
BUILTIN = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "mistral-7b-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2),
}
ALIASES = {"llama3.1-8b": "llama-3.1-8b", "llama3.1-70b": "llama-3.1-70b", "mistral-7b": "mistral-7b-v0.3",
           "mixtral-8x7b-v0.1": "mixtral-8x7b"}
# The experts of a Mixtral block, as 3-D parameters (transformers >= 5): PEFT's `target_parameters` names.
MIXTRAL_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def default_target_parameters(model_config) -> list[str]:
    """The expert parameters adapted by default: Mixtral's two stacks, none for dense models."""
    return list(MIXTRAL_EXPERTS) if getattr(model_config, "model_type", None) == "mixtral" else []


@dataclass
class ParamRow:
    method: str
    r: int
    k: int | None
    trainable: int
    effective_rank: dict[str, int]
    extra: int | None = None
    """Memory a method keeps beside its trainable parameters to train them (PriLoRA's importance statistics)."""
    alpha: float | None = None
    step_size: list[dict] | None = None
    """RaSA only: per pool size L (one entry unless projection types differ in their number of layers), its step
    over LoRA's at the same r and alpha and the matched alphas (`add_step_size`)."""


def add_step_size(row: ParamRow, alpha: float) -> ParamRow:
    """Fill a RaSA row's `step_size` (LoRA at the same r and `alpha` as the unit); L comes from the counted pools."""
    from rasa_lora.step_size import matched_alpha, step_ratio

    if row.method not in ("lora", "rasa"):
        return row
    row.alpha = alpha
    if row.method == "lora":
        return row
    k = row.k
    pools = sorted({(ranks - (row.r - k)) // k for ranks in row.effective_rank.values()}) if k else [None]
    row.step_size = [{"num_layers": layers, "vs_lora": step_ratio(row.r, k, layers),
                      "rasa_alpha_matching_lora": matched_alpha("lora", row.r, alpha, k, layers),
                      "lora_alpha_matching_rasa": matched_alpha("rasa", row.r, alpha, k, layers)}
                     for layers in pools]
    return row


def load_config(architecture: str):
    """A transformers config for a built-in name, the embedded model's alias ("smollm2"), a local path or a hub
    name (refused at once, with what would work, when the Hub cannot be reached)."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig, MixtralConfig

    from rasa_lora.models import ModelNotFoundError, is_embedded, resolve_model

    name = ALIASES.get(architecture.lower(), architecture.lower())
    if name in BUILTIN:
        fields = dict(BUILTIN[name])
        classes = {"llama": LlamaConfig, "mistral": MistralConfig, "mixtral": MixtralConfig}
        config_cls = classes[fields.pop("model_type")]
        return config_cls(**fields)
    if not is_embedded(architecture) and not Path(architecture).expanduser().exists() \
            and "/" not in architecture and not architecture.endswith(".gguf"):
        # not a path nor a hub id with an owner: most likely a typo of a built-in name
        close = difflib.get_close_matches(architecture.lower(), [*BUILTIN, *ALIASES, "smollm2"], n=2, cutoff=0.6)
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


def count_trainable(model_config, method: str, r: int, k: int | None, target_modules, mora_type: int = 6,
                    target_parameters: list[str] | None = None) -> ParamRow:
    """Build the model on the meta device, apply the method, and count its trainable parameters (`target_parameters`:
    3-D expert stacks, LoRA and RaSA only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import rasa_lora
    from rasa_lora.adapter import RasaLayer

    if target_parameters and method not in ("lora", "rasa"):
        raise UserError(f"{method} has no support for expert parameters (target_parameters); count lora and rasa "
                        "(--methods lora,rasa), or pass --target-parameters none to count the attention only")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config)
    experts = {"target_parameters": list(target_parameters)} if target_parameters else {}
    if method == "lora":
        peft_config = LoraConfig(r=r, lora_alpha=32, target_modules=target_modules, **experts)
    elif method == "mora":
        peft_config = rasa_lora.MoraConfig(r=r, mora_type=mora_type, target_modules=target_modules)
    elif method == "prilora":
        peft_config = rasa_lora.PriloraConfig(r=r, target_modules=target_modules)
    else:
        peft_config = rasa_lora.RasaConfig(r=r, rasa_k=k, target_modules=target_modules, **experts)
    model = get_peft_model(base, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks: dict[str, int] = {}
    if method == "rasa":
        for module in model.modules():
            if isinstance(module, RasaLayer):
                ranks[module.rasa_group["default"]] = module.rasa_D["default"].shape[-1]
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


def _step_text(row: ParamRow) -> tuple[str, str]:
    """The step and match columns: one value per pool size, joined by '/' when projection types differ in L."""
    if not row.step_size:
        return "-", "-"
    return ("/".join(f"{entry['vs_lora']:.3f}" for entry in row.step_size),
            "/".join(f"{entry['rasa_alpha_matching_lora']:.3g}" for entry in row.step_size))


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
    parser.add_argument("--methods", type=_name_list, nargs="+", default=None,
                        help=f"comma-separated, of {', '.join(METHODS)} (default all; lora,rasa on experts)")
    parser.add_argument("--mora-type", type=int, default=6, choices=[1, 2, 3, 4, 6],
                        help="MoRA's compression (6, rotation, needs an even r^; 1-4 keep the paper's r^)")
    parser.add_argument("--target-modules", type=_name_list, nargs="+", default=None,
                        help="module names, comma-separated as in rasa-lora train (q_proj,v_proj); spaces also work "
                             "(default: the seven projections; q, k, v, o on Mixtral, whose experts are parameters)")
    parser.add_argument("--target-parameters", type=_name_list, nargs="+", default=None,
                        help="3-D expert parameters, comma-separated (default: mlp.experts.gate_up_proj,"
                             "mlp.experts.down_proj on Mixtral, none elsewhere; 'none' for none)")
    parser.add_argument("--alpha", type=float, default=8.0,
                        help="alpha of both methods, for RaSA's step against LoRA's and the matched alphas (default 8, "
                             "the paper's math recipe; the counts do not depend on it)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    args.ranks = _flatten(args.ranks)
    methods_given = args.methods is not None
    args.methods = _flatten(args.methods) if methods_given else list(METHODS)
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: choose from {','.join(METHODS)}")
    if args.rasa_k is not None and not 0 <= args.rasa_k <= min(args.ranks):
        parser.error(f"--rasa-k {args.rasa_k} must be between 0 and the smallest rank ({min(args.ranks)})")
    if not 0 < args.alpha < float("inf"):
        parser.error(f"--alpha {args.alpha:g} must be positive, e.g. --alpha 8")

    model_config = load_config(args.architecture)
    if args.target_modules is None:
        moe = bool(default_target_parameters(model_config))
        args.target_modules = ALL_PROJ[:4] if moe else list(ALL_PROJ)
    else:
        args.target_modules = _flatten(args.target_modules)
    if args.target_parameters is None:
        target_parameters = default_target_parameters(model_config)
    else:
        target_parameters = [name for name in _flatten(args.target_parameters) if name.lower() != "none"]
    if target_parameters and not methods_given:
        args.methods = [method for method in args.methods if method in ("lora", "rasa")]
    rows = [add_step_size(count_trainable(model_config, method, r, args.rasa_k, args.target_modules, args.mora_type,
                                          target_parameters), args.alpha)
            for r in args.ranks for method in args.methods]
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(f"Trainable parameters on {args.architecture} ({', '.join(args.target_modules + target_parameters)})")
    print(f"{'method':<7} {'r':>3} {'k':>3} {'trainable':>12} {'rounded':>8} {'extra':>7} {'step':>6} {'match':>6}"
          "  rank per layer")
    for row in rows:
        step, match = _step_text(row)
        print(f"{row.method:<7} {row.r:>3} {'-' if row.k is None else row.k:>3} {row.trainable:>12,} "
              f"{human(row.trainable):>8} {'-' if row.extra is None else human(row.extra):>7} {step:>6} {match:>6}"
              f"  {_rank_text(row)}")
    if any(row.step_size for row in rows):
        a = f"{args.alpha:g}"
        print("step: RaSA's LionW step on a layer's dW at init over LoRA's at the same r and alpha; match: the RaSA\n"
              f"alpha whose step equals LoRA alpha {a}'s (and LoRA alpha {a} x step equals RaSA alpha {a}'s). Compare\n"
              "the two at matched alphas (measured under LionW only: docs/training.md, "
              "\"RaSA's alpha against LoRA's\").")
    return 0


if __name__ == "__main__":
    sys.exit(main())
