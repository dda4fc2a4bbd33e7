"""Multi-GPU training with RaSA's shared pools: DDP, FSDP2, ZeRO-2 and ZeRO-3 against one GPU, same global batch.

    # nvidia-h200-x2, which lacks deepspeed: build its wheel here and carry it in .whl/ with what it needs there
    #   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
    #   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
    #       hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
    # then, there, after installing them into /tmp/site (SmolLM2 staged as /tmp/smollm2.gguf: ../shared/gpu/):
    PYTHONPATH=/tmp/site python3 benchmarks/multi_gpu.py --out $OUT/multi_gpu.json --models llama8b
    PYTHONPATH=/tmp/site python3 benchmarks/multi_gpu.py --out $OUT/mg.json --models /tmp/smollm2.gguf --trainer
    # resume (SIGTERM mid-run, then --resume) under every engine; with --no-workers only the trainer stages run:
    PYTHONPATH=/tmp/site python3 benchmarks/multi_gpu.py --out $OUT/resume.json --models /tmp/smollm2.gguf \
        --engines ddp,fsdp2,zero2,zero3 --no-workers --resume
    # CPU dry run (gloo, tiny random Llama; DeepSpeed needs GPUs):
    PYTHONPATH=src python3 benchmarks/multi_gpu.py --out /tmp/mg.json --models tiny --engines ddp,fsdp2
    # CPU dry run of the resume stage (a local model folder, e.g. the tests' tiny Llama with its tokenizer):
    PYTHONPATH=src python3 benchmarks/multi_gpu.py --out /tmp/r.json --models /tmp/tiny --engines fsdp2 \
        --no-workers --resume

For each model the driver runs, each in fresh processes:
1. `worker` on one GPU twice ("single", and "repeat": what one GPU gives twice, the floor of every comparison,
   since the fused kernels' split reductions add atomically and bf16 rounds their last bits differently from run to
   run), then under `accelerate launch --config_file configs/distributed/<engine>.yaml --num_processes 2` for each
   engine. The worker does what `rasa-lora train` does through
   `rasa_lora.train.distributed` (make_accelerator, prepare_training, local_micro_batches, micro_batch_sync,
   loss_divisor, save_adapter): RaSA r=8 k=1 on all seven projections, gradient checkpointing (non-reentrant),
   decoupled LionW, bf16 autocast, a few steps on seeded random token batches, the same global batch in every run
   (one GPU accumulates all micro-batches; each of 2 GPUs takes half). It records each step's loss and time, the
   pools' full gradients at the first step on every rank, the logits of a probe batch after training, and saves
   the adapter. Dropout is 0 and B starts random (`init_weights=False`) so that runs are comparable and every
   first-step gradient is non-zero.
2. `load`, on one GPU: the base model with each run's saved adapter (several adapters in one PeftModel); logits
   of the probe batch against the logits the run itself computed before saving, and against the one-GPU run, with
   the fused path off (PyTorch's reference path, deterministic: the same adapter gives the same bits) and on.
3. With `--trainer` (a real model): `rasa-lora train` itself on one GPU and under each engine (built-in
   arithmetic data, dropout 0); per-step losses from metrics.jsonl against the one-GPU run's.
4. With `--resume`: `rasa-lora train` under each engine uninterrupted twice (the run-to-run spread), and once with
   SIGTERM sent to the launcher after a third of its steps (exit 143, one checkpoint), then `--resume`; the
   resumed adapter (every tensor, pools included) and per-step losses against the uninterrupted run's. ok: within
   twice the spread, and bitwise where the spread is 0 (fp32 on the CPU: it is).

Checks (bf16 autocast everywhere; relative errors, Frobenius norm; "repeat" shows what one GPU gives twice):
- each step's loss against one GPU: <= 1e-3 for DDP and FSDP2, <= 1e-2 for ZeRO-3 (DeepSpeed's bf16 mode casts
  the adapter to bf16 and keeps fp32 master weights);
- pool gradients at step 1: present, finite, identical on both ranks, and within 2e-2 of one GPU's (bf16: one
  rounding of a gradient is up to 3.9e-3 of it), 5e-2 for ZeRO-3; also reported over the repeat's figure. On the
  random Llama-3.1-8B shape the repeat itself differs by 5.6e-2 (2 H200s, `benchmarks/RESULTS.md`, session 8): the
  kernels' atomic rounding differences grow through 32 random layers; there the ratio to the repeat is the check;
- the saved adapter loaded on one GPU gives the run's own logits on the reference path within 1e-5 (1e-2 for ZeRO-3,
  whose run computed with the bf16 copy of the adapter); the fused path's figure is reported beside it;
- DDP throughput on 2 GPUs >= 1.8x one GPU (median step time, steps after the first two).
Writes one JSON with every figure and each failed process's error; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# ZeRO-2 takes ZeRO-3's bounds: the same bf16 mode of DeepSpeed (not run on GPUs yet when these were set)
LOSS_TOL = {"repeat": 1e-3, "ddp": 1e-3, "fsdp2": 1e-3, "zero2": 1e-2, "zero3": 1e-2}
GRAD_TOL = {"repeat": 2e-2, "ddp": 2e-2, "fsdp2": 2e-2, "zero2": 5e-2, "zero3": 5e-2}
LOGIT_TOL = {"single": 1e-5, "repeat": 1e-5, "ddp": 1e-5, "fsdp2": 1e-5, "zero2": 1e-2, "zero3": 1e-2}  # reference path
DDP_SPEEDUP_GOAL = 1.8
# model key: (global batch rows, micro-batch rows, sequence length, steps)
SHAPES = {"llama8b": (8, 2, 2048, 6), "tiny": (8, 2, 16, 4), "gguf": (16, 4, 512, 5)}
ONE_GPU = ("single", "repeat")
# `rasa-lora train` (real data, lr warmup, Lion): Lion moves every element by +-lr whatever its gradient's size, so
# elements whose gradient is near 0 take either sign from run to run and runs drift apart faster than under SGD
TRAINER_LOSS_TOL = 1e-2


def _key(model: str) -> str:
    return "gguf" if model.endswith(".gguf") else model


def _label(model: str) -> str:
    return Path(model).stem if model.endswith(".gguf") else Path(model).name  # a local model folder: its name


# --- the model, data and adapter (identical in every process) ---------------------------------------------------
def build_base(model: str, device: torch.device) -> torch.nn.Module:
    """The base model, seeded: a Llama-3.1-8B-shaped random bf16 model, a tiny random one, or a GGUF file."""
    if model == "tiny":
        from rasa_lora.models import tiny_llama

        return tiny_llama(seed=0).to(device)
    if model == "llama8b":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                return LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    from rasa_lora.models import load_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_model(model, dtype=dtype).to(device)


def add_rasa(base: torch.nn.Module) -> torch.nn.Module:
    from peft import get_peft_model

    import rasa_lora
    from rasa_lora.models import LLAMA_PROJECTIONS

    torch.manual_seed(1)
    config = rasa_lora.RasaConfig(r=8, rasa_k=1, rasa_alpha=16, rasa_dropout=0.0, target_modules=LLAMA_PROJECTIONS,
                                  init_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def step_batch(step: int, rows: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(1000 + step))


def probe_batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(99))


def probe_logits(model, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Logits of the probe batch (eval mode) on the fused path and on the reference path (collective if sharded)."""
    from rasa_lora.ops.rasa_linear import set_fused_backend

    out = {}
    model.eval()
    try:
        for path, fused in (("fused", None), ("reference", False)):
            set_fused_backend(fused)
            with torch.no_grad(), _autocast(device):
                out[path] = model(input_ids=probe_batch(vocab).to(device)).logits.float().cpu()
    finally:
        set_fused_backend(None)
    return out


