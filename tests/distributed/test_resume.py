"""Resume under DDP, FSDP2 and DeepSpeed ZeRO-2/3: 2 CPU processes (gloo), checkpoint after step 2 of 4, resume in fresh
model and optimizer, compare with 4 straight steps (`resume_worker.py`).

fp32 on the CPU is deterministic, so the resumed adapter (every tensor, the 14 shared pools included) must be
bitwise the straight run's (measured: equal, all four engines). The negative control resumes without the
optimizer state (LionW's momentum): its adapter differs (measured max |diff| 1.2e-3 FSDP2, 7.5e-2 ZeRO-2/3), which
shows the comparison can fail. Each engine's job takes ~30-40 s on 2 cores; DeepSpeed's are skipped without it.
"""

from __future__ import annotations

import pytest
import torch

from rasa_lora.train import checkpoint
from tests.distributed.resume_worker import SPLIT, STEPS, run_resume_job

ENGINES = ["ddp", "fsdp2", "zero2", "zero3"]
_JOBS: dict[str, dict] = {}


@pytest.fixture(scope="module", params=ENGINES)
def job(request, tmp_path_factory):
    engine = request.param
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install rasa-lora[deepspeed])")
    if engine not in _JOBS:
        _JOBS[engine] = run_resume_job(engine, tmp_path_factory.mktemp(f"resume-{engine}"))
    return engine, _JOBS[engine]


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [key for key in a if not torch.equal(a[key], b[key])]


@pytest.mark.distributed
@pytest.mark.slow
def test_resumed_adapter_is_bitwise_the_uninterrupted_one(job):
    engine, results = job
    straight, resumed = results["straight"], results["resumed"]
    assert results["resumed"]["loop"]["step"] == SPLIT
    assert sum("rasa_shared" in key for key in straight["adapter"]) == 14
    assert _differing(resumed["adapter"], straight["adapter"]) == []
    assert results["first"]["losses"] + resumed["losses"] == straight["losses"] and len(straight["losses"]) == STEPS


@pytest.mark.distributed
@pytest.mark.slow
def test_resuming_without_the_optimizer_state_is_seen(job):
    engine, results = job
    assert _differing(results["no_optimizer"]["adapter"], results["straight"]["adapter"])


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_layout(job):
    engine, results = job
    first = results["first"]
    assert first["found"] == [f"step-{SPLIT:06d}"]
    assert first["layout"] == {"format": "deepspeed" if engine.startswith("zero") else "full", "engine": engine,
                               "world_size": 2}
    assert "state.pt" in first["files"] and "rng-rank1.pt" in first["files"]
    if engine.startswith("zero"):
        partitions = [name for name in first["files"] if name.endswith("optim_states.pt")]
        assert len(partitions) == 2  # one per process: the optimizer state stays partitioned


# --- refusals, atomicity (no processes) ---------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "engine", "world", "message"), [
    ({"format": "deepspeed", "engine": "zero2", "world_size": 8}, "fsdp2", 8,
     "resume it with accelerate launch --config_file configs/distributed/zero2.yaml --num_processes 8"),
    ({"format": "deepspeed", "engine": "zero3", "world_size": 8}, "zero3", 4, "zero3.yaml --num_processes 8"),
    ({"format": "deepspeed", "engine": "zero3", "world_size": 2}, "zero2", 2, "zero3.yaml --num_processes 2"),
    ({"format": "full", "engine": "fsdp2", "world_size": 2}, "zero3", 2, "DeepSpeed resumes only its own"),
    (None, "zero2", 2, "written by single with 1 process"),
])
def test_a_checkpoint_the_engine_cannot_resume_is_refused_with_the_fix(tmp_path, layout, engine, world, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        checkpoint.check_layout(tmp_path, layout, engine, world)


@pytest.mark.parametrize(("engine", "world"), [("fsdp2", 2), ("ddp", 2), ("single", 1), ("fsdp2", 4)])
def test_whole_tensor_checkpoints_resume_under_one_process_ddp_and_fsdp2(tmp_path, engine, world, recwarn):
    checkpoint.check_layout(tmp_path, {"format": "full", "engine": "fsdp2", "world_size": 2}, engine, world)
    warned = [str(w.message) for w in recwarn if "dropout masks" in str(w.message)]
    assert bool(warned) == (world != 2)


def test_one_process_refuses_a_deepspeed_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "step-000002"
    path.mkdir(parents=True)
    torch.save({"layout": {"format": "deepspeed", "engine": "zero2", "world_size": 8}}, path / checkpoint.STATE)
    with pytest.raises(ValueError, match="zero2.yaml --num_processes 8"):
        checkpoint.load_checkpoint(path, torch.nn.Linear(1, 1), None, None)


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    root = tmp_path / checkpoint.CHECKPOINTS
    (root / ".tmp-step-000009").mkdir(parents=True)  # a save killed before its rename
    (root / ".tmp-step-000009" / checkpoint.STATE).write_bytes(b"")
    (root / "step-000008" / "deepspeed").mkdir(parents=True)  # DeepSpeed's files without the main state
    (root / "step-000004").mkdir()
    (root / "step-000004" / checkpoint.STATE).write_bytes(b"x")
    assert [path.name for path in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000004"]


def test_the_trainer_refuses_another_engines_checkpoint_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """`rasa-lora train --resume` in one process on a run whose checkpoint DeepSpeed wrote (ZeRO-2, 8 processes):
    one line naming the command that resumes it, exit 2, and the model is never built."""
    from rasa_lora.models import tiny_llama
    from rasa_lora.train import trainer
    from rasa_lora.train.cli import main as train_main
    from tests.train.conftest import build_tiny_tokenizer

    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    tokenizer = build_tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    keys = ["--base-model", str(model_dir), "--output-dir", str(out), "--save-steps", "1",
            "--global-batch-size", "2", "--micro-batch-size", "2", "--num-examples", "4", "--progress-bar", "false",
            "--gradient-checkpointing", "false", "--max-steps", "2"]
    torch.set_num_threads(1)
    assert train_main(keys) == 0
    newest = checkpoint.checkpoint_dirs(out)[-1]
    payload = torch.load(newest / checkpoint.STATE, weights_only=False)
    payload["layout"] = {"format": "deepspeed", "engine": "zero2", "world_size": 8}
    torch.save(payload, newest / checkpoint.STATE)
    capsys.readouterr()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "build_model", no_model)
    assert train_main([*keys, "--resume", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/distributed/zero2.yaml --num_processes 8" in err[0], err
