"""Greedy decoding time by batch size: how many GSM8K prompts to generate together (the replication study's
`generate` stage, `--batch-size`).

    PYTHONPATH=src python3 benchmarks/experiments/decode_batch.py --base-model /tmp/smollm2.gguf \\
        --batches 128,256,440,660,1319 --new-tokens 100 --out $OUT/decode_batch.json      # on the GPU
    PYTHONPATH=src python3 benchmarks/experiments/decode_batch.py --narrow --batches 1,8,32 --new-tokens 50  # CPU

Each row generates `--new-tokens` tokens for the B longest GSM8K test prompts (the stage's first batch; EOS held
off with `min_new_tokens`, so every batch runs the same number of steps) with the stage's stop-string criterion,
and once without it. A 135M model's decoding step is host-bound: while ms/step stays flat as B grows, a larger
batch is free, and the stage's total is about (batches x max-new-tokens) steps, since a batch runs until its
longest row ends (400 tokens when one row loops). `--narrow` swaps in a random model of SmolLM2's depth
(30 layers) and vocabulary at width 64: its step is the host's share alone, on any CPU. KV cache per token
(SmolLM2, bf16): 30 layers x 2 x 3 KV heads x 64 x 2 bytes = 23,040 bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    import torch

    from rasa_lora.evaluation.cli import load_model_and_tokenizer
    from rasa_lora.evaluation.generation import stop_string_criteria
    from rasa_lora.evaluation.tasks import load_task, math_prompt
    from rasa_lora.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--batches", default="64,128,256,440,660,1319")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--narrow", action="store_true", help="a random width-64 model of SmolLM2's depth")
    parser.add_argument("--random", action="store_true",
                        help="a random model of SmolLM2's shape and random prompts of the GSM8K prompts' lengths "
                             "(61-225 tokens, left-padded): the timing of the real model, without its file")
    parser.add_argument("--label", default="", help="a tag written into each row (e.g. the process number)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    if args.random:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=100000.0)
        model = LlamaForCausalLM(config).to(device, getattr(torch, dtype)).eval()
        tokenizer = None
    elif args.narrow:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = load_tokenizer(args.base_model)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=30,
                             num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=8192)
        model = LlamaForCausalLM(config).to(device, getattr(torch, dtype)).eval()
    else:
        model, tokenizer = load_model_and_tokenizer(args.base_model, None, dtype, device)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = sorted((math_prompt(item["question"]) for item in load_task("gsm8k", args.data_dir)), key=len,
                         reverse=True)
    rows = []
    name = "random SmolLM2-shaped model" if args.random else "narrow random model" if args.narrow else (
        args.base_model or "smollm2")
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), "
          f"{name}, {args.new_tokens} new tokens")
    print("| batch | stop string | ms/step | generated tokens/s | peak GiB |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        if tokenizer is None:  # left-padded random rows, 225 tokens down to 61 as the longest-first batches
            generator = torch.Generator().manual_seed(batch)
            lengths = torch.linspace(225, 61, batch).long()
            ids = torch.randint(1, 49152, (batch, 225), generator=generator)
            mask = (torch.arange(225)[None, :] >= (225 - lengths)[:, None]).long()
            encoded = {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}
        else:
            encoded = tokenizer(prompts[:batch], return_tensors="pt", padding=True).to(device)
        for stop in ((False,) if tokenizer is None else (True, False)):
            criteria = [stop_string_criteria(tokenizer, ["### Instruction"])] if stop else []
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with torch.no_grad():
                model.generate(**encoded, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, temperature=None, top_p=None, top_k=None,
                               pad_token_id=0 if tokenizer is None else tokenizer.pad_token_id,
                               eos_token_id=None if tokenizer is None else tokenizer.eos_token_id,
                               stopping_criteria=criteria)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            row = {"label": args.label, "batch": batch, "stop_string": stop,
                   "prompt_width": encoded["input_ids"].shape[1],
                   "ms_per_step": 1e3 * seconds / args.new_tokens, "tokens_per_s": batch * args.new_tokens / seconds,
                   "peak_gib": peak}
            rows.append(row)
            print(f"| {batch} | {'yes' if stop else 'no'} | {row['ms_per_step']:.1f} | {row['tokens_per_s']:.0f} | "
                  f"{'-' if peak is None else f'{peak:.1f}'} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": device, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
