"""PriLoRA under data parallelism: two processes that saw different inputs prune the same entries of A, those a
single process pruning on all the inputs would (gloo on the CPU; the statistics are summed before pruning)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _model():
    from peft import get_peft_model

    from rasa_lora import PriloraConfig
    from rasa_lora.models import tiny_llama

    torch.manual_seed(1)
    config = PriloraConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False, prune_interval=1)
    return get_peft_model(tiny_llama(seed=0), config).train()


def _inputs() -> torch.Tensor:
    return torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(5))


def _pruned_A(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "prilora_A" in name}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model()
    model(_inputs()[2 * rank: 2 * rank + 2])  # each process sees half of the batch
    model.base_model.update_and_prune(1)
    torch.save(_pruned_A(model), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_prune_like_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    model = _model()
    model(_inputs())
    model.base_model.update_and_prune(1)
    expected = _pruned_A(model)
    assert first.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(first[name] == 0, value == 0) and torch.equal(second[name] == 0, value == 0), name


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2", "zero2", "zero3"])
def test_sharded_engines_are_refused_before_anything_loads(engine):
    from rasa_lora.train.config import build_config
    from rasa_lora.train.distributed import Engine, check_supported

    with pytest.raises(NotImplementedError, match="method=prilora is not supported .* use configs/distributed/ddp"):
        check_supported(Engine(engine), build_config({"method": "prilora"}))
    check_supported(Engine.DDP, build_config({"method": "prilora"}))
