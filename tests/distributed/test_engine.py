"""In-process checks of `rasa_lora.train.distributed`: engine detection, checkpointing choice, preparation steps,
ZeRO-3 registration (with a stand-in for deepspeed, which needs GPUs), pool placement and data-parallel bookkeeping.
"""

from __future__ import annotations

import contextlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from peft import get_peft_model_state_dict

from rasa_lora.train import distributed
from rasa_lora.train.distributed import Engine
from tests.distributed.common import build_model, global_batch, rel_err


def fake_accelerator(kind: DistributedType, num_processes: int = 2, **state) -> SimpleNamespace:
    state = SimpleNamespace(distributed_type=kind, num_processes=num_processes, **state)
    return SimpleNamespace(state=state, ddp_handler=None, num_processes=num_processes, process_index=0,
                           unwrap_model=lambda model: model)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def model():
    return build_model(use_reentrant=False).eval()


@pytest.mark.parametrize(("kind", "extra", "expected"), [
    (DistributedType.NO, {}, Engine.SINGLE),
    (DistributedType.MULTI_GPU, {}, Engine.DDP),
    (DistributedType.MULTI_CPU, {}, Engine.DDP),
    (DistributedType.FSDP, {"fsdp_plugin": SimpleNamespace(fsdp_version=1)}, Engine.FSDP1),
    (DistributedType.FSDP, {"fsdp_plugin": SimpleNamespace(fsdp_version=2)}, Engine.FSDP2),
    (DistributedType.DEEPSPEED, {"deepspeed_plugin": SimpleNamespace(zero_stage=2)}, Engine.ZERO2),
    (DistributedType.DEEPSPEED, {"deepspeed_plugin": SimpleNamespace(zero_stage=3)}, Engine.ZERO3),
])
def test_detect_engine(clean_env, kind, extra, expected):
    assert distributed.detect_engine(fake_accelerator(kind, **extra)) is expected


def test_cpu_run_launched_with_fsdp2_is_fsdp2(clean_env):
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "2")
    assert distributed.detect_engine(fake_accelerator(DistributedType.MULTI_CPU)) is Engine.FSDP2


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("ACCELERATE_USE_FSDP", "true", "fsdp_version: 2"), ("ACCELERATE_USE_DEEPSPEED", "true", "only on GPUs")])
def test_cpu_run_refuses_engines_accelerate_cannot_run_there(clean_env, variable, value, words):
    clean_env.setenv(variable, value)
    with pytest.raises(ValueError, match=words):
        distributed.detect_engine(fake_accelerator(DistributedType.MULTI_CPU))


@pytest.mark.parametrize("engine", [Engine.SINGLE, Engine.DDP, Engine.FSDP2])
def test_checkpointing_honours_reentrant_where_it_works(engine):
    assert distributed.checkpointing_kwargs(engine, True) == {"use_reentrant": True}
    assert distributed.checkpointing_kwargs(engine, False) == {"use_reentrant": False}
    assert distributed.checkpointing_kwargs(engine) == {"use_reentrant": False}


@pytest.mark.parametrize("engine", [Engine.FSDP1, Engine.ZERO2, Engine.ZERO3])
def test_checkpointing_forces_non_reentrant_for_fsdp1_and_zero(engine):
    with pytest.warns(UserWarning, match="non-reentrant"):
        assert distributed.checkpointing_kwargs(engine, True) == {"use_reentrant": False}


def test_ddp_with_reentrant_checkpointing_gets_static_graph(clean_env, model):
    accelerator = fake_accelerator(DistributedType.MULTI_GPU)
    distributed.prepare_model_for_engine(model, accelerator, use_reentrant=False)
    assert accelerator.ddp_handler is None
    distributed.prepare_model_for_engine(model, accelerator, use_reentrant=True)
    assert accelerator.ddp_handler.to_kwargs() == {"static_graph": True}


def test_fsdp1_gets_use_orig_params_and_layer_wrapping(clean_env, model):
    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=False, auto_wrap_policy=None)
    with pytest.warns(UserWarning, match="use_orig_params"):
        distributed.prepare_model_for_engine(model, fake_accelerator(DistributedType.FSDP, fsdp_plugin=plugin))
    assert plugin.use_orig_params is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