def _autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# --- worker: one process of a run ---------------------------------------------------------------------------
def _pool_grads(model, accelerator, engine) -> dict[str, torch.Tensor]:
    """Full fp32 CPU gradients of every pool tensor as this rank sees them (collective where sharded)."""
    from rasa_lora.train import distributed

    unwrapped = accelerator.unwrap_model(model)
    grads = {}
    for name, param in unwrapped.named_parameters():
        if "rasa_shared" not in name:
            continue
        if engine in (distributed.Engine.ZERO2, distributed.Engine.ZERO3):
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(param)
        else:
            grad = param.grad
        grads[name] = None if grad is None else distributed._full(grad).float()
    return grads


def _cross_rank_difference(grads: dict[str, torch.Tensor], accelerator) -> float:
    """Largest |difference| between this rank's pool gradients and any other rank's (0 when identical)."""
    flat = torch.cat([g.flatten() for g in grads.values()]).to(accelerator.device)
    every = accelerator.gather(flat).view(accelerator.num_processes, -1)
    return float((every - every[0]).abs().max())


def worker(args: argparse.Namespace) -> None:
    from rasa_lora.train import distributed
    from rasa_lora.train.methods import enable_gradient_checkpointing
    from rasa_lora.train.optim import DecoupledLionW

    out = Path(args.run_dir)
    accelerator = distributed.make_accelerator()  # first, as in `rasa-lora train` (ZeRO-3 then loads with zero.Init)
    engine = distributed.detect_engine(accelerator)
    device = accelerator.device
    rows, micro, seq, steps = SHAPES[_key(args.model)]
    model = add_rasa(build_base(args.model, device))
    vocab = model.config.vocab_size
    enable_gradient_checkpointing(model, use_reentrant=False)
    model.train()
    optimizer = DecoupledLionW([p for p in model.parameters() if p.requires_grad], lr=5e-4, betas=(0.9, 0.95))
    model, optimizer, _ = distributed.prepare_training(accelerator, model, optimizer, None, False, micro)

    captured: dict[str, torch.Tensor] = {}
    if engine in (distributed.Engine.ZERO2, distributed.Engine.ZERO3):  # DeepSpeed steps inside backward
        engine_step = model.step

        def step_capturing_grads(*a, **k):
            if not captured:
                captured.update(_pool_grads(model, accelerator, engine))
            return engine_step(*a, **k)

        model.step = step_capturing_grads

    losses, times = [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        batch = step_batch(step, rows, seq, vocab)
        micro_batches = list(batch.split(micro))
        divisor = distributed.loss_divisor(rows * (seq - 1), accelerator)
        local = distributed.local_micro_batches(micro_batches, accelerator)
        total = 0.0
        for index, ids in enumerate(local):
            ids = ids.to(device)
            with distributed.micro_batch_sync(accelerator, model, last=index == len(local) - 1):
                with _autocast(device):
                    loss = model(input_ids=ids, labels=ids, num_items_in_batch=divisor).loss
                accelerator.backward(loss)
            total += loss.item()
        if not captured:
            captured.update(_pool_grads(model, accelerator, engine))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        summed = accelerator.reduce(torch.tensor([total], dtype=torch.float64, device=device), "sum")
        losses.append(float(summed[0]) / accelerator.num_processes)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        if accelerator.is_main_process:
            print(f"[{args.label}] step {step + 1}/{steps} loss {losses[-1]:.5f} {times[-1] * 1e3:.0f} ms", flush=True)

    finite = all(bool(torch.isfinite(g).all()) for g in captured.values() if g is not None)
    missing = sorted(name for name, g in captured.items() if g is None)
    cross = _cross_rank_difference({k: v for k, v in captured.items() if v is not None}, accelerator)
    logits = probe_logits(model, vocab, device)
    distributed.save_adapter(model, accelerator, out / "adapter")
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0], device=device)
    peaks = accelerator.gather(peak).tolist()
    if accelerator.is_main_process:
        torch.save({"pool_grads": captured, "logits": logits}, out / "tensors.pt")
        timed = times[2:] or times
        result = {
            "label": args.label, "engine": engine.value, "processes": accelerator.num_processes,
            "wrapper": type(model).__name__, "global_rows": rows, "micro_rows": micro, "seq": seq,
            "tokens_per_step": rows * seq, "losses": losses, "step_s": times,
            "median_step_s": statistics.median(timed), "tokens_per_s": rows * seq / statistics.median(timed),
            "pool_tensors": len(captured), "pool_grads_missing": missing, "pool_grads_finite": finite,
            "pool_grad_cross_rank_max_abs_diff": cross, "peak_gib_per_rank": peaks,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # Leave without the interpreter's teardown: with gloo (the CPU dry run) it can deadlock when the DDP reducer's
    # process group is destroyed while a gloo thread waits for the GIL (seen with torch 2.13: ~1 run in 6 hung).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- load: the saved adapters on one GPU ------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def load_check(args: argparse.Namespace) -> None:
    from peft import PeftModel

    import rasa_lora  # noqa: F401  (registers RaSA with PEFT)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = {name: Path(path) for name, path in (item.split("=", 1) for item in args.runs.split(","))}
    base = build_base(args.model, device)
    vocab = base.config.vocab_size
    reference = args.reference
    model, out = None, {}
    for name, run_dir in runs.items():
        adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir  # worker / `rasa-lora train`
        if model is None:
            model = PeftModel.from_pretrained(base, str(adapter), adapter_name=name)
        else:
            model.load_adapter(str(adapter), adapter_name=name)
        model.set_adapter(name)
        logits = probe_logits(model, vocab, device)
        again = probe_logits(model, vocab, device)["fused"]
        out[name] = {"logits": logits, "vs_own_run": None, "vs_own_run_fused": None,
                     "fused_twice_here": rel_err(again, logits["fused"])}
        if (run_dir / "tensors.pt").exists():  # the logits the run computed itself before saving
            own = torch.load(run_dir / "tensors.pt")["logits"]
            out[name].update(vs_own_run=rel_err(logits["reference"], own["reference"]),
                             vs_own_run_fused=rel_err(logits["fused"], own["fused"]))
    for name in out:
        out[name]["vs_one_gpu"] = rel_err(out[name]["logits"]["reference"], out[reference]["logits"]["reference"])
    for row in out.values():
        del row["logits"]
    Path(args.result).write_text(json.dumps(out, indent=1))


# --- driver -----------------------------------------------------------------------------------------------------
def _run(command: list[str], log: Path, env: dict[str, str], timeout: int) -> dict:
    started = time.perf_counter()
    with log.open("w") as handle:
        # its own session, so that a timeout ends the launcher's worker processes too, not the launcher alone
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    print(f"  {' '.join(command[-8:])}: rc={rc} in {seconds:.0f} s", flush=True)
    return {"rc": rc, "wall_s": round(seconds, 1), "log_tail": text[-3000:] if rc != 0 else text[-600:]}


def _run_as(name: str, target: list[str], log: Path, env: dict[str, str], timeout: int, module: bool = False) -> dict:
    """Run `target` (this script's arguments, or a module's with `module`) on one GPU when `name` is one of
    ONE_GPU, else under engine `name` on every GPU; returns `_run`'s record."""
    engine = None if name in ONE_GPU else name
    if engine is None and torch.cuda.is_available():
        env = dict(env, CUDA_VISIBLE_DEVICES="0")
    return _run(_launch(engine, target, module), log, env, timeout)


def _launch(engine: str | None, args_after: list[str], module: bool = False) -> list[str]:
    target = ["-m", *args_after] if module else [str(Path(__file__).relative_to(ROOT)), *args_after]
    if engine is None:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/distributed/{engine}.yaml",
            "--num_processes", str(args_procs()), "--main_process_port", str(_free_port()), *target]


