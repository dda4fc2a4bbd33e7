"""Which experts should share a RaSA pool? Reconstruction error of the two groupings on a tiny Mixtral's fine-tune.

    PYTHONPATH=src python3 benchmarks/moe_grouping.py --out benchmarks/results/2026-12-05-issue26/moe_grouping.json
(CPU, 2 minutes on this project's 2-core machine)

A tiny random Mixtral (4 layers, 8 experts, hidden 64, intermediate 96; experts as 3-D parameters) is fully
fine-tuned on the built-in arithmetic problems (bytes as tokens, AdamW); its expert deltas M[i, e] (layer i,
expert e) are then fitted by RaSA at rank r with k shared ranks per matrix (paper Sec. 3, App. A;
`rasa_lora.analysis.fit_rasa`), grouped two ways, at the same number of factor parameters:
- `per-expert`: expert e of every layer shares a pool (L*k ranks; E pools), what `rasa_lora.adapter.experts` does;
- `per-projection`: all L*E matrices of a projection share one pool (L*E*k ranks).
The second contains the first (zeroing the D entries outside an expert's share gives any per-expert fit), so
its error can only be lower; the question is by how much, against its cost: each expert then uses
r-k+L*E*k ranks instead of r-k+L*k (259 instead of 35 on Mixtral-8x7B at r=4, k=1) in the dW formed at every
forward. A Gaussian control (same shapes, no structure) shows the effect of the pool size alone. LoRA's error
(rank r per matrix) is the reference. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def arithmetic_batches(count: int, length: int, seed: int = 0) -> torch.Tensor:
    """The built-in arithmetic problems as bytes, concatenated and cut into (count, length) token rows."""
    from rasa_lora.train.data import PROMPT, arithmetic_problems

    text = "".join(PROMPT.format(instruction=p["instruction"]) + p["output"] + "\n"
                   for p in arithmetic_problems(4 * count, seed=seed))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    rows = len(data) // length
    return data[: rows * length].view(rows, length)[:count]


def expert_deltas(steps: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fine-tune a tiny Mixtral fully; each expert stack's delta as (L, E, b, a) (out, in per expert), and the
    training loss of the first and the last step."""
    from rasa_lora.models import tiny_mixtral

    model = tiny_mixtral(num_layers=4, hidden_size=64, intermediate_size=96, num_experts=8, vocab_size=256,
                         seed=seed).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 3}
    data = arithmetic_batches(512, 96, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    deltas: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if name in before:
            deltas.setdefault(name.rsplit(".", 1)[-1], []).append((param.detach() - before[name]).double())
    return {projection: torch.stack(stacks) for projection, stacks in deltas.items()}, [losses[0], losses[-1]]


def compare(M: torch.Tensor, r: int, k: int, iters: int) -> dict:
    """Relative errors of LoRA, per-expert and per-projection RaSA on M (L, E, b, a)."""
    from rasa_lora.analysis import fit_rasa, lora_solution

    layers, experts = M.shape[:2]
    flat = M.reshape(layers * experts, *M.shape[2:])
    energy = float(flat.square().sum())
    lora = lora_solution(flat, r, "exact").error
    per_expert = sum(fit_rasa(M[:, e], r, k, iters, variant="exact").final_error for e in range(experts))
    per_projection = fit_rasa(flat, r, k, iters, variant="exact").final_error
    return {"lora": lora / energy, "per_expert": per_expert / energy, "per_projection": per_projection / energy,
            "rank_per_expert": r - k + layers * k, "rank_per_projection": r - k + layers * experts * k,
            "shape": list(M.shape)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps (AdamW, batch 16 x 96 tokens)")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--iters", type=int, default=100, help="coordinate-descent iterations per fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    deltas, losses = expert_deltas(args.steps, args.seed)
    sources = {"fine-tune": deltas}
    generator = torch.Generator().manual_seed(args.seed)
    sources["gaussian"] = {name: torch.randn(M.shape, generator=generator, dtype=torch.float64)
                           for name, M in sources["fine-tune"].items()}
    rows = [{"source": source, "projection": name, "r": args.r, "k": args.k, **compare(M, args.r, args.k, args.iters)}
            for source, deltas in sources.items() for name, M in deltas.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "rows": rows, "loss_first_last": losses,
                               "seconds": time.perf_counter() - start}, indent=2))
    tmp.replace(out)
    print(f"fine-tune loss {losses[0]:.3f} -> {losses[1]:.3f} in {args.steps} steps")
    print(f"relative reconstruction error (r={args.r}, k={args.k}; lower is better), tiny Mixtral L=4, E=8")
    print(f"{'source':<10} {'projection':<13} {'LoRA':>7} {'per-expert':>11} {'per-proj.':>10} {'ranks/expert':>13}")
    for row in rows:
        print(f"{row['source']:<10} {row['projection']:<13} {row['lora']:>7.4f} {row['per_expert']:>11.4f} "
              f"{row['per_projection']:>10.4f} {row['rank_per_expert']:>6} / {row['rank_per_projection']:<5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