# --- ZeRO-3 ---------------------------------------------------------------------------------------------------
def record_register(module, parameter):
    """What deepspeed.zero.register_external_parameter does: remember the parameter on the module, by id."""
    if not isinstance(parameter, torch.nn.Parameter):
        raise RuntimeError("Parameter is not a torch.nn.Parameter")
    module.__dict__.setdefault("_external_params", {})[id(parameter)] = parameter


def test_zero3_registers_each_groups_pool_on_every_layer_of_the_group():
    model = build_model(False)
    calls = []
    count = distributed.register_zero3_external_parameters(model, register=lambda m, p: calls.append((m, p)))
    layers = distributed.rasa_layers(model)
    assert count == len(calls) == 6 * len(layers)  # the base weight (no bias here), A~, B~, D, the group's A_S, B_S
    tuner = model.base_model
    for layer in layers.values():
        registered = [p for m, p in calls if m is layer]
        assert any(p is layer.get_base_layer().weight for p in registered)  # the fused path reads it directly
        key = layer.rasa_group["default"].replace(".", "-")
        for pool in (tuner.rasa_shared_A["default"][key], tuner.rasa_shared_B["default"][key]):
            assert sum(p is pool for p in registered) == 1  # the tuner's own parameter object, once
        assert any(p is layer.rasa_D["default"] for p in registered)


@contextlib.contextmanager
def simulated_zero3(model):
    """Partition every parameter (empty storage) and gather, at each module's forward, exactly what ZeRO-3 gathers:
    the module's own parameters (recurse=False) and its registered external parameters."""
    full = {id(p): p.data for p in model.parameters()}
    empty = {id(p): p.data.new_empty(0) for p in model.parameters()}

    def owned(module):
        return list(module.parameters(recurse=False)) + list(module.__dict__.get("_external_params", {}).values())

    def gather(module, args):
        for p in owned(module):
            p.data = full[id(p)]

    def release(module, args, output):
        for p in owned(module):
            p.data = empty[id(p)]

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(gather),
                                                    m.register_forward_hook(release))]
    for p in model.parameters():
        p.data = empty[id(p)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.data = full[id(p)]


@pytest.mark.parametrize("fused", [False, True])
def test_zero3_registration_lets_partitioned_layers_compute_the_same_logits(fused):
    """Both paths: the fused one (the default on GPUs) reads the base weight without the base layer's forward."""
    from rasa_lora.ops import set_fused_backend, set_kernel_backend

    set_fused_backend(fused)
    set_kernel_backend("torch" if fused else None)
    try:
        _zero3_same_logits()
    finally:
        set_fused_backend(None)
        set_kernel_backend(None)


def _zero3_same_logits():
    model = build_model(False).eval()
    batch = global_batch()
    with torch.no_grad():
        want = model(input_ids=batch).logits
        distributed.register_zero3_external_parameters(model, register=record_register)
        with simulated_zero3(model):
            got = model(input_ids=batch).logits
    assert rel_err(got, want) == 0.0


def test_zero3_without_the_pools_registered_fails():
    model = build_model(False).eval()
    pools = {id(p) for name, p in model.named_parameters() if "rasa_shared" in name}
    for layer, param in distributed.zero3_external_parameters(model):
        if id(param) not in pools:
            record_register(layer, param)
    with torch.no_grad(), simulated_zero3(model), pytest.raises(RuntimeError):
        model(input_ids=global_batch())


def test_zero3_registration_without_deepspeed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ModuleNotFoundError, match="pip install deepspeed"):
        distributed.register_zero3_external_parameters(build_model(False))


