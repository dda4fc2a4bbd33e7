"""What `rasa-lora export-lora` costs: file sizes and ranks of a RaSA adapter, its exact LoRA export (as it is, padded
for vLLM, in bf16) and a PEFT LoRA of the same r, on a real model; plus the export's time and its exactness.

    PYTHONPATH=src python3 benchmarks/export_size.py --out /tmp/export_size.json          # embedded SmolLM2-135M
    PYTHONPATH=src python3 benchmarks/export_size.py --model PATH --r 16 --out OUT.json   # any causal LM

The adapters have random factors (B and pools included; sizes do not depend on the values). Exactness: the max
absolute logit difference between base + RaSA and base + exported LoRA (float32, 64 tokens), both through PEFT,
beside the same difference for RaSA merged into the base weights (float32 rounding, for scale).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _size(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def measure(model_name: str | None, r: int, k: int | None) -> list[dict]:
    from peft import LoraConfig, PeftModel, get_peft_model

    import rasa_lora
    from rasa_lora.export import export_lora
    from rasa_lora.models import LLAMA_PROJECTIONS, load_model

    rows = []
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = get_peft_model(load_model(model_name), rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=2 * r,
                                                                             target_modules=LLAMA_PROJECTIONS))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".rasa_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            expected = model.eval()(input_ids=ids).logits
        model.save_pretrained(root / "rasa")
        scale = float(expected.abs().max())
        config = model.peft_config["default"]
        rows.append({"adapter": f"RaSA r={r} k={config.rasa_k}", "rank_served": None, "bytes": _size(root / "rasa")})
        for label, pad_to, dtype in (("exact", None, None), ("padded for vLLM", "vllm", None),
                                     ("bf16", None, "bfloat16")):
            started = time.perf_counter()
            summary = export_lora(root / "rasa", root / label, pad_to=pad_to, dtype=dtype)
            seconds = time.perf_counter() - started
            row = {"adapter": f"LoRA export, {label}", "rank_served": summary["rank"], "bytes": summary["bytes"],
                   "export_s": round(seconds, 3)}
            if dtype is None:
                lora = PeftModel.from_pretrained(load_model(model_name), str(root / label)).eval()
                with torch.no_grad():
                    row["max_abs_logit_diff"] = float((lora(input_ids=ids).logits - expected).abs().max())
                row["max_abs_logit"] = scale
            rows.append(row)
        merged = model.merge_and_unload()  # for scale: the merge is exact up to float32 rounding too
        with torch.no_grad():
            diff = float((merged(input_ids=ids).logits - expected).abs().max())
        rows.append({"adapter": "RaSA merged into the base (reference)", "rank_served": None, "bytes": None,
                     "max_abs_logit_diff": diff, "max_abs_logit": scale})
        lora_config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_PROJECTIONS)
        lora = get_peft_model(load_model(model_name), lora_config)
        lora.save_pretrained(root / "peft-lora")
        rows.append({"adapter": f"PEFT LoRA r={r}", "rank_served": r, "bytes": _size(root / "peft-lora")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=None, help="shared ranks per layer (default max(r // 8, 1))")
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(args.model, args.r, args.k)
    print("| adapter | rank served | file (MB) | export (s) | max abs logit diff (max abs logit) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        size = f"{row['bytes'] / 1e6:.2f}" if row["bytes"] else "-"
        diff = f"{row['max_abs_logit_diff']:.2e} ({row['max_abs_logit']:.1f})" if "max_abs_logit_diff" in row else "-"
        print(f"| {row['adapter']} | {row['rank_served'] or '-'} | {size} | {row.get('export_s', '-')} | {diff} |")
    Path(args.out).write_text(json.dumps({"model": args.model or "smollm2", "r": args.r, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
