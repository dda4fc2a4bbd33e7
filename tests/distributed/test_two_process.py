"""2-process CPU (gloo) runs of DDP and FSDP2 against one process on the same global batch.

Each engine runs once per session (`run_job`: two spawned processes, ~20 s on 2 cores); the tests read its results.
Tolerance: relative error (Frobenius norm) <= 1e-6 in fp32. The two halves of the batch are reduced in another
order than one process sums them, which costs ~1e-7 (measured 1.7e-7 for gradients, 6e-8 for parameters); a
wrong scale (sum instead of mean), a missing pool gradient or a stale shard would be >= 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.common import LEARNING_RATE, build_model, global_batch, rel_err
from tests.distributed.worker import run_job

pytestmark = pytest.mark.distributed
ENGINES = ["ddp", "fsdp2"]
MODES = ["non_reentrant", "reentrant"]
TOLERANCE = 1e-6


_JOBS: dict[str, dict] = {}


def _results(engine: str, tmp_path_factory) -> dict:
    if engine not in _JOBS:
        _JOBS[engine] = run_job(engine, tmp_path_factory.mktemp(engine))
    return _JOBS[engine]


@pytest.fixture(scope="module", params=ENGINES)
def job(request, tmp_path_factory):
    return request.param, _results(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def reference():
    """One process, whole global batch, same model and SGD step: gradients, parameters after, saved adapter, logits."""
    out = {}
    for mode in MODES:
        model = build_model(mode == "reentrant")
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        batch = global_batch()
        model(input_ids=batch, labels=batch).loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9))
        optimizer.step()
        params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch).logits
        out[mode] = {"grads": grads, "grad_norm": norm, "params": params, "logits": logits, "model": model}
    return out


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_one_process(job, reference, mode):
    engine, results = job
    got, want = results[mode]["grads"], reference[mode]["grads"]
    assert set(got) == set(want)
    assert sum("rasa_shared" in name for name in got) == 14  # 7 groups x (A_S, B_S)
    errors = {name: rel_err(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{engine}/{mode}: {worst} rel err {errors[worst]:.2e}"


def test_gradient_norm_for_clipping_matches_one_process(job, reference):
    engine, results = job
    got, want = results["non_reentrant"]["grad_norm"], reference["non_reentrant"]["grad_norm"]
    assert abs(got - want) <= TOLERANCE * want


@pytest.mark.parametrize("mode", MODES)
def test_parameters_after_one_step_match_one_process(job, reference, mode):
    engine, results = job
    got, want = results[mode]["params"], reference[mode]["params"]
    errors = {name: rel_err(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{engine}/{mode}: {worst} rel err {errors[worst]:.2e}"


def test_engine_and_wrapper(job):
    engine, results = job
    assert results["non_reentrant"]["engine"] == engine
    expected = "DistributedDataParallel" if engine == "ddp" else "FSDPPeftModel"
    assert results["non_reentrant"]["wrapper"].startswith(expected)


def test_saved_adapter_has_the_one_process_tensors(job, reference, tmp_path):
    engine, results = job
    reference["non_reentrant"]["model"].save_pretrained(tmp_path)
    want = load_file(tmp_path / "adapter_model.safetensors")
    got = load_file(f"{results['non_reentrant']['adapter_dir']}/adapter_model.safetensors")
    assert set(got) == set(want)  # pools once, same PEFT key names
    assert max(rel_err(got[key], want[key]) for key in want) <= TOLERANCE


def test_saved_adapter_loads_in_one_process_with_same_logits(job, reference):
    from peft import PeftModel

    from rasa_lora.models import tiny_llama

    engine, results = job
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), results["non_reentrant"]["adapter_dir"]).eval()
    with torch.no_grad():
        logits = loaded(input_ids=global_batch()).logits
    assert rel_err(logits, reference["non_reentrant"]["logits"]) <= TOLERANCE


def test_plain_ddp_with_reentrant_checkpointing_fails_on_the_pool(tmp_path_factory):
    """Why prepare_training sets static_graph: without it DDP refuses the pool's repeated gradient."""
    message = _results("ddp", tmp_path_factory)["plain_ddp_reentrant_error"]
    assert "marked as ready twice" in message and "rasa_shared" in message


def test_a_signal_received_by_one_process_stops_all(tmp_path_factory):
    assert _results("ddp", tmp_path_factory)["agreed_signal"] == 15  # rank 0's view of rank 1's SIGTERM


def test_fsdp2_shards_each_decoder_layer_and_keeps_pools_in_root(tmp_path_factory):
    layout = _results("fsdp2", tmp_path_factory)["layout"]
    units, pools = layout["units"], layout["pools_sharded"]
    layers = [unit for unit in units if ".layers." in unit]
    assert "" in units and len(layers) == 4
    assert not any("rasa_shared" in unit for unit in units)
    assert len(pools) == 14 and all(pools.values())  # DTensors, i.e. sharded by the root unit
