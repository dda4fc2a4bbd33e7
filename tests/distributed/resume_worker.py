"""One process of a 2-process CPU (gloo) job that checkpoints and resumes through `checkpoint.save_training_state` /
`load_training_state`, the functions the trainer calls; started by `run_resume_job` with torch.multiprocessing.

Per engine, in the same two processes: (1) 4 steps straight; (2) 2 steps, then a checkpoint; (3) a fresh model and
optimizer, prepared, resumed from that checkpoint, 2 more steps; (4) as (3) but the optimizer state is not restored
(the negative control: the test must see it). Each run ends with the whole adapter gathered (`gather_adapter_entries`).
The optimizer is the recipe's LionW, whose sign update makes a lost momentum visible at once.

DDP and FSDP2 go through accelerate and `prepare_training` as in the trainer (rasa-lora shards CPUs with FSDP2
itself). accelerate
runs DeepSpeed only on GPUs, so ZeRO-2/3 use `deepspeed.initialize` on DeepSpeed's CPU accelerator with a stand-in
for the accelerator (`detect_engine` reads its state as accelerate's); the checkpoint calls are the trainer's.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from tests.distributed.worker import ENGINE_ENV, run_job

STEPS, SPLIT, LR = 4, 2, 1e-3


def _batch(step: int) -> torch.Tensor:
    from tests.distributed.common import SEQ_LEN, VOCAB

    return torch.randint(0, VOCAB, (4, SEQ_LEN), generator=torch.Generator().manual_seed(100 + step))


class _DeepSpeedAccelerator:
    """What the checkpoint functions read from an accelerate `Accelerator` running DeepSpeed."""

    def __init__(self, stage: int) -> None:
        import torch.distributed as dist

        plugin = SimpleNamespace(zero_stage=stage)
        self.state = SimpleNamespace(distributed_type="DEEPSPEED", deepspeed_plugin=plugin)
        self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
        self.is_main_process = self.process_index == 0

    def wait_for_everyone(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def unwrap_model(self, model):
        return getattr(model, "module", model)


def _build(engine: str, accelerator):
    from rasa_lora.train import distributed
    from rasa_lora.train.optim import DecoupledLionW
    from tests.distributed.common import build_model

    model = build_model(False)
    optimizer = DecoupledLionW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    if engine in ("ddp", "fsdp2"):
        model, optimizer, scheduler = distributed.prepare_training(accelerator, model, optimizer, scheduler)
        return model, optimizer, scheduler
    import deepspeed

    stage = 3 if engine == "zero3" else 2
    if stage == 3:
        distributed.register_zero3_external_parameters(model)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine_model, engine_optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine_model, engine_optimizer, scheduler


def _steps(engine: str, model, optimizer, scheduler, accelerator, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        ids = _batch(step)[accelerator.process_index::accelerator.num_processes]
        loss = model(input_ids=ids, labels=ids).loss
        if engine in ("ddp", "fsdp2"):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.backward(loss)
            model.step()
        scheduler.step()
        losses.append(float(loss))
    return losses


def _adapter(model, accelerator) -> dict[str, torch.Tensor]:
    from rasa_lora.train import distributed

    return distributed.gather_adapter_entries(model, accelerator)


def _resumed(engine: str, accelerator, path: Path, with_optimizer: bool) -> dict:
    from rasa_lora.train import checkpoint

    model, optimizer, scheduler = _build(engine, accelerator)
    if not with_optimizer:
        if engine in ("ddp", "fsdp2"):  # the checkpoint without optimizer state
            copy = path.with_name(path.name + "-no-optimizer")
            if accelerator.is_main_process:
                import shutil

                shutil.copytree(path, copy, dirs_exist_ok=True)
                payload = torch.load(copy / checkpoint.STATE, weights_only=False)
                payload["optimizer"]["state"] = {}
                torch.save(payload, copy / checkpoint.STATE)
            accelerator.wait_for_everyone()
            path = copy
        else:
            load = model.load_checkpoint
            model.load_checkpoint = lambda *args, **kwargs: load(*args, **{**kwargs, "load_optimizer_states": False})
    loop = checkpoint.load_training_state(path, model, optimizer, scheduler, accelerator)
    losses = _steps(engine, model, optimizer, scheduler, accelerator, loop["step"], STEPS)
    return {"adapter": _adapter(model, accelerator), "losses": losses, "loop": loop}


def resume_worker(rank: int, world_size: int, port: int, engine: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), CUDA_VISIBLE_DEVICES="",
                      **ENGINE_ENV.get(engine, {}))
    if engine.startswith("zero"):
        os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        from rasa_lora.train import checkpoint

        if engine in ("ddp", "fsdp2"):
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=True)
        else:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
            accelerator = _DeepSpeedAccelerator(3 if engine == "zero3" else 2)
        results = {}
        model, optimizer, scheduler = _build(engine, accelerator)
        losses = _steps(engine, model, optimizer, scheduler, accelerator, 0, STEPS)
        results["straight"] = {"adapter": _adapter(model, accelerator), "losses": losses}

        model, optimizer, scheduler = _build(engine, accelerator)
        losses = _steps(engine, model, optimizer, scheduler, accelerator, 0, SPLIT)
        path = checkpoint.save_training_state(out / "run", SPLIT, model, optimizer, scheduler, {"step": SPLIT},
                                              keep=2, accelerator=accelerator)
        results["first"] = {"losses": losses, "files": sorted(str(p.relative_to(path)) for p in path.rglob("*")),
                            "layout": torch.load(path / checkpoint.STATE, weights_only=False)["layout"],
                            "found": [p.name for p in checkpoint.checkpoint_dirs(out / "run")]}
        results["resumed"] = _resumed(engine, accelerator, path, with_optimizer=True)
        results["no_optimizer"] = _resumed(engine, accelerator, path, with_optimizer=False)
        if rank == 0:
            torch.save(results, out / "results.pt")
        accelerator.wait_for_everyone()
    except BaseException:
        (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def run_resume_job(engine: str, out_dir: Path, world_size: int = 2) -> dict:
    """Run `resume_worker` in `world_size` fresh processes; return rank 0's results (`worker.run_job`)."""
    return run_job(engine, out_dir, world_size, target=resume_worker)
