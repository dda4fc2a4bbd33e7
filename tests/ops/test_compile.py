"""torch.compile through the registered operators (`rasa_lora.ops.registered`) and the dropout seed on the device.

- the operators pass `torch.library.opcheck` (schema, fake implementation, registered autograd);
- torch.compile traces a RaSA model with no graph break (before the operators, every RaSA layer was one);
- compiled outputs and every gradient equal eager's (CPU, fp32; dropout on and off), and eq. 5's (`reference`);
- the mask seed comes from a [seed, counter] state on the device: one compiled graph, called again after the
  counter advanced, draws a fresh mask, and the mask of a given seed and counter is the eager path's.

CPU, "torch" backend; `aot_eager` traces exactly what inductor receives (the fake implementations, the autograd
registration), one test compiles with inductor as well.
"""

import contextlib

import pytest
import torch

from rasa_lora import settings
from rasa_lora.ops import dropout, rasa_linear, registered, set_fused_backend, set_kernel_backend
from tests.adapter.helpers import rasa_model, rel_err, tokens


@pytest.fixture(autouse=True)
def fused_torch_backend():
    set_fused_backend(True)
    set_kernel_backend("torch")
    torch._dynamo.reset()
    yield
    set_fused_backend(None)
    set_kernel_backend(None)
    settings.DEVICE_SEED.force(None)
    torch._dynamo.reset()


@contextlib.contextmanager
def device_seed(on: bool = True):
    settings.DEVICE_SEED.force(on)
    try:
        yield
    finally:
        settings.DEVICE_SEED.force(None)


def factors(a=53, b=30, private=7, shared=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=g) * 0.2).requires_grad_(True)  # noqa: E731
    return [make(private, a), make(b, private), make(private + shared), make(shared, a), make(b, shared)]


def layer_inputs(M=37, a=53, b=30):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, a, generator=g, requires_grad=True)
    return x, torch.randn(b, a, generator=g), torch.randn(b, generator=g)


# --- the operators ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("private,shared", [(7, 3), (0, 4), (5, 0)])
def test_opcheck(p, private, shared):
    x, weight, bias = layer_inputs()
    fs = factors(private=private, shared=shared)
    seed = torch.tensor([1234])
    torch.library.opcheck(registered.linear, (x, weight, bias, *fs, seed, p))
    torch.library.opcheck(registered.linear, (x, weight, None, *fs, seed, p))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_registered_operator_equals_the_eager_functions(p):
    """A tensor seed takes the registered operators eagerly: the same numbers as the autograd Functions."""
    x, weight, bias = layer_inputs()
    fs = factors()
    y = rasa_linear(x, weight, bias, *fs, dropout_p=p, seed=99)
    grads = torch.autograd.grad(y.square().sum(), [x, *fs])
    y2 = rasa_linear(x, weight, bias, *fs, dropout_p=p, seed=torch.tensor([99]))
    grads2 = torch.autograd.grad(y2.square().sum(), [x, *fs])
    assert torch.equal(y, y2)
    for g1, g2 in zip(grads, grads2):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_layer_function_equals_eager_with_fullgraph(p):
    x, weight, bias = layer_inputs()
    fs = factors()

    def f(x, *fs):
        return rasa_linear(x.view(1, *x.shape), weight, bias, *fs, dropout_p=p, seed=7)

    y = f(x, *fs)
    grads = torch.autograd.grad(y.square().sum(), [x, *fs])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    yc = compiled(x, *fs)
    grads_c = torch.autograd.grad(yc.square().sum(), [x, *fs])
    assert rel_err(yc, y) < 1e-6
    for gc, g in zip(grads_c, grads):
        assert rel_err(gc, g) < 1e-6


# --- a RaSA model under torch.compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_no_graph_break_in_a_rasa_model(fused):
    """Fails on 86ba3c9, where `rasa_linear` under torch.compile was `torch.compiler.disable`d (17 breaks here),
    and the reference path drew its host seed with `int(...)` (a break a layer)."""
    set_fused_backend(fused)
    model = rasa_model(dropout=0.1).train()
    ids = tokens()
    dropout.device_state("cpu")
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("p,fused,checkpointing", [(0.0, True, False), (0.1, True, False), (0.1, False, False),
                                                   (0.1, True, True)])
def test_compiled_model_outputs_and_gradients_equal_eager(p, fused, checkpointing, monkeypatch):
    with contextlib.ExitStack() as stack:
        _compiled_equals_eager(p, fused, checkpointing, monkeypatch, stack)


