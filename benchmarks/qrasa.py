"""QRaSA: step time and peak memory of RaSA on a 4-bit base against QLoRA and bf16 RaSA; a 70B-shaped step on one GPU.

Run on the GPU machine (bitsandbytes from the carried wheel, no network needed; the weights are random):
    pip install --no-deps .whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
    PYTHONPATH=src python3 benchmarks/qrasa.py --out $OUT/qrasa.json
On the CPU, a smoke run of the logic (tiny shapes):
    PYTHONPATH=src python3 benchmarks/qrasa.py --small --out /tmp/q.json

Part 1, the Llama-3.1-8B shape (32 layers, random weights), same process, one variant after the other, each a
training step (forward, backward with non-reentrant gradient checkpointing, a Lion update of the adapter):
- `rasa-bf16`: bf16 base, RaSA r=8 k=1 dropout 0.05 (the fused path);
- `qrasa`: the same base quantized to NF4 (bitsandbytes `Linear4bit`, blocks of 64, bf16 compute), RaSA's default
  on it: the base GEMM through bitsandbytes' `matmul_4bit` and eq. 5 in plain PyTorch (`rasa_lora.quant`);
- `qrasa-fused`: the same, through the fused path with each projection's weight dequantized for the call and
  released until its backward (`quant.set_fused_on_quantized(True)`, `quant.call_with_transient_weight`);
- `qlora`: PEFT's LoRA r=8 dropout 0.05 on the same NF4 layers (PEFT's `lora.bnb.Linear4bit`: QLoRA).
Median of `--steps` (>= 7) timed steps after `--warmup`; peak memory is torch's max allocated over the timed steps
(weights included: 4-bit rows hold ~4.5 GB of base, the bf16 row ~15 GB).

Part 2, the Llama-3.1-70B shape (80 layers) built directly in NF4 (one layer's bf16 weights at a time), RaSA r=4
k=1: the step's time and peak memory at `--big-layers` layers; on running out of memory it retries with fewer
layers (64, 48, 32, 16) and reports the largest count that fit.

Prints the table last and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "70b": (8192, 28672, 80, 64, 8, 128256),
    "small": (64, 160, 4, 4, 2, 256),
}


class Lion:
    """Lion on the trainable parameters (update sign(b1 m + (1-b1) g), momentum lerp with b2), as speed.py's."""

    def __init__(self, params, lr=5e-4, betas=(0.9, 0.95)):
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.b1, self.b2) = lr, betas
        self.momentum = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        update = torch._foreach_lerp(grads, self.momentum, self.b1)
        torch._foreach_sign_(update)
        torch._foreach_add_(self.params, update, alpha=-self.lr)
        torch._foreach_lerp_(self.momentum, grads, 1 - self.b2)
        for p in self.params:
            p.grad = None


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    hidden, inter, num_layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or num_layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=8192, tie_word_embeddings=False)


