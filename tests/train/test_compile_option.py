"""`compile: true` in the trainer (torch.compile of the model; RaSA through its registered operators, dropout seeded
on the device) on the tiny model, CPU, with the `aot_eager` backend (what inductor receives, run eagerly: inductor
would spend minutes compiling on the CPU; `tests/ops/test_compile.py` has an inductor case)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rasa_lora.errors import UserError
from rasa_lora.ops import set_fused_backend
from rasa_lora.train import checkpoint
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides

COMPILED = {"compile": True, "compile_backend": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    set_fused_backend(None)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_compiled_training_follows_eager_training(tiny_model_dir, tmp_path, fused):
    """Without dropout the compiled run's losses and adapter are eager's (to float32 rounding); with dropout (other
    masks: drawn from the device seed) it trains alike. `fused`: the fused path (forced on the CPU) or the reference
    path. Micro-batches padded to a multiple of 16. (Compiled and checkpointed: tests/ops/test_compile.py; a run here
    took minutes to trace.)"""
    set_fused_backend(fused)
    common = dict(max_steps=2, gradient_checkpointing=False, pad_to_multiple_of=16)
    runs = {}
    for name, extra in [("eager", {"dropout": 0.0}), ("compiled", {"dropout": 0.0, **COMPILED}),
                        ("compiled-dropout", {"dropout": 0.05, **COMPILED})]:
        out = tmp_path / name
        train(build_config(tiny_overrides(tiny_model_dir, out, **common, **extra)))
        runs[name] = (_losses(out), load_file(out / "adapter_model.safetensors"))
    (eager, eager_weights), (compiled, compiled_weights), (dropped, _) = runs.values()
    assert len(eager) == len(compiled) == len(dropped) == 2
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert compiled_weights.keys() == eager_weights.keys()
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-6)
    assert dropped != compiled and dropped == pytest.approx(compiled, rel=0.05)


@pytest.mark.slow
def test_compiled_run_resumes_exactly(tiny_model_dir, tmp_path):
    """A compiled run resumed from its step-1 checkpoint ends with the adapter and losses of the run that went
    straight on: the device dropout seed is saved with the RNG states and restored."""
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, max_steps=3, save_steps=1, save_total_limit=3, dropout=0.1,
                            pad_to_multiple_of=64, **COMPILED)
    train(build_config(values))
    straight_losses, straight = _losses(out), load_file(out / "adapter_model.safetensors")
    payload = torch.load(checkpoint.checkpoint_dirs(out)[0] / "state.pt", weights_only=False)
    assert payload["rng"]["rasa_dropout"]["cpu"][1] == 2  # one counter step a forward: 2 micro-batches in step 1
    for path in checkpoint.checkpoint_dirs(out)[1:]:
        shutil.rmtree(path)  # keep step 1 only
    (out / "adapter_model.safetensors").unlink()
    rows = (out / "metrics.jsonl").read_text().splitlines()[:1]
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    torch._dynamo.reset()
    train(build_config({**values, "resume": True}))
    resumed = load_file(out / "adapter_model.safetensors")
    assert _losses(out) == straight_losses
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_pad_to_multiple_of_rounds_the_micro_batch_length_up():
    from rasa_lora.train.data import IGNORE_INDEX, collate

    items = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4] * 17, "labels": [4] * 17}]
    assert collate(items, 0)["input_ids"].shape == (2, 17)
    batch = collate(items, 0, pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (2, 32)
    assert int(batch["attention_mask"].sum()) == 20 and (batch["labels"][:, 17:] == IGNORE_INDEX).all()
    assert collate(items, 0, pad_to_multiple_of=17)["input_ids"].shape == (2, 17)


def test_bad_compile_keys_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="compile_backend='eager' is unknown"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path, compile=True, compile_backend="eager"))
    with pytest.raises(ValueError, match="pad_to_multiple_of=-8 must be a whole number"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path, pad_to_multiple_of=-8))


def test_cuda_graph_keys_are_refused_where_they_cannot_work(tiny_model_dir, tmp_path):
    """compile_mode reduce-overhead (inductor's CUDA graphs): inductor only, shapes that repeat, a CUDA device."""
    graphs = dict(compile=True, compile_mode="reduce-overhead", pad_to_multiple_of=16)
    with pytest.raises(ValueError, match="not compile_backend='aot_eager': set compile_backend: inductor"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path, **{**graphs, "compile_backend": "aot_eager"}))
    with pytest.raises(ValueError, match="set pad_to_multiple_of"):
        build_config(tiny_overrides(tiny_model_dir, tmp_path, **{**graphs, "pad_to_multiple_of": 0}))
    build_config(tiny_overrides(tiny_model_dir, tmp_path, **{**graphs, "compile": False, "pad_to_multiple_of": 0}))
    if not torch.cuda.is_available():
        out = tmp_path / "run"
        with pytest.raises(UserError, match="needs a CUDA device, not cpu; use compile_mode: default"):
            train(build_config(tiny_overrides(tiny_model_dir, out, **graphs)))
        assert not out.exists()


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_graph_training_follows_eager_training(tiny_model_dir, tmp_path, checkpointing):
    """`compile_mode: reduce-overhead` on the GPU, two micro-batches a step (gradient accumulation into .grad buffers
    that stay put): without dropout the losses and adapter are eager's; with dropout it trains alike (float32)."""
    common = dict(max_steps=3, gradient_checkpointing=checkpointing, pad_to_multiple_of=32, model_dtype="float32",
                  bf16="false")
    graphs = dict(compile=True, compile_backend="inductor", compile_mode="reduce-overhead")
    runs = {}
    for name, extra in [("eager", {"dropout": 0.0}), ("graphs", {"dropout": 0.0, **graphs}),
                        ("graphs-dropout", {"dropout": 0.05, **graphs})]:
        torch._dynamo.reset()
        out = tmp_path / name
        try:
            train(build_config(tiny_overrides(tiny_model_dir, out, **common, **extra)))
        except UserError as error:  # the one known failure, named by the trainer: reported, not hidden
            if "pytorch/pytorch#154306" in str(error):
                pytest.xfail(f"torch {torch.__version__}: {error}")
            raise
        runs[name] = (_losses(out), load_file(out / "adapter_model.safetensors"))
    (eager, eager_weights), (graphed, graphed_weights), (dropped, _) = runs.values()
    assert len(eager) == len(graphed) == len(dropped) == 3
    assert graphed == pytest.approx(eager, rel=1e-4)
    for key, value in eager_weights.items():
        torch.testing.assert_close(graphed_weights[key], value, rtol=1e-3, atol=1e-5)
    assert dropped != graphed and dropped == pytest.approx(graphed, rel=0.05)