def _free_port() -> int:
    """A port nobody listens on: two jobs rendezvousing on accelerate's default 29500 would join one group."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def args_procs() -> int:
    return int(os.environ.get("MULTI_GPU_PROCESSES", "2"))


def _loss_errors(losses: list[float], reference: list[float]) -> list[float]:
    """Relative error of each step's loss against the reference run's (over the steps both have)."""
    return [abs(a - b) / abs(b) for a, b in zip(losses, reference)]


def _compare(single: dict, run: dict, engine: str, single_tensors: Path, run_tensors: Path) -> dict:
    loss_err = _loss_errors(run["losses"], single["losses"])
    mine, ref = torch.load(run_tensors)["pool_grads"], torch.load(single_tensors)["pool_grads"]
    grad_err = {name: rel_err(mine[name], ref[name]) for name in ref if mine.get(name) is not None}
    worst = max(grad_err, key=grad_err.get) if grad_err else None
    out = {"loss_rel_err": loss_err, "loss_ok": max(loss_err) <= LOSS_TOL[engine],
           "pool_grad_rel_err_max": grad_err[worst] if worst else None, "pool_grad_worst": worst,
           "pool_grad_rel_err": grad_err,
           "pool_grad_ok": bool(grad_err) and grad_err[worst] <= GRAD_TOL[engine]
           and len(grad_err) == len(ref) and run["pool_grads_finite"] and not run["pool_grads_missing"],
           "pool_grads_equal_across_ranks": run["pool_grad_cross_rank_max_abs_diff"] == 0.0,
           "throughput_vs_one_gpu": single["median_step_s"] / run["median_step_s"]}
    if engine == "ddp":
        out["throughput_ok"] = out["throughput_vs_one_gpu"] >= DDP_SPEEDUP_GOAL
    return out


def _metrics_losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def trainer_runs(model: str, engines: list[str], work: Path, env: dict, timeout: int, out: dict, save) -> dict:
    """`rasa-lora train` on one GPU (twice) and under each engine, into `out` (`save()` after each run); per-step
    losses against one GPU."""
    steps, rows, micro = (4, 16, 4) if torch.cuda.is_available() else (2, 4, 1)  # CPU: a dry run
    keys = ["--base-model", model, "--max-steps", str(steps), "--global-batch-size", str(rows), "--micro-batch-size",
            str(micro), "--num-examples", "128", "--dropout", "0", "--logging-steps", "1", "--progress-bar", "false",
            "--overwrite", "true"]
    for name in [*ONE_GPU, *engines]:
        run_dir = work / f"trainer-{name}"
        out[name] = _run_as(name, ["rasa_lora.cli", "train", *keys, "--output-dir", str(run_dir)],
                            work / f"trainer-{name}.log", env, timeout, module=True)
        out[name]["losses"] = _metrics_losses(run_dir)
        out[name]["adapter"] = str(run_dir)
        save()
    single = out["single"]["losses"]
    for engine in ["repeat", *engines]:
        mine = out[engine]["losses"]
        if single and len(mine) == len(single):
            errs = _loss_errors(mine, single)
            out[engine]["loss_rel_err"] = errs
            out[engine]["loss_ok"] = max(errs) <= TRAINER_LOSS_TOL
    return out


def _run_interrupted(command: list[str], log: Path, env: dict[str, str], timeout: int, metrics: Path,
                     after_steps: int) -> dict:
    """`_run`, but SIGTERM to the launcher once `metrics` has `after_steps` rows (a scheduler's preemption)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sent = None
        while proc.poll() is None and time.perf_counter() - started < timeout:
            if sent is None and metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps:
                proc.send_signal(signal.SIGTERM)
                sent = len(metrics.read_text().splitlines())
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    text = log.read_text(errors="replace")
    print(f"  {' '.join(command[-8:])}: SIGTERM after step {sent}, rc={rc}", flush=True)
    return {"rc": rc, "signal_after_step": sent, "wall_s": round(time.perf_counter() - started, 1),
            "log_tail": text[-3000:]}


def _adapter_difference(a_dir: Path, b_dir: Path) -> dict:
    """Max |a - b| over every adapter tensor and the relative error of all of them together (Frobenius)."""
    from safetensors.torch import load_file

    files = [directory / "adapter_model.safetensors" for directory in (a_dir, b_dir)]
    if not all(path.is_file() for path in files):
        return {}
    a, b = (load_file(path) for path in files)
    if a.keys() != b.keys():
        return {"keys_differ": sorted(set(a) ^ set(b))[:5]}
    diff = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    norm = sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5
    return {"max_abs": max(float((a[k].double() - b[k].double()).abs().max()) for k in a),
            "rel": diff / max(norm, 1e-30), "bitwise": all(torch.equal(a[k], b[k]) for k in a),
            "pools": sum("rasa_shared" in k for k in a)}


def resume_runs(model: str, engines: list[str], work: Path, env: dict, timeout: int, out: dict, save) -> dict:
    """Per engine, `rasa-lora train` (dropout 0) uninterrupted twice (the spread) and once with SIGTERM after a third
    of its steps, then `--resume`: the resumed adapter and losses against the uninterrupted run's, beside the spread.
    ok: the resumed run differs from the uninterrupted one by at most twice the spread (bitwise where it is 0)."""
    steps, rows, micro = (12, 16, 4) if torch.cuda.is_available() else (6, 4, 1)  # CPU: a dry run
    keys = ["--base-model", model, "--max-steps", str(steps), "--global-batch-size", str(rows), "--micro-batch-size",
            str(micro), "--num-examples", "256", "--dropout", "0", "--logging-steps", "1", "--progress-bar", "false"]
    for engine in engines:
        row = out[engine] = {}
        dirs = {name: work / f"resume-{engine}-{name}" for name in ("straight", "again", "interrupted")}
        for name in ("straight", "again"):
            row[name] = _run_as(engine, ["rasa_lora.cli", "train", *keys, "--overwrite", "true", "--output-dir",
                                         str(dirs[name])], work / f"resume-{engine}-{name}.log", env, timeout, True)
        interrupted = dirs["interrupted"]
        if interrupted.exists():
            import shutil

            shutil.rmtree(interrupted)
        row["interrupted"] = _run_interrupted(
            _launch(engine, ["rasa_lora.cli", "train", *keys, "--output-dir", str(interrupted)], module=True),
            work / f"resume-{engine}-interrupted.log", env, timeout, interrupted / "metrics.jsonl", steps // 3)
        row["checkpoints"] = sorted(p.name for p in (interrupted / "checkpoints").glob("step-*"))
        row["resumed"] = _run_as(engine, ["rasa_lora.cli", "train", "--output-dir", str(interrupted), "--resume",
                                          "true"], work / f"resume-{engine}-resumed.log", env, timeout, True)
        straight = _metrics_losses(dirs["straight"])
        for name in ("again", "interrupted"):
            mine = _metrics_losses(dirs[name])
            row[f"{name}_loss_rel_err"] = _loss_errors(mine, straight) if len(mine) == len(straight) else None
            row[f"{name}_adapter"] = _adapter_difference(dirs[name], dirs["straight"])
        spread, resumed = row["again_adapter"].get("rel"), row["interrupted_adapter"].get("rel")
        ran = row["interrupted"]["rc"] == 143 and row["resumed"]["rc"] == 0 and None not in (spread, resumed)
        row["ok"] = ran and (resumed <= 2 * spread if spread else resumed == 0.0)
        save()
    return out


def drive(args: argparse.Namespace) -> dict:
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                                                  os.environ.get("PYTHONPATH")]))}
    engines = [e for e in args.engines.split(",") if e]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "engines": engines, "processes": args_procs(),
              "torch": torch.__version__, "gpus": torch.cuda.device_count(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "models": {}}
    for model in [m for m in args.models.split(",") if m]:
        label = _label(model)
        work = Path(args.work) / label
        work.mkdir(parents=True, exist_ok=True)
        print(f"== {label}", flush=True)
        entry = report["models"][label] = {"processes": {}, "runs": {}, "compare": {}}
        for name in [*ONE_GPU, *engines] if args.workers else []:
            run_dir = work / name
            run_dir.mkdir(exist_ok=True)
            entry["processes"][name] = _run_as(
                name, ["worker", "--model", model, "--run-dir", str(run_dir), "--label", f"{label}/{name}"],
                work / f"{name}.log", env, args.timeout)
            if (run_dir / "result.json").exists():
                entry["runs"][name] = json.loads((run_dir / "result.json").read_text())
            _write(report, args)  # after every process: a call cut short keeps what ran
        if "single" in entry["runs"]:
            for engine in ["repeat", *engines]:
                if engine in entry["runs"]:
                    entry["compare"][engine] = _compare(entry["runs"]["single"], entry["runs"][engine], engine,
                                                        work / "single" / "tensors.pt", work / engine / "tensors.pt")
            floor = entry["compare"].get("repeat", {}).get("pool_grad_rel_err_max")
            for row in entry["compare"].values():  # against what one GPU gives twice
                if floor and row["pool_grad_rel_err_max"] is not None:
                    row["pool_grad_err_over_repeat"] = row["pool_grad_rel_err_max"] / floor
        saved = {name: work / name for name in entry["runs"] if (work / name / "adapter").exists()}
        entry["load"] = _load_step(model, saved, work / "load", entry["processes"], env, args.timeout)
        _write(report, args)
        if args.trainer:
            trainer = entry["trainer"] = {}
            trainer_runs(model, engines, work, env, args.timeout, trainer, lambda: _write(report, args))
            saved = {name: work / f"trainer-{name}" for name, row in trainer.items() if row["rc"] == 0}
            entry["trainer_load"] = _load_step(model, saved, work / "trainer-load", entry["processes"], env,
                                               args.timeout)
        if args.resume:
            entry["resume"] = {}
            resume_runs(model, engines, work, env, args.timeout, entry["resume"], lambda: _write(report, args))
        _write(report, args)
    return report