def _compiled_equals_eager(p, fused, checkpointing, monkeypatch, stack):
    """Loss and the gradient of every adapter parameter (pools included): compiled = eager with the device seed
    (the same state, so the same masks) = the layer's reference path, eq. 5 in plain PyTorch, with the same masks.
    `fused`: the fused path (registered operators) or the reference path, compiled. With gradient checkpointing the
    recomputation must draw the forward's masks (the counter does not move within a forward and its backward)."""
    set_fused_backend(fused)
    model = rasa_model(dropout=p).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        # the hub-kernels layer transformers wraps modules in mutates a context variable in the checkpointed forward:
        # without this dynamo runs the whole checkpointed layer eagerly (host seeds, not what is tested here)
        # (config.patch, not monkeypatch: monkeypatch's undo deletes the key, which hides it for the whole process)
        stack.enter_context(torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True))
        calls = []
        original = registered._mask
        monkeypatch.setattr(registered, "_mask", lambda *args: calls.append(1) or original(*args))
    ids = tokens()
    state = dropout.device_state("cpu")
    start = dropout.get_states()
    with device_seed():
        loss, grads = _loss_and_grads(model, ids)
    after_eager = state.clone()
    dropout.set_states(start)
    if checkpointing:
        calls.clear()
    loss_c, grads_c = _loss_and_grads(torch.compile(model, backend="aot_eager"), ids)
    if checkpointing:  # the compiled graph ran the operators: forward, recomputation and backward of 28 projections
        assert len(calls) == 3 * 28
    assert torch.equal(state, after_eager)  # the compiled forward advanced the counter as the eager one did
    assert rel_err(loss_c, loss) < 1e-6
    assert len(grads_c) == len(grads) > 0
    for gc, g in zip(grads_c, grads):
        assert rel_err(gc, g) < 1e-5
    # the reference path draws the seed on the host: give it the device seed's masks through `call_seed`
    dropout.set_states(start)
    set_fused_backend(False)
    seed, counter = start["cpu"]
    with _reference_seeds(model, seed, counter + 1):
        loss_r, grads_r = _loss_and_grads(model, ids)
    assert rel_err(loss_c, loss_r) < 1e-5
    for gc, g in zip(grads_c, grads_r):
        assert rel_err(gc, g) < 1e-4


@contextlib.contextmanager
def _reference_seeds(model, seed, counter):
    """Make each layer's reference path draw the mask of its stream at this seed and counter."""
    from rasa_lora.adapter import layer as layer_module

    original = layer_module.mask_seed
    current = {}

    def hook(module, args):
        current["stream"] = module.rasa_stream

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if hasattr(m, "rasa_stream")]
    layer_module.mask_seed = lambda p: dropout.call_seed(seed, counter, current["stream"])
    try:
        yield
    finally:
        layer_module.mask_seed = original
        for handle in handles:
            handle.remove()


def _assert_inductor_equals_eager(model, ids, device: str, loss_tol: float, grad_tol: float) -> None:
    """Loss and gradients of the inductor-compiled model = eager's with the device seed, from the same seed state."""
    dropout.device_state(device)
    start = dropout.get_states()
    with device_seed():
        loss, grads = _loss_and_grads(model, ids)
    dropout.set_states(start)
    loss_c, grads_c = _loss_and_grads(torch.compile(model), ids)
    assert rel_err(loss_c, loss) < loss_tol
    for gc, g in zip(grads_c, grads):
        assert rel_err(gc, g) < grad_tol


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_inductor_compiled_model_equals_eager(checkpointing):
    """Inductor on the CPU; with checkpointing, the CPU twin of the GPU's CUDA-graph test (the recomputation inside
    the compiled backward draws the forward's mask from the device seed)."""
    model = rasa_model(dropout=0.1, num_layers=1).train()
    with contextlib.ExitStack() as stack:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            stack.enter_context(torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True))
        _assert_inductor_equals_eager(model, tokens(), "cpu", 1e-5, 1e-4)


# --- the seed on the device --------------------------------------------------------------------------------------
def test_device_call_seed_equals_the_host_twin():
    for seed, counter, stream in [(0, 0, 0), (42, 1, 3), (2**31 - 2, 10**6, 209), (123, 2**33 + 5, 7)]:
        state = dropout.state_tensor(seed, counter)
        assert int(dropout.call_seed_tensor(state, stream)) == dropout.call_seed(seed, counter, stream)
    seeds = {dropout.call_seed(42, c, s) for c in range(20) for s in range(20)}
    assert len(seeds) == 400  # every (counter, stream) its own seed here


