r"""`rasa-lora export-lora ADAPTER OUT`: write a RaSA adapter as an exactly equal, standard PEFT LoRA adapter.

RaSA's update of layer i is already a low-rank product (paper eq. 5), so it is a LoRA update of rank
R = r - k + L*k with scaling 1:

    dW_i = [B~_i  B_S] diag(D_i) [A~_i ; A_S] = lora_B @ lora_A
    lora_A = [A~_i ; A_S]               (R, a)
    lora_B = [B~_i  B_S] diag(D_i)      (b, R)        lora_alpha = r_lora, so alpha / r = 1

Nothing is approximated (no SVD): only `B * D` is rounded once. OUT holds `adapter_model.safetensors` and
`adapter_config.json` with `peft_type: LORA`: plain PEFT (`PeftModel.from_pretrained`) and transformers'
`model.load_adapter` load it with no `import rasa_lora` (tested), and it is the layout LoRA servers (vLLM, SGLang,
TGI, LoRAX) read (not run with them here).

Choices: the export reads only ADAPTER's files (no base model is loaded). `target_modules` lists the adapted
modules by their full paths, so the LoRA adapts exactly the modules the RaSA adapter did. Every module gets one
rank (the largest R of its groups, or more with `--pad-to`): extra ranks are zero rows of lora_A and zero columns
of lora_B, so the update is unchanged; `--pad-to vllm` rounds up to a rank vLLM's `--max-lora-rank` takes.
`--dtype` writes the factors in the serving dtype (rounding the factors, not the product).

The cost: a served LoRA runs R ranks per layer instead of r (39 instead of 8 on a 32-layer model at r=8, k=1),
so its adapter compute and memory are those of a rank-R LoRA; merging (`rasa-lora merge`) costs nothing at serving.
Limits: `bias` other than "none" is refused (LoRA servers do not load trained biases); `modules_to_save` tensors
are copied as they are (PEFT loads them; most servers ignore or refuse them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from rasa_lora.adapter.model import group_of, pool_key

# The ranks vLLM accepts for `--max-lora-rank` (vllm.config.LoRAConfig).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model.rasa_shared_"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_factors(A_p: torch.Tensor, B_p: torch.Tensor, D: torch.Tensor, A_s: torch.Tensor,
                 B_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (R, a), lora_B (b, R)) with lora_B @ lora_A = dW_i of eq. 5; D is folded into B (in float64)."""
    A = torch.cat([A_p, A_s], dim=0)
    B = torch.cat([B_p, B_s], dim=1)
    return A, (B.double() * D.double()).to(B.dtype)


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append zero ranks up to `rank` (zero rows of A, zero columns of B: the product is unchanged)."""
    extra = rank - A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {A.shape[0]} down to {rank}")
    return (torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0),
            torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1))


def target_rank(rank: int, pad_to: str | int | None) -> int:
    """The exported rank: `rank` itself (None), the next vLLM rank ("vllm") or a given rank >= `rank`."""
    if pad_to is None:
        return rank
    if pad_to == "vllm":
        fitting = [value for value in VLLM_RANKS if value >= rank]
        if not fitting:
            raise ValueError(f"rank {rank} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}; serve the merged model "
                             "(rasa-lora merge) instead")
        return fitting[0]
    value = int(pad_to)
    if value < rank:
        raise ValueError(f"--pad-to {value} is below the adapter's rank R={rank}; give a rank >= {rank} or 'vllm'")
    return value


def read_rasa_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the saved tensors); refuses what is not a RaSA adapter, naming the fix."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} holds no adapter_config.json; give a RaSA adapter directory "
                                "(the output_dir of rasa-lora train, or a model.save_pretrained folder)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "RASA":
        raise ValueError(f"{str(adapter_dir)!r} is a {config.get('peft_type')} adapter, not RaSA; export-lora converts "
                         "RaSA adapters (a LoRA adapter is served as it is)")
    if config.get("target_parameters"):
        raise ValueError(f"the adapter adapts expert parameters ({', '.join(config['target_parameters'])}), which "
                         "export-lora does not convert (LoRA servers take per-expert linears); serve the merged "
                         "model instead (rasa-lora merge)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"the adapter trains biases (bias={config['bias']!r}), which LoRA servers do not load; "
                         "serve the merged model instead (rasa-lora merge)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} is missing; save the adapter with safetensors (PEFT's default)")
    return config, load_file(str(weights))


def convert_state(config: dict, state: dict[str, torch.Tensor], pad_to: str | int | None = None,
                  dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """A RaSA adapter's saved tensors as LoRA tensors: (state dict, adapted module paths, exported rank)."""
    modules = sorted(key[len(PEFT_PREFIX):-len(".rasa_D")] for key in state
                     if key.startswith(PEFT_PREFIX) and key.endswith(".rasa_D"))
    if not modules:
        raise ValueError("the adapter file holds no RaSA layer (no '*.rasa_D' tensor); is it a RaSA adapter?")
    factors = {}
    for path in modules:
        pool = pool_key(group_of(path, config.get("layers_pattern")))
        prefix = PEFT_PREFIX + path
        private = (state.get(f"{prefix}.rasa_A"), state.get(f"{prefix}.rasa_B"))
        shared = (state.get(f"{SHARED_PREFIX}A.{pool}"), state.get(f"{SHARED_PREFIX}B.{pool}"))
        # Empty factors are not saved: no pool when k = 0, no private factors when k = r.
        if None in shared and config.get("rasa_k") != 0:
            raise ValueError(f"the shared pool {pool!r} of module {path!r} is missing from the adapter file")
        if None in private and config.get("rasa_k") != config.get("r"):
            raise ValueError(f"the private factors of module {path!r} are missing from the adapter file")
        like_A, like_B = (private if None not in private else shared)
        if None in private:
            private = (like_A.new_zeros(0, like_A.shape[1]), like_B.new_zeros(like_B.shape[0], 0))
        if None in shared:
            shared = (like_A.new_zeros(0, like_A.shape[1]), like_B.new_zeros(like_B.shape[0], 0))
        factors[path] = lora_factors(*private, state[f"{prefix}.rasa_D"], *shared)
    rank = target_rank(max(A.shape[0] for A, _ in factors.values()), pad_to)
    lora_state = {}
    for path, (A, B) in factors.items():
        A, B = pad_rank(A, B, rank)
        lora_state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.to(dtype or A.dtype).contiguous()
        lora_state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.to(dtype or B.dtype).contiguous()
    rasa_keys = {key for key in state if key.startswith(SHARED_PREFIX) or ".rasa_" in key}
    lora_state.update({key: value for key, value in state.items() if key not in rasa_keys})  # modules_to_save
    return lora_state, modules, rank


