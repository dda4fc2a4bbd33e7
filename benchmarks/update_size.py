"""How far one optimizer step moves each layer's weight update dW, for LoRA and RaSA (docs/replication.md).

    PYTHONPATH=src python3 benchmarks/update_size.py --out benchmarks/results/update_size.json [--steps 8]

Why: decoupled LionW moves every trainable entry by +-lr whatever its gradient's size, so how far dW moves per
step is set by the factors' scales: LoRA's alpha/r on every rank, RaSA's D (eq. 6: alpha/(2(r-k)) on the private
ranks, alpha/(2Lk) on the pool's). This script trains each variant for a few steps on the same GSM8K batches
(SmolLM2-135M-Instruct, float32, dropout 0, constant lr, no warmup) and prints ||dW_i||_F after each step,
averaged over the modules of each projection type, with each variant's ratio to LoRA's, and the training loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"lora": {"method": "lora"}, "rasa": {"method": "rasa"},
            "rasa-a16": {"method": "rasa", "alpha": 16.0}}


def delta_norms(model) -> dict[str, list[float]]:
    """projection type -> ||dW||_F of each adapted module (the adapter's own get_delta_weight)."""
    norms: dict[str, list[float]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "active_adapters") and name.count(".") > 2:
            adapter = module.active_adapters[0]
            if adapter not in getattr(module, "r", {}):
                continue
            with torch.no_grad():
                delta = module.get_delta_weight(adapter).float()
            norms.setdefault(name.rsplit(".", 1)[-1], []).append(float(delta.norm()))
    return norms


def run_variant(keys: dict, batches: list, steps: int, lr: float, data_path: str) -> dict:
    from rasa_lora.models import load_model
    from rasa_lora.train import methods, optim
    from rasa_lora.train.config import build_config

    config = build_config({"dataset": data_path, "r": 8, "alpha": 8.0, "dropout": 0.0, "learning_rate": lr,
                           "lr_scheduler": "constant", "warmup_ratio": 0.0, "seed": 0, **keys})
    torch.manual_seed(0)
    model = methods.apply_method(load_model(None, dtype="float32"), config, steps).train()
    optimizer = optim.build_optimizer(model.parameters(), config)
    history = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        norms = delta_norms(model)
        history.append({"step": step + 1, "loss": float(loss), "seconds": round(time.perf_counter() - started, 2),
                        "delta_norm": {kind: statistics.mean(values) for kind, values in norms.items()}})
        print(f"  step {step + 1}: loss {float(loss):.4f}", file=sys.stderr, flush=True)
    return {"keys": keys, "history": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="examples a step (different batches each step)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from rasa_lora.models import load_tokenizer
    from rasa_lora.train import data
    from rasa_lora.train.config import build_config

    tokenizer = load_tokenizer(None)
    examples = data.load_examples(build_config({"dataset": args.data}))[: args.steps * args.batch]
    tokenized = data.tokenize_all(examples, tokenizer, 512)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [data.collate(tokenized[i:i + args.batch], pad) for i in range(0, len(tokenized), args.batch)]
    results = {}
    for name in args.variants.split(","):
        print(f"{name}:", file=sys.stderr)
        results[name] = run_variant(VARIANTS[name], batches, args.steps, args.lr, args.data)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")

    kinds = sorted(results["lora"]["history"][0]["delta_norm"])
    print(f"\n||dW||_F, mean over layers, as a ratio to LoRA's (r=8, alpha 8, lr {args.lr}, LionW):")
    print("| variant | step | loss | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for name, result in results.items():
        for row, lora_row in zip(result["history"], results["lora"]["history"]):
            if row["step"] in (1, 2, args.steps // 2, args.steps):
                ratios = [row["delta_norm"][k] / lora_row["delta_norm"][k] for k in kinds]
                print(f"| {name} | {row['step']} | {row['loss']:.4f} | " + " | ".join(f"{x:.3f}" for x in ratios)
                      + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