def test_a_seed_on_the_device_is_int32_with_the_host_seeds_low_bits():
    """The layers' seed tensors are int32 (an int64 one shared inductor's buffer of SDPA's philox offset, a CPU
    tensor in the CUDA-graph warm-up: docs/performance.md, "CPU buffer"); any int or int64 seed keeps its mask."""
    from rasa_lora.ops.rasa_linear import _seed_tensor

    assert dropout.call_seed_tensor(dropout.state_tensor(7, 3), 2).dtype == torch.int32
    for seed in (0, 5, 2**31 - 1, 2**31, 2**32 - 1, 2**40 + 7):
        from_int = _seed_tensor(seed, 0.1, "cpu")
        from_int64 = _seed_tensor(torch.tensor([seed]), 0.1, "cpu")
        assert from_int.dtype == from_int64.dtype == torch.int32 and torch.equal(from_int, from_int64)
        assert torch.equal(dropout.keep_mask(6, 10, from_int, 0.3), dropout.keep_mask(6, 10, seed & 0xFFFFFFFF, 0.3))
    for p in (0.0, 0.1):
        assert _seed_tensor(None, p, "cpu").dtype == torch.int32


def test_mask_from_a_seed_tensor_is_the_host_mask():
    x = torch.randn(50, 33)
    for seed in (0, 5, 2**31 - 2):
        assert torch.equal(dropout.dropout_mask(x, 0.3, torch.tensor([seed])), dropout.dropout_mask(x, 0.3, seed))


def test_replayed_graph_draws_a_fresh_mask_and_the_eager_mask_of_its_seed_and_counter():
    """One compiled graph (compiled once, called again): the counter advances in the graph, each call draws a new
    mask, and the mask of each call is the eager path's for the same seed and counter."""
    M, a, b, p, stream = 64, 40, 24, 0.25, 5
    x = torch.ones(M, a)  # y - x W^T is then the masked input through the adapter: the mask shows in y
    weight = torch.zeros(b, a)
    A_p, B_p, D = torch.eye(16, a), torch.eye(b, 16), torch.ones(16)
    A_s, B_s = torch.zeros(0, a), torch.zeros(b, 0)
    state = dropout.state_tensor(1234, 0)
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def step(x, state):
        dropout.advance(state)
        seed = dropout.call_seed_tensor(state, stream)
        return rasa_linear(x, weight, None, A_p, B_p, D, A_s, B_s, dropout_p=p, seed=seed)

    outputs = [step(x, state) for _ in range(3)]
    assert len(compiles) == 1 and int(state[1]) == 3
    masks = [(y[:, :16] != 0) for y in outputs]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    for counter, mask in enumerate(masks, start=1):
        eager = dropout.dropout_mask(x, p, dropout.call_seed(1234, counter, stream))[:, :16]
        assert torch.equal(mask, eager)
        y = rasa_linear(x, weight, None, A_p, B_p, D, A_s, B_s, dropout_p=p,
                        seed=dropout.call_seed(1234, counter, stream))
        assert torch.equal(outputs[counter - 1], y)


def test_model_forward_advances_the_counter_only_with_the_device_seed():
    model = rasa_model(dropout=0.1).train()
    ids = tokens()
    state = dropout.device_state("cpu")
    before = int(state[1])
    model(input_ids=ids)
    assert int(state[1]) == before  # default: host seeds, the counter untouched
    with device_seed():
        model(input_ids=ids)
        model(input_ids=ids)
        assert int(state[1]) == before + 2
        model.eval()
        model(input_ids=ids)
        assert int(state[1]) == before + 2  # no dropout in eval: no step


def test_device_seed_training_steps_draw_different_masks_and_checkpointing_recomputes_the_same():
    """Eager with the device seed and gradient checkpointing: the recomputation reads the same counter (same mask,
    so the gradients equal those without checkpointing), and two forwards differ."""
    ids = tokens()
    results = []
    for checkpointing in (False, True):
        model = rasa_model(dropout=0.3).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        dropout.set_states({"cpu": [77, 0]})
        with device_seed():
            results.append(_loss_and_grads(model, ids))
            second = _loss_and_grads(model, ids)
        assert not torch.equal(second[0], results[-1][0])
    (loss, grads), (loss_ck, grads_ck) = results
    assert rel_err(loss_ck, loss) < 1e-6
    for g1, g2 in zip(grads_ck, grads):
        assert rel_err(g1, g2) < 1e-5



@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_inductor_on_cuda_equals_eager(p):
    """On the GPU, the default backend (Triton for r=8): inductor-compiled loss and gradients = eager's with the
    device seed (fp32)."""
    set_kernel_backend(None)
    _assert_inductor_equals_eager(rasa_model(dropout=p).cuda().train(), tokens().cuda(), "cuda", 1e-4, 1e-3)