def lora_config_for(config: dict, modules: list[str], rank: int):
    """The `LoraConfig` of an export (scaling lora_alpha / r = 1)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=config.get("rasa_dropout", 0.0),
                      fan_in_fan_out=bool(config.get("fan_in_fan_out")), bias="none",
                      modules_to_save=config.get("modules_to_save"), task_type=config.get("task_type"),
                      base_model_name_or_path=config.get("base_model_name_or_path"),
                      revision=config.get("revision"))


def export_lora(adapter_dir: str | Path, out: str | Path, pad_to: str | int | None = None, dtype: str | None = None,
                overwrite: bool = False) -> dict:
    """Write RaSA adapter `adapter_dir` as a PEFT LoRA adapter in `out` (atomically); returns a summary dict."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; pass --overwrite or choose another OUT")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of: {', '.join(DTYPES)}")
    config, state = read_rasa_adapter(adapter_dir)
    lora_state, modules, rank = convert_state(config, state, pad_to, DTYPES.get(dtype))
    lora_config = lora_config_for(config, modules, rank)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        save_file(lora_state, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(str(staging))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(adapter_dir) / name).is_file():
                shutil.copy2(Path(adapter_dir) / name, staging / name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": str(out), "rank": rank, "rasa_r": config["r"], "rasa_k": config["rasa_k"], "modules": len(modules),
            "unpadded_ranks": sorted({state[f"{PEFT_PREFIX}{path}.rasa_D"].numel() for path in modules}),
            "bytes": (out / "adapter_model.safetensors").stat().st_size,
            "rasa_bytes": (Path(adapter_dir) / "adapter_model.safetensors").stat().st_size}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rasa-lora export-lora", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="RaSA adapter directory (e.g. the output_dir of rasa-lora train)")
    parser.add_argument("out", help="directory for the LoRA adapter")
    parser.add_argument("--pad-to", default=None,
                        help="pad every module's rank to this value, or 'vllm' for the next rank vLLM accepts "
                             f"({', '.join(map(str, VLLM_RANKS))}); zero ranks, still exact")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="dtype of the written factors (default: the adapter's, float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    if args.pad_to not in (None, "vllm") and not str(args.pad_to).isdigit():
        parser.error(f"--pad-to {args.pad_to!r}: give a positive integer or 'vllm'")
    try:
        summary = export_lora(args.adapter, args.out, args.pad_to, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"rasa-lora export-lora: error: {error}", file=sys.stderr)
        return 2
    print(f"LoRA adapter written to {summary['out']}: rank {summary['rank']} on {summary['modules']} modules "
          f"(RaSA r={summary['rasa_r']}, k={summary['rasa_k']}: R = {', '.join(map(str, summary['unpadded_ranks']))}"
          f"), {summary['bytes'] / 1e6:.2f} MB (RaSA adapter {summary['rasa_bytes'] / 1e6:.2f} MB)")
    return 0
