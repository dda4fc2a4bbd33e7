"""Paper Figures 2 and 3 on real weight updates: full fine-tune SmolLM2-135M on GSM8K, then analyse dW (issue 3).

    # GPU machine (model rebuilt as /tmp/smollm2.gguf by ../shared/gpu/stage_model.sh; data carried in):
    PYTHONPATH=src python3 benchmarks/real_deltas.py --train .data/gsm8k/train.jsonl --gguf /tmp/smollm2.gguf \
        --steps 300 --out $OUT/real_deltas
    # CPU check (embedded model, two steps):
    PYTHONPATH=src python3 benchmarks/real_deltas.py --train ../shared/data/gsm8k/train.jsonl --steps 2 \
        --batch-size 2 --seq-len 128 --iters 2 --k-sweep 0,1 --out /tmp/real_deltas

Fine-tuning: every parameter trained, float32 master weights (so that dW is not rounded to bf16 steps) with
bf16 autocast on CUDA, AdamW (betas 0.9/0.95, no weight decay), linear warm-up over 10% of the steps then
cosine decay, gradient clipping at 1.0, loss on the answer tokens only. Prompt: "Question: {q}\\nAnswer: " and
the GSM8K answer (with its worked solution) as the target. Batches are drawn with a seeded generator.

Analysis: dW_i = W_tuned - W_base for the seven projection groups of the 30 layers; `rasa-lora analyze`'s
pipeline with its defaults (fast variant on the device, r = 8, k = 1, "auto" start, convergence criterion
tol 1e-5 over 5 iterations, at most 200 iterations per start, k sweep 0..8); the run recorded in RESULTS.md
(session 3) used the earlier settings `--init random --iters 20 --tol 0`. `--save-deltas FILE` keeps the
deltas ({group: (modules, (L, b, a) tensor)}, torch.save) for later analyses.
Writes OUT/analysis.json, OUT/convergence.png, OUT/k_sweep.png and OUT/train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from rasa_lora.analysis.analyze import AnalysisConfig, parse_k_list, report_table, run_analysis
from rasa_lora.analysis.reconstruction import DEFAULT_INIT, DEFAULT_MAX_ITERS, DEFAULT_TOL, INITS
from rasa_lora.analysis.sources import Group, group_names


def load(gguf: str | None, device: torch.device):
    """(model in float32, tokenizer) from a GGUF path, or the embedded SmolLM2 when `gguf` is None."""
    if gguf is None:
        from rasa_lora.models import load_model, load_tokenizer

        return load_model(None).to(device), load_tokenizer(None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def encode(path: str, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per GSM8K row; the prompt's labels are -100."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or "question" not in rows[0] or "answer" not in rows[0]:
        raise ValueError(f"{path} is not GSM8K JSONL (fields question, answer).")
    examples = []
    for row in rows:
        prompt = tokenizer(f"Question: {row['question']}\nAnswer: ", add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:seq_len]
        examples.append((ids, ([-100] * len(prompt) + answer)[:seq_len]))
    return examples


def batch(examples, indices, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(examples[i][0]) for i in indices)
    ids = torch.full((len(indices), width), pad_id)
    labels = torch.full((len(indices), width), -100)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        tokens, targets = examples[i]
        ids[row, : len(tokens)], labels[row, : len(targets)], mask[row, : len(tokens)] = (
            torch.tensor(tokens), torch.tensor(targets), 1)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def fine_tune(model, examples, args: argparse.Namespace, device: torch.device) -> list[dict]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * max(0, s - warmup) / max(1, args.steps - warmup)))))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    log = []
    for step in range(args.steps):
        indices = torch.randint(len(examples), (args.batch_size,), generator=generator).tolist()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch(examples, indices, model.config.pad_token_id or 0, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": float(loss.detach()), "lr": schedule.get_last_lr()[0]})
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {log[-1]['loss']:.4f}", flush=True)
    model.eval()
    return log


def delta_groups(base_state: dict[str, torch.Tensor], model) -> list[Group]:
    tuned = dict(model.named_parameters())
    modules = [key[: -len(".weight")] for key in base_state]
    return [Group(name, members, torch.stack([(tuned[m + ".weight"].detach().float().cpu() - base_state[m + ".weight"])
                                              for m in members]))
            for name, members in group_names(modules).items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="GSM8K train.jsonl")
    parser.add_argument("--gguf", help="SmolLM2 GGUF file (default: the embedded model via rasa_lora.models)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--iters", type=int, default=DEFAULT_MAX_ITERS)
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL)
    parser.add_argument("--k-sweep", default="all")
    parser.add_argument("--init", choices=("auto",) + INITS, default=DEFAULT_INIT)
    parser.add_argument("--save-deltas", help="also torch.save the deltas to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load(args.gguf, device)
    base_state = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()
                  if p.ndim == 2 and ".layers." in name}
    examples = encode(args.train, tokenizer, args.seq_len)
    started = time.perf_counter()
    log = fine_tune(model, examples, args, device)
    train_s = time.perf_counter() - started
    groups = delta_groups(base_state, model)
    del model
    if args.save_deltas:
        torch.save({g.name: (g.modules, g.deltas) for g in groups}, args.save_deltas)
    config = AnalysisConfig(r=args.r, k=args.k, iters=args.iters, init=args.init, device=args.device,
                            sweep=parse_k_list(args.k_sweep), seed=args.seed, tol=args.tol)
    source = {"fine_tune": "SmolLM2-135M-Instruct, full fine-tune on GSM8K train", "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "train_s": train_s}
    report = run_analysis(groups, config, args.out, source, len(groups))
    Path(args.out, "train_log.json").write_text(json.dumps(log))
    print(report_table(report))
    print(f"fine-tune {train_s:.1f} s, analysis {report['wall_time_s']:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