def _load_step(model: str, saved: dict[str, Path], stem: Path, processes: dict, env: dict, timeout: int) -> dict:
    """Every saved adapter loaded on one GPU (one process): logits against the run's own and the one-GPU run's."""
    if "single" not in saved:
        return {}
    result = stem.with_suffix(".json")
    runs = ",".join(f"{name}={path}" for name, path in saved.items())
    processes[stem.name] = _run_as("single", ["load", "--model", model, "--runs", runs, "--reference", "single",
                                              "--result", str(result)], stem.with_suffix(".log"), env, timeout)
    if not result.exists():
        return {}
    loaded = json.loads(result.read_text())
    for name, row in loaded.items():
        row["ok"] = None if row["vs_own_run"] is None else row["vs_own_run"] <= LOGIT_TOL[name]
    return loaded


def _write(report: dict, args: argparse.Namespace) -> None:
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.logs:
        logs = sorted(Path(args.work).glob("*/*.log"))
        text = "".join(f"===== {log}\n{log.read_text(errors='replace')[-20000:]}\n" for log in logs)
        Path(args.logs).write_text(text)


def print_table(report: dict) -> None:
    print(f"\n{report['device']} x{report['gpus']} torch {report['torch']}  (ratios/errors against one GPU)")
    print(f"{'model':<12}{'run':<8}{'loss err':>10}{'grad err':>10}{'ranks eq':>9}{'logit ref':>10}{'fused':>9}"
          f"{'step s':>8}{'speedup':>9}{'GiB/rank':>9}  ok")
    for label, entry in report["models"].items():
        for name, run in entry["runs"].items():
            cmp = entry["compare"].get(name, {})
            load = entry.get("load", {}).get(name, {})
            fmt = (lambda v, f: format(v, f) if isinstance(v, float) else "-")  # noqa: E731
            oks = [cmp.get(k) for k in ("loss_ok", "pool_grad_ok", "throughput_ok")] + [load.get("ok")]
            ok = "-" if all(o is None for o in oks) else str(all(o for o in oks if o is not None))
            print(f"{label:<12}{name:<8}{fmt(max(cmp.get('loss_rel_err', [0.0]) or [0.0]) if cmp else None, '.1e'):>10}"
                  f"{fmt(cmp.get('pool_grad_rel_err_max'), '.1e'):>10}"
                  f"{str(cmp.get('pool_grads_equal_across_ranks', '-')):>9}{fmt(load.get('vs_own_run'), '.1e'):>10}"
                  f"{fmt(load.get('vs_own_run_fused'), '.1e'):>9}"
                  f"{run['median_step_s']:>8.3f}{fmt(cmp.get('throughput_vs_one_gpu'), '.2f'):>9}"
                  f"{max(run['peak_gib_per_rank']):>9.1f}  {ok}")
        for name, proc in entry["processes"].items():
            if proc["rc"] != 0:
                print(f"{label:<12}{name:<8}FAILED rc={proc['rc']}: {proc['log_tail'][-300:]!r}")
        for name, row in entry.get("trainer", {}).items():
            errs = row.get("loss_rel_err")
            logits = entry.get("trainer_load", {}).get(name, {}).get("vs_one_gpu")
            print(f"{label:<12}train/{name:<6} rc={row['rc']} losses={[round(v, 4) for v in row['losses']]}"
                  + (f" max rel err {max(errs):.1e}" if errs else "")
                  + (f"; loaded on 1 GPU, logits vs one GPU's adapter {logits:.1e}" if logits is not None else ""))


