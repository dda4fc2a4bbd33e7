"""DeepSpeed ZeRO-3 with RaSA's shared pools in 2 CPU processes (gloo), against one process; skipped without deepspeed.

accelerate runs DeepSpeed only on GPUs, so this drives `deepspeed.initialize` directly with DeepSpeed's CPU
accelerator: the same registration (`register_zero3_external_parameters`) and gathering (`_gather_zero3`) that
`prepare_training` and `save_adapter` use. Both halves of the batch run in fp32, so the pool gradients, reduced by
ZeRO-3 over the two processes, match one process's to reduction-order rounding (measured 3.4e-7). On 2 H200s the
same path ran through accelerate in bf16 (`benchmarks/multi_gpu.py`, `benchmarks/RESULTS.md`). Measured with
deepspeed 0.19.8: the results are the same without the registration (DeepSpeed also finds parameters a module
reads from elsewhere at run time), so these tests check RaSA under ZeRO-3, not that registration is needed.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch

from tests.distributed.common import LEARNING_RATE, build_model, global_batch, rel_err
from tests.distributed.worker import free_port

pytestmark = pytest.mark.distributed
pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it is not a dependency: GPU machines only)")
TOLERANCE = 1e-6


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu",
                      CUDA_VISIBLE_DEVICES="")  # CPU processes, also on a GPU machine (see worker.py)
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        from rasa_lora.train import distributed

        deepspeed.init_distributed(dist_backend="gloo")
        model = build_model(False)
        registered = distributed.register_zero3_external_parameters(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        ids = global_batch()[rank::2]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        trainable = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
        grads = {name: safe_get_full_grad(p) for name, p in trainable.items()}
        engine.step()
        params = distributed._gather_zero3(trainable)
        from rasa_lora.train.methods import count_parameters

        counts = count_parameters(engine.module)
        if rank == 0:
            torch.save({"grads": {k: None if v is None else v.detach().cpu().clone() for k, v in grads.items()},
                        "params": params, "registered": registered, "counts": counts,
                        "partitioned": sum(hasattr(p, "ds_id") for p in trainable.values())}, out / "zero3.pt")
    except BaseException:
        (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("zero3")
    try:
        mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    except Exception as error:
        logs = "\n".join(path.read_text() for path in sorted(out.glob("error-rank*.txt")))
        raise RuntimeError(f"ZeRO-3 job failed:\n{logs}") from error
    return torch.load(out / "zero3.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_process():
    from rasa_lora.train.methods import count_parameters

    model = build_model(False)
    counts = count_parameters(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    batch = global_batch()
    model(input_ids=batch, labels=batch).loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"grads": grads, "params": params, "counts": counts}


def test_every_trainable_tensor_is_partitioned_and_the_pools_registered(zero3, one_process):
    assert zero3["partitioned"] == len(one_process["params"])
    assert zero3["registered"] > 0


def test_pool_and_private_gradients_match_one_process(zero3, one_process):
    got, want = zero3["grads"], one_process["grads"]
    assert set(got) == set(want)
    assert sum("rasa_shared" in name for name in got) == 14
    missing = [name for name, grad in got.items() if grad is None]
    assert not missing
    errors = {name: rel_err(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: rel err {errors[worst]:.2e}"


def test_gathered_parameters_after_one_step_match_one_process(zero3, one_process):
    got, want = zero3["params"], one_process["params"]
    assert set(got) == set(want)
    errors = {name: rel_err(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: rel err {errors[worst]:.2e}"


def test_parameter_counts_of_the_partitioned_model_are_whole(zero3, one_process):
    assert zero3["counts"] == one_process["counts"]