def test_zero3_registration_finds_deepspeeds_function_as_the_package_exposes_it(monkeypatch):
    """Real deepspeed has `deepspeed.zero` as an attribute only: `from deepspeed.zero import ...` raises
    ModuleNotFoundError (deepspeed 0.19.8). The stand-in is a package without a `deepspeed.zero` module."""
    calls = []
    fake = types.ModuleType("deepspeed")
    fake.__path__ = []  # a package, so that a `deepspeed.zero` submodule import is attempted, and fails
    fake.zero = SimpleNamespace(register_external_parameter=lambda module, param: calls.append((module, param)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.delitem(sys.modules, "deepspeed.zero", raising=False)
    model = build_model(False)
    count = distributed.register_zero3_external_parameters(model)
    assert count == len(calls) == len(distributed.zero3_external_parameters(model)) > 0


def test_zero3_adapter_is_gathered_into_the_one_process_state_dict(monkeypatch):
    model = build_model(False)
    want = {key: value.clone() for key, value in get_peft_model_state_dict(model).items()}
    adapter = [p for name, p in model.named_parameters() if p.requires_grad]
    full = {id(p): p.data for p in adapter}
    for index, p in enumerate(adapter):
        p.ds_id = index
        p.data = p.data.new_empty(0)

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        for p in params:
            p.data = full[id(p)]
        yield
        for p in params:
            p.data = p.data.new_empty(0)

    fake = types.ModuleType("deepspeed")
    fake.zero = SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    accelerator = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    got = distributed.gather_adapter_state(model, accelerator)
    assert set(got) == set(want)
    assert all(torch.equal(got[key], want[key]) for key in want)


def test_parameter_counts_see_through_zero3_partitioning():
    """The trainer's summary counts parameters after `prepare`: ZeRO-3 leaves each parameter's local data empty
    and its size in `ds_numel` (as DeepSpeed does), which a plain numel() would count as 0."""
    from rasa_lora.train.methods import count_parameters

    model = build_model(False)
    want = count_parameters(model)
    for index, param in enumerate(model.parameters()):
        param.ds_id, param.ds_numel = index, param.numel()
        param.data = param.data.new_empty(0)
    assert count_parameters(model) == want and want[0] > 0


# --- FSDP2 placement, data parallel bookkeeping ----------------------------------------------------------------
def test_pools_in_the_root_unit_are_well_placed(model):
    units = ["", *[f"base_model.model.model.layers.{i}" for i in range(4)]]
    assert distributed.misplaced_pools(model, units) == []


def test_pools_in_a_unit_that_misses_their_layers_are_reported(model):
    bad = distributed.misplaced_pools(model, ["", "base_model.rasa_shared_A"])
    assert len(bad) == 7 * 4 and all("base_model.rasa_shared_A" in line for line in bad)  # each A pool, 4 layers


def test_micro_batches_are_split_evenly_over_processes():
    accelerator = SimpleNamespace(num_processes=2, process_index=1)
    assert distributed.local_micro_batches(list("abcd"), accelerator) == ["b", "d"]
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        distributed.local_micro_batches(list("abc"), accelerator)
    assert distributed.loss_divisor(10, accelerator) == 5.0


def test_one_process_keeps_its_own_stop_signal():
    accelerator = SimpleNamespace(num_processes=1)
    assert distributed.agreed_signal(None, accelerator) is None
    assert distributed.agreed_signal(15, accelerator) == 15


def test_processes_stop_on_the_signal_any_of_them_received():
    """The all-reduce (max) is done by accelerate; here a stand-in combines this process's flag with another's."""
    def reduce_with(other):
        return lambda tensor, op: torch.maximum(tensor, torch.tensor([other]))

    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce_with(15))
    assert distributed.agreed_signal(None, accelerator) == 15
    accelerator.reduce = reduce_with(0)
    assert distributed.agreed_signal(None, accelerator) is None


@pytest.mark.parametrize(("engine", "keys", "fix"), [
    (Engine.FSDP1, {"save_steps": 5}, "fsdp2.yaml"), (Engine.FSDP2, {"resume": True, "method": "fft"}, "zero3.yaml"),
    (Engine.FSDP2, {"method": "pissa"}, "ddp.yaml"), (Engine.ZERO3, {"method": "prilora"}, "ddp.yaml")])
def test_what_sharded_engines_cannot_do_is_refused(engine, keys, fix):
    config = SimpleNamespace(**{"resume": False, "save_steps": 0, "method": "rasa", **keys})
    with pytest.raises(NotImplementedError, match=fix):
        distributed.check_supported(engine, config)


@pytest.mark.parametrize("engine", [Engine.FSDP2, Engine.ZERO2, Engine.ZERO3])
def test_fsdp2_and_deepspeed_may_checkpoint_and_resume(engine):
    distributed.check_supported(engine, SimpleNamespace(resume=True, save_steps=5, method="rasa"))


def test_ddp_may_checkpoint_and_resume():
    distributed.check_supported(Engine.DDP, SimpleNamespace(resume=True, save_steps=5, method="pissa"))