def test_the_known_cuda_graph_failure_becomes_a_one_line_error():
    """PyTorch's CUDA graph trees under non-reentrant checkpointing (pytorch/pytorch#154306) raise a RuntimeError
    asking to file an issue; the trainer names the fix instead. Any other error passes through unchanged."""
    from rasa_lora.train.trainer import cuda_graph_error

    error = cuda_graph_error(RuntimeError("TODO: graph recording observed an input tensor deallocate during graph "
                                          "recording that did not occur during replay. Please file an issue."))
    assert isinstance(error, UserError) and "\n" not in str(error)
    assert "set gradient_checkpointing: false, or compile_mode: default" in str(error)
    assert cuda_graph_error(RuntimeError("CUDA out of memory")) is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_checkpointed_cuda_graphs_warn_that_they_are_unverified(checkpointing, capsys):
    """compile_mode reduce-overhead with gradient checkpointing: one warning line (its GPU test failed, worked around,
    not yet re-run: docs/performance.md, "CPU buffer"); without checkpointing, none."""
    import contextlib
    from types import SimpleNamespace

    from rasa_lora.train.trainer import CHECKPOINTED_GRAPHS_WARNING, SKIP_SIDE_EFFECTS, compile_model

    dynamo = torch._dynamo.config  # compile_model sets the switch for the process: restored after this test
    restored = (dynamo.patch(**{SKIP_SIDE_EFFECTS: getattr(dynamo, SKIP_SIDE_EFFECTS)})
                if hasattr(dynamo, SKIP_SIDE_EFFECTS) else contextlib.nullcontext())

    config = build_config({"compile": True, "compile_mode": "reduce-overhead", "pad_to_multiple_of": 64,
                           "gradient_checkpointing": checkpointing})
    model = torch.nn.Linear(2, 2)
    run = SimpleNamespace(config=config, device=torch.device("cpu"), model=model,
                          accelerator=SimpleNamespace(is_main_process=True))
    try:
        with restored:
            compile_model(run)
    finally:
        torch._dynamo.reset()
    err = capsys.readouterr().err
    assert (CHECKPOINTED_GRAPHS_WARNING in err) == checkpointing and "\n" not in CHECKPOINTED_GRAPHS_WARNING
    assert "compiling the model (inductor, reduce-overhead)" in err
    assert model.weight.grad is not None  # the .grad buffers made before compiling, as under CUDA graphs
