"""One process of a 2-process CPU (gloo) job, started by `run_job` with torch.multiprocessing.

Each job sets the environment `accelerate launch` would set for its engine, builds an `Accelerator(cpu=True)` and,
for non-reentrant then reentrant checkpointing: prepares the model with `prepare_training`, runs forward/backward
on this rank's half of the global batch (two micro-batches, gradients synchronised at the second only, as the
trainer does), records the full gradients, takes one SGD step, records the full parameters and saves the adapter
with `save_adapter`. Rank 0 writes everything to `out_dir/results.pt`.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch

ENGINE_ENV = {
    "ddp": {},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_RESHARD_AFTER_FORWARD": "true"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_step(accelerator, use_reentrant: bool, out_dir: Path) -> dict:
    from rasa_lora.train import distributed
    from tests.distributed.common import LEARNING_RATE, build_model, global_batch

    model = build_model(use_reentrant)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model, optimizer, _ = distributed.prepare_training(accelerator, model, optimizer, None, use_reentrant)
    rows = distributed.local_micro_batches(list(global_batch()), accelerator)
    for index, row in enumerate(rows):  # one row per micro-batch: accumulation as in the trainer
        with distributed.micro_batch_sync(accelerator, model, last=index == len(rows) - 1):
            input_ids = row[None]
            accelerator.backward(model(input_ids=input_ids, labels=input_ids).loss / len(rows))
    unwrapped = accelerator.unwrap_model(model)
    trainable = [(name, param) for name, param in unwrapped.named_parameters() if param.requires_grad]
    grads = {name: distributed._full(param.grad) for name, param in trainable}
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm=1e9)  # the trainer's clipping call; a no-op here
    optimizer.step()
    params = {name: distributed._full(param) for name, param in trainable}
    adapter_dir = out_dir / f"adapter-{'reentrant' if use_reentrant else 'non_reentrant'}"
    distributed.save_adapter(model, accelerator, adapter_dir)
    kind = type(model).__name__
    return {"grads": grads, "params": params, "grad_norm": float(distributed._full(norm)),
            "adapter_dir": str(adapter_dir), "wrapper": kind,
            "engine": distributed.detect_engine(accelerator).value}


def _ddp_reentrant_without_static_graph(accelerator) -> str:
    """What plain DDP does with reentrant checkpointing and the shared pool (expected: an error)."""
    from tests.distributed.common import build_model, global_batch

    accelerator.ddp_handler = None
    model = accelerator.prepare(build_model(True))
    input_ids = global_batch()[accelerator.process_index::accelerator.num_processes]
    try:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    except RuntimeError as error:
        return str(error)
    return ""


def _fsdp2_layout(accelerator) -> dict:
    """The FSDP2 units accelerate's wrapping made, and whether the pools ended up sharded in the root."""
    from torch.distributed.tensor import DTensor

    from rasa_lora.train import distributed
    from tests.distributed.common import build_model

    model = build_model(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _, _ = distributed.prepare_training(accelerator, model, optimizer)
    pools = {name: isinstance(param, DTensor) for name, param in model.named_parameters() if "rasa_shared" in name}
    return {"units": distributed._fsdp_units(model), "pools_sharded": pools}


def worker(rank: int, world_size: int, port: int, engine: str, out_dir: str) -> None:
    # CUDA_VISIBLE_DEVICES="": a CPU job, also on a GPU machine. Otherwise gloo's barrier (accelerate's
    # wait_for_everyone passes device_ids=[local rank]) picks cuda:<rank>, which fails with fewer GPUs than processes
    # ("invalid device ordinal": seen on an H200 with one GPU visible). Set before anything in this process asks CUDA.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), CUDA_VISIBLE_DEVICES="",
                      **ENGINE_ENV[engine])
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        results = {mode: _one_step(accelerator, mode == "reentrant", out) for mode in ("non_reentrant", "reentrant")}
        if engine == "ddp":
            from rasa_lora.train.distributed import agreed_signal

            results["agreed_signal"] = agreed_signal(15 if rank == 1 else None, accelerator)  # only rank 1 got it
            results["plain_ddp_reentrant_error"] = _ddp_reentrant_without_static_graph(accelerator)
        else:
            results["layout"] = _fsdp2_layout(accelerator)
        if rank == 0:
            torch.save(results, out / "results.pt")
        accelerator.wait_for_everyone()
        accelerator.end_training()
    except BaseException:
        (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def run_job(engine: str, out_dir: Path, world_size: int = 2, target=None) -> dict:
    """Run the job (`target`, default `worker`: a module-level function of (rank, world_size, port, engine, out))
    in `world_size` fresh processes; return rank 0's results (raises with the ranks' tracebacks)."""
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(target or worker, args=(world_size, free_port(), engine, str(out_dir)), nprocs=world_size,
                           join=True, start_method="spawn")
    except Exception as error:
        logs = "\n".join(path.read_text() for path in sorted(out_dir.glob("error-rank*.txt")))
        raise RuntimeError(f"{engine} job failed:\n{logs}") from error
    return torch.load(out_dir / "results.pt", weights_only=False)