def print_resume(report: dict) -> None:
    for label, entry in report["models"].items():
        for engine, row in entry.get("resume", {}).items():
            spread, resumed = row.get("again_adapter", {}), row.get("interrupted_adapter", {})
            print(f"{label:<12}resume/{engine:<6} SIGTERM after step {row['interrupted'].get('signal_after_step')} "
                  f"rc={row['interrupted']['rc']}, resumed rc={row['resumed']['rc']}; adapter vs uninterrupted: "
                  f"rel {resumed.get('rel')}, bitwise {resumed.get('bitwise')}; two uninterrupted runs: rel "
                  f"{spread.get('rel')}; losses max rel err {max(row['interrupted_loss_rel_err'] or [float('nan')])}"
                  f" (spread {max(row['again_loss_rel_err'] or [float('nan')])})  ok={row['ok']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("--model", required=True)
    w.add_argument("--run-dir", required=True)
    w.add_argument("--label", default="")
    ld = sub.add_parser("load")
    ld.add_argument("--model", required=True)
    ld.add_argument("--runs", required=True)
    ld.add_argument("--reference", default="single")
    ld.add_argument("--result", required=True)
    parser.add_argument("--out", default="multi_gpu.json")
    parser.add_argument("--models", default="llama8b")
    parser.add_argument("--engines", default="ddp,fsdp2,zero2,zero3")
    parser.add_argument("--work", default="/tmp/multi_gpu")
    parser.add_argument("--trainer", action="store_true", help="also run `rasa-lora train` under each engine")
    parser.add_argument("--resume", action="store_true",
                        help="also `rasa-lora train` under each engine: SIGTERM mid-run + --resume vs uninterrupted")
    parser.add_argument("--no-workers", dest="workers", action="store_false",
                        help="skip the worker runs (with --trainer: only `rasa-lora train`)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per process")
    parser.add_argument("--logs", default="", help="also write every process's log (last 20000 characters) here")
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
    elif args.command == "load":
        load_check(args)
    else:
        report = drive(args)
        print_table(report)
        print_resume(report)


if __name__ == "__main__":
    main()
