"""Gradient checkpointing recomputes no more of the base model with RaSA than without it.

PyTorch's non-reentrant checkpoint stops recomputing a block once every tensor saved in it exists again. A frozen
linear layer saves nothing token-sized, so a frozen Llama block's last projection (down_proj) is never
recomputed. The fused layer saves x and u in its first node (`rasa_linear._Down`) and runs the base GEMM in the
second (`_Up`), so its recomputation stops before down_proj's base GEMM as well.
"""

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rasa_lora.ops import recompute, set_fused_backend, set_keep_u, set_kernel_backend
from rasa_lora.ops.torch_backend import TorchBackend
from tests.adapter.helpers import rasa_model


class WeightUses(TorchDispatchMode):
    """Counts matrix products that read any of the given weights (or a view of them)."""

    def __init__(self, weights):
        super().__init__()
        self.pointers = {w.data_ptr(): name for name, w in weights.items()}
        self.uses = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.data_ptr() in self.pointers:
                    self.uses[self.pointers[arg.data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def training_model(checkpointing: bool, reentrant: bool = False, device: str = "cpu", dtype=torch.float32,
                   dropout: float = 0.1):
    """The tiny RaSA Llama in training mode, with gradient checkpointing or not; (model, base)."""
    model = rasa_model(dropout=dropout).to(device, dtype)
    model.train()
    base = model.get_base_model()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.config.use_cache = False
    return model, base


@contextlib.contextmanager
def fused(backend: str):
    """The fused path with `backend`, restored to the defaults afterwards."""
    set_fused_backend(True)
    set_kernel_backend(backend)
    try:
        yield
    finally:
        set_fused_backend(None)
        set_kernel_backend(None)


def backward_weight_uses(model, module_names):
    weights = {name: model.get_submodule(name).weight for name in module_names}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(model.device)
    logits = model(input_ids=ids).logits
    with WeightUses(weights) as counter:
        logits.float().square().mean().backward()
    return counter.uses


@pytest.mark.parametrize(("backend", "device"), [
    ("torch", "cpu"), ("cublas", "cpu"),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu), pytest.param("cublas", "cuda", marks=pytest.mark.gpu)])
def test_checkpointed_backward_does_not_recompute_the_last_projection(backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, base = training_model(True, device=device)
    names = [n for n, m in base.named_modules() if n.endswith("mlp.down_proj.base_layer")]
    up_names = [n for n, m in base.named_modules() if n.endswith("mlp.up_proj.base_layer")]
    assert names
    with fused(backend):
        with_adapter = backward_weight_uses(base, names + up_names)
        with model.disable_adapter():  # the frozen base alone, through the same checkpointing
            frozen = backward_weight_uses(base, names + up_names)
    for name in names:  # down_proj: the backward's g W only, as in the frozen model (the recomputation stops)
        assert frozen[name] == 1, frozen
        assert with_adapter[name] == 1, with_adapter
    for name in up_names:  # up_proj: recomputed forward and backward, with and without the adapter
        assert frozen[name] == 2 and with_adapter[name] == 2, (frozen, with_adapter)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("frozen_factors", [False, True])
def test_checkpointed_gradients_equal_the_plain_ones(reentrant, frozen_factors):
    """Both checkpoint flavours give the gradients of an unchecked run (same dropout masks: the seeds come from
    torch's CPU generator, which checkpointing restores); with frozen factors only dL/dx flows, through `_Up`."""
    def grads(checkpointing):
        model, base = training_model(checkpointing, reentrant)
        params = [p for n, p in model.named_parameters() if ".rasa_" in n]
        for p in params:
            p.requires_grad_(not frozen_factors)
        embeddings = base.get_input_embeddings()(torch.arange(24).view(2, 12)).detach().requires_grad_(True)
        with fused("torch"):
            torch.manual_seed(3)
            base(inputs_embeds=embeddings).logits.float().square().mean().backward()  # reentrant: no .grad()
        return [t.grad for t in [embeddings] + ([] if frozen_factors else params)]

    for got, expected in zip(grads(True), grads(False), strict=True):
        assert expected is not None and expected.abs().sum() > 0
        assert got is not None and torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_backward_reuses_the_recomputations_pack(reentrant, monkeypatch):
    """Under checkpointing each layer packs its factors twice a step (forward, recomputation), not three times:
    the backward takes the recomputation's pack. Without checkpointing: forward and backward, twice. A factor
    changed in place between them makes the backward pack afresh."""
    calls = collections.Counter()
    original = TorchBackend.pack

    def counting(*args):
        calls["pack"] += 1
        return original(*args)

    monkeypatch.setattr(TorchBackend, "pack", counting)
    for checkpointing, expected in ((True, 2), (False, 2)):
        model, base = training_model(checkpointing, reentrant)
        layers = sum(1 for name, _ in base.named_modules() if name.endswith("_proj.base_layer"))
        with fused("torch"):
            calls.clear()
            embeddings = base.get_input_embeddings()(torch.arange(24).view(2, 12)).detach().requires_grad_(True)
            base(inputs_embeds=embeddings).logits.float().square().mean().backward()
        assert calls["pack"] == expected * layers, (checkpointing, calls, layers)
    assert not recompute.RECOMPUTED_PACKS  # every stash was taken


def test_a_stashed_pack_is_not_used_for_changed_factors():
    factors = tuple(torch.randn(4, 4) for _ in range(5))
    A, C = torch.zeros(2), torch.zeros(2)
    recompute.stash_pack(factors, 1.0, torch.float32, "torch", A, C)
    assert recompute.take_pack(factors, 1.0, torch.float32, "torch") == (A, C)
    assert recompute.take_pack(factors, 1.0, torch.float32, "torch") is None  # taken once
    for change in ("in place", "scale", "dtype", "backend", "other tensor"):
        recompute.stash_pack(factors, 1.0, torch.float32, "torch", A, C)
        scale, dtype, backend, current = 1.0, torch.float32, "torch", factors
        if change == "in place":
            factors[2].add_(1.0)
        elif change == "scale":
            scale = 2.0
        elif change == "dtype":
            dtype = torch.bfloat16
        elif change == "backend":
            backend = "cublas"
        else:
            current = (factors[0], torch.randn(4, 4), *factors[2:])
        assert recompute.take_pack(current, scale, dtype, backend) is None, change
    assert not recompute.RECOMPUTED_PACKS


@contextlib.contextmanager
def keeping_u(enabled: bool):
    set_keep_u(enabled)
    try:
        yield
    finally:
        set_keep_u(None)


def _checkpointed_step(dropout, dtype, keep, monkeypatch, backend="torch", device="cpu"):
    """One checkpointed step of the tiny model: (the gradients of the inputs and factors, how many calls took a
    kept u, how many layers)."""
    taken = collections.Counter()
    original = recompute.take_u

    def counting(*args):
        u = original(*args)
        taken["u"] += u is not None
        return u

    monkeypatch.setattr(recompute, "take_u", counting)
    model, base = training_model(True, device=device, dtype=dtype, dropout=dropout)
    layers = sum(1 for name, _ in base.named_modules() if name.endswith("_proj.base_layer"))
    params = [p for n, p in model.named_parameters() if ".rasa_" in n]
    embeddings = base.get_input_embeddings()(torch.arange(24, device=device).view(2, 12)).detach()
    embeddings.requires_grad_(True)
    with fused(backend), keeping_u(keep):
        torch.manual_seed(3)
        base(inputs_embeds=embeddings).logits.float().square().mean().backward()
    assert not recompute.KEPT_U  # every kept u was taken (or went with its graph)
    return [t.grad for t in [embeddings, *params]], taken["u"], layers


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_recomputation_takes_the_forwards_u_and_gets_the_same_gradients(dropout, dtype, monkeypatch):
    """Under non-reentrant checkpointing every layer's recomputation takes the u its forward kept (dropout or
    not: the key's seed is drawn either way), and the step's gradients are the same bits as with u computed
    again (u kept in x's dtype is what every consumer rounds u to)."""
    kept, taken, layers = _checkpointed_step(dropout, dtype, True, monkeypatch)
    again, not_taken, _ = _checkpointed_step(dropout, dtype, False, monkeypatch)
    assert taken == layers and not_taken == 0
    for got, expected in zip(kept, again, strict=True):
        assert expected is not None and expected.abs().sum() > 0
        assert torch.equal(got, expected)


@pytest.mark.gpu
def test_the_recomputation_takes_the_forwards_u_with_the_triton_kernels(monkeypatch):
    """The same on the GPU in bf16 (Triton): every layer takes its u; the gradients agree to bf16 precision (the
    kernels' split reductions add atomically, so two runs differ in their last bits whatever is kept)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kept, taken, layers = _checkpointed_step(0.1, torch.bfloat16, True, monkeypatch, "triton", "cuda")
    again, not_taken, _ = _checkpointed_step(0.1, torch.bfloat16, False, monkeypatch, "triton", "cuda")
    assert taken == layers and not_taken == 0
    for got, expected in zip(kept, again, strict=True):
        got, expected = got.double(), expected.double()
        assert expected.abs().sum() > 0 and float((got - expected).norm() / expected.norm()) <= 1e-2


def test_a_kept_u_goes_with_its_graph_and_is_not_taken_for_changed_factors():
    model, base = training_model(True)
    ids = torch.arange(24).view(2, 12)
    with fused("torch"):
        logits = base(input_ids=ids).logits  # a checkpointed forward, no backward
        assert len(recompute.KEPT_U) == sum(1 for n, _ in base.named_modules() if n.endswith("_proj.base_layer"))
        del logits
        assert not recompute.KEPT_U
    factors = tuple(torch.randn(4, 4) for _ in range(5))
    rows = torch.randn(6, 4)
    for change in ("none", "in place", "rows", "scale", "backend", "other tensor"):
        ctx = type("Ctx", (), {})()
        recompute.keep_u(ctx, factors, 7, 1.0, "torch", rows, torch.randn(6, 4))
        scale, backend, current, current_rows = 1.0, "torch", factors, rows
        if change == "in place":
            factors[2].add_(1.0)
        elif change == "rows":
            current_rows = torch.randn(5, 4)
        elif change == "scale":
            scale = 2.0
        elif change == "backend":
            backend = "cublas"
        elif change == "other tensor":
            current = (factors[0], torch.randn(4, 4), *factors[2:])
        u = recompute.take_u(current, 7, scale, backend, current_rows)
        assert (u is not None) == (change == "none"), change
        if change == "none":
            assert ctx.kept.u is None  # released by the node: the recomputation's saved tensors hold it now
    assert not recompute.KEPT_U


@pytest.mark.gpu
def test_a_steady_training_step_launches_every_kernel_from_the_cache(monkeypatch):
    """After a first step, a checkpointed bf16 training step of the model takes `launch.Launcher`'s cached path
    for every Triton launch: a tensor that is not 16-byte aligned (say, a part of a workspace at an odd offset)
    would send its kernel through Triton's own launch path on every call, ~100 us of host time each."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from rasa_lora import settings
    from rasa_lora.ops import kernels

    if not kernels.available() or not settings.FAST_LAUNCH():
        pytest.skip("needs triton and the launch cache")
    _, base = training_model(True, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()

    def step():
        base(input_ids=ids).logits.float().square().mean().backward()

    with fused("triton"):
        step()

        class Uncached:
            def __init__(self, name):
                self.name = name

            def __getitem__(self, grid):
                raise AssertionError(f"{self.name} took Triton's own launch path")

        from rasa_lora.ops import launch

        for name, launcher in vars(launch).items():
            if isinstance(launcher, launch.Launcher):
                monkeypatch.setattr(launcher, "fn", Uncached(name))
        step()