def _materialize(module: torch.nn.Module, device, dtype, generator: torch.Generator) -> None:
    """Give every parameter of `module` still on the meta device random values (N(0, 0.02); norms 1) on `device`."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if param.dim() == 1:
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02, generator=generator)
            setattr(sub, name, torch.nn.Parameter(value, requires_grad=param.requires_grad))


def build_model(shape: str, device, dtype, layers: int | None = None, nf4: bool = False):
    """A random Llama of `shape` on `device`; with `nf4` each decoder layer is quantized right after its random
    init, so the bf16 weights of only one layer exist at a time."""
    from transformers import LlamaForCausalLM

    from rasa_lora import quant

    config = llama_config(shape, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(0)
    for layer in model.model.layers:
        _materialize(layer, device, dtype, generator)
        if nf4:
            quant.quantize_model(layer, compute_dtype=dtype)
    _materialize(model, device, dtype, generator)  # embeddings, final norm, lm_head
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    if nf4:
        model.is_loaded_in_4bit = True
    return model


def attach(model, method: str, r: int):
    """RaSA (k = max(r/8, 1)) or PEFT LoRA, dropout 0.05, all seven projections, non-reentrant checkpointing."""
    from peft import LoraConfig, get_peft_model

    import rasa_lora
    from rasa_lora.train.methods import enable_gradient_checkpointing

    if method == "rasa":
        config = rasa_lora.RasaConfig(r=r, rasa_alpha=8, rasa_dropout=0.05, target_modules=ALL_PROJ)
    else:
        config = LoraConfig(r=r, lora_alpha=8, lora_dropout=0.05, target_modules=ALL_PROJ)
    model = get_peft_model(model, config)
    enable_gradient_checkpointing(model, use_reentrant=False)
    return model


def timed_steps(model, tokens: int, batch: int, steps: int, warmup: int, device) -> dict:
    """Median step seconds, (min, max), tokens/s and peak GiB over the timed steps of a training step."""
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, tokens // batch), generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = Lion(model.parameters())
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for step in range(warmup + steps):
        if step == warmup and cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"step_s": median, "min_s": min(times), "max_s": max(times), "tokens_per_s": tokens / median,
            "peak_gib": peak, "steps": len(times), "step_ms_all": [t * 1e3 for t in times]}


def _free() -> None:
    """Return freed CUDA memory to the driver (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_8b(args, device, dtype) -> list[dict]:
    """rasa-bf16, then the base quantized in place: qrasa, qrasa-fused, qlora (one base, adapters unloaded between)."""
    from rasa_lora import quant

    shape = "small" if args.small else "8b"
    rows = []
    base = build_model(shape, device, dtype)
    model = attach(base, "rasa", args.r)
    rows.append({"variant": "rasa-bf16", **timed_steps(model, args.tokens, args.batch, args.steps, args.warmup,
                                                       device)})
    base = model.unload()
    del model
    _free()
    quant.quantize_model(base, compute_dtype=dtype)
    _free()
    model = attach(base, "rasa", args.r)
    for variant, fused in (("qrasa", False), ("qrasa-fused", True)):
        quant.set_fused_on_quantized(fused)
        rows.append({"variant": variant, **timed_steps(model, args.tokens, args.batch, args.steps, args.warmup,
                                                       device)})
    quant.set_fused_on_quantized(False)
    base = model.unload()
    del model
    _free()
    model = attach(base, "lora", args.r)
    rows.append({"variant": "qlora", **timed_steps(model, args.tokens, args.batch, args.steps, args.warmup,
                                                   device)})
    del model, base
    _free()
    for row in rows:
        row.update(shape=shape, r=args.r, tokens=args.tokens)
    return rows


def big_step(args, device, dtype) -> list[dict]:
    """The 70B shape in NF4 with RaSA r=4: the first layer count of `--big-layers`, 64, 48, 32, 16 that runs."""
    shape = "small" if args.small else "70b"
    counts = [args.big_layers] + [n for n in (64, 48, 32, 16) if n < args.big_layers]
    results = []
    for layers in counts:
        model = None
        try:
            model = attach(build_model(shape, device, dtype, layers=layers, nf4=True), "rasa", 4)
            weights = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            row = timed_steps(model, args.tokens, args.batch, args.big_steps, 1, device)
            results.append({"variant": "qrasa-70b", "layers": layers, "fits": True, "weights_gib": weights,
                            "shape": shape, "r": 4, "tokens": args.tokens, **row})
            return results
        except torch.OutOfMemoryError as error:
            results.append({"variant": "qrasa-70b", "layers": layers, "fits": False, "shape": shape,
                            "error": str(error).splitlines()[0][:200]})
        finally:
            model = None
            _free()
    return results


def print_table(rows: list[dict]) -> None:
    base = next((row for row in rows if row["variant"] == "qlora" and "step_s" in row), None)
    print(f"{'variant':<11} {'shape':<6} {'layers':>6} {'step ms':>9} {'tok/s':>9} {'peak GiB':>9} {'x QLoRA':>8}")
    for row in rows:
        if "step_s" not in row:
            print(f"{row['variant']:<11} {row['shape']:<6} {row.get('layers', '-'):>6} {'out of memory':>28}")
            continue
        ratio = f"{row['step_s'] / base['step_s']:.2f}" if base and row["variant"] != "qrasa-70b" else "-"
        print(f"{row['variant']:<11} {row['shape']:<6} {row.get('layers', '-'):>6} {row['step_s'] * 1e3:>9.1f} "
              f"{row['tokens_per_s']:>9.0f} {row['peak_gib']:>9.2f} {ratio:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (tokens are split among them)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per 8B variant (at least 7)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=8, help="rank of the 8B comparison (RaSA k = max(r/8, 1))")
    parser.add_argument("--big-layers", type=int, default=80, help="layers of the 70B-shaped model to try first")
    parser.add_argument("--big-steps", type=int, default=3, help="timed steps of the 70B-shaped model")
    parser.add_argument("--skip-big", action="store_true", help="only the 8B comparison")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the logic)")
    args = parser.parse_args(argv)
    if args.steps < 7 and not args.small:
        parser.error("--steps must be at least 7 (the median of >= 7 steps is what RESULTS.md reports)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        parser.error("the full shapes need a GPU; use --small for a CPU smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import bitsandbytes

    rows = compare_8b(args, device, dtype)
    if not args.skip_big:
        rows += big_step(args, device, dtype)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__, "argv": sys.argv[1:] if argv is None else argv}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    tmp.replace(out)
    print(f"{info['device']}, torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, {args.tokens} tokens a step")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
