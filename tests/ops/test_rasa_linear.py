"""The fused autograd path (both backends) against the literal eq. 5, on odd shapes.

The "torch" backend runs everywhere; the "triton" backend runs on CUDA (`-m gpu` on the GPU machine) and on
the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, float32 only).
"""

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

from rasa_lora import settings
from rasa_lora.ops import dropout_mask, dropout_scale, rasa_linear, set_base_gemm_adds, set_kernel_backend
from rasa_lora.ops.dropout import effective_p
from rasa_lora.reference import dense_delta

# fp32: 1e-5 relative (issue 6). bf16: 1e-2 — bf16 keeps 8 mantissa bits (~4e-3 per rounding), and the
# fused path rounds each thin product once more than the dense reference.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(37, 53, 7, 30, 0.0), (64, 16, 3, 8, 0.1), (17, 91, 1, 5, 0.3), (48, 48, 0, 4, 0.0),
          (130, 200, 3, 160, 0.4), (300, 70, 5, 9, 0.05)]


def _triton_ok() -> bool:
    from rasa_lora.ops import kernels

    return kernels.available()


def _cases():
    cases = [pytest.param("torch", "cpu", id="torch-cpu"),
             pytest.param("torch", "cuda", marks=pytest.mark.gpu, id="torch-cuda"),
             pytest.param("cublas", "cpu", id="cublas-cpu"),
             pytest.param("cublas", "cuda", marks=pytest.mark.gpu, id="cublas-cuda")]
    if _triton_ok():
        # "triton": the base GEMMs add into the adapter's term (beta = 1); "triton-accumulate": the adapter's
        # kernels add into the base GEMMs' outputs (`set_base_gemm_adds(False)`)
        for name in ("triton", "triton-accumulate"):
            cases.append(pytest.param(name, "cuda", marks=pytest.mark.gpu, id=f"{name}-cuda"))
            if os.environ.get("TRITON_INTERPRET") == "1":
                cases.append(pytest.param(name, "cpu", id=f"{name}-interpreter"))
    return cases


def factors(a, b, private, shared, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=g) * 0.2).to(device).requires_grad_(True)  # noqa: E731
    return make(private, a), make(b, private), make(private + shared), make(shared, a), make(b, shared)


def rel_err(x, y):
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


@contextlib.contextmanager
def using(backend):
    """Force a backend of `_cases()` ("triton-accumulate": Triton with `set_base_gemm_adds(False)`)."""
    set_kernel_backend("triton" if backend.startswith("triton") else backend)
    set_base_gemm_adds(backend != "triton-accumulate")
    try:
        yield
    finally:
        set_kernel_backend(None)
        set_base_gemm_adds(None)


def run_fused(backend, x, weight, bias, params, p, seed, upstream_seed=5, last_in_block=True):
    with using(backend):
        out = rasa_linear(x, weight, bias, *params, dropout_p=p, seed=seed, last_in_block=last_in_block)
        g = torch.Generator().manual_seed(upstream_seed)
        upstream = torch.randn(out.shape, generator=g).to(x.device, x.dtype)
        grads = torch.autograd.grad(out, [x, *params], upstream)
    return out, upstream, grads


def dense_reference(x, weight, bias, params, upstream, p, seed):
    """Eq. 5 in float64 with the one dropout mask: the output and the gradients of x and the factors."""
    x64 = x.detach().double().requires_grad_(True)
    params64 = [t.detach().double().requires_grad_(True) for t in params]
    mask = dropout_mask(x.detach(), p, seed) if p > 0 else torch.ones_like(x64)
    dropped = x64 * mask * dropout_scale(p)
    ref = x64 @ weight.double().t() + dropped @ dense_delta(*params64).t()
    if bias is not None:
        ref = ref + bias.double()
    return ref, torch.autograd.grad(ref, [x64, *params64], upstream.double())


@pytest.mark.parametrize(("backend", "device"), _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("a", "b", "private", "shared", "p"), SHAPES)
@pytest.mark.parametrize("last_in_block", [True, False], ids=["two-nodes", "one-node"])
def test_forward_and_all_gradients_match_the_dense_reference(backend, device, dtype, a, b, private, shared, p,
                                                             last_in_block):
    if backend.startswith("triton") and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter computes bf16 dots through numpy, which has no bf16")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, a, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(b, a, generator=g) * 0.1).to(device, dtype)
    bias = torch.randn(b, generator=g).to(device, dtype)
    params = factors(a, b, private, shared, device)
    seed = 1234
    out, upstream, grads = run_fused(backend, x, weight, bias, params, p, seed, last_in_block=last_in_block)

    ref, ref_grads = dense_reference(x, weight, bias, params, upstream, p, seed)

    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert rel_err(out, ref) <= tol
    for name, grad, grad_ref, param in zip(["x", "A_p", "B_p", "D", "A_s", "B_s"], grads, ref_grads,
                                           [x, *params]):
        assert grad.dtype == param.dtype and grad.shape == param.shape, name
        if grad_ref.numel() == 0:
            continue
        assert rel_err(grad, grad_ref) <= tol, name


@pytest.mark.parametrize(("backend", "device"), _cases())
def test_eval_mode_input_without_grad_and_bf16_factors(backend, device):
    """No dropout, an input that needs no gradient, and factors in bf16 (their gradients stay bf16)."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x = torch.randn(5, 40, generator=g).to(device, dtype)
    weight = (torch.randn(24, 40, generator=g) * 0.1).to(device, dtype)
    params = [t.detach().to(dtype).requires_grad_(True) for t in factors(40, 24, 3, 6, device)]
    with using(backend):
        out = rasa_linear(x, weight, None, *params)
        grads = torch.autograd.grad(out.sum(), params)
    params64 = [t.detach().double().requires_grad_(True) for t in params]
    ref = x.double() @ weight.double().t() + x.double() @ dense_delta(*params64).t()
    ref_grads = torch.autograd.grad(ref.sum(), params64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) <= tol
    for grad, grad_ref, param in zip(grads, ref_grads, params):
        assert grad.dtype == param.dtype
        assert rel_err(grad, grad_ref) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_triton_and_torch_backends_agree_on_an_8b_sized_layer(p):
    """One Llama-3.1-8B gate_proj-sized layer (4096 -> 14336), bf16, 2 x 1000 tokens, r=8 k=1 L=32."""
    if not torch.cuda.is_available() or not _triton_ok():
        pytest.skip("needs CUDA and triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1000, 4096, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(14336, 4096, generator=g) * 0.02).to("cuda", torch.bfloat16)
    params = factors(4096, 14336, 7, 32, "cuda", seed=1)
    results = {name: run_fused(name, x, weight, None, params, p, 99)
               for name in ("torch", "triton", "triton-accumulate")}
    out_t, _, grads_t = results["torch"]
    for backend in ("triton", "triton-accumulate"):
        out_k, _, grads_k = results[backend]
        assert rel_err(out_k, out_t) <= 1e-2, backend
        for name, a, b in zip(["x", "A_p", "B_p", "D", "A_s", "B_s"], grads_k, grads_t):
            assert rel_err(a, b) <= 1e-2, (backend, name)


@pytest.mark.parametrize(("backend", "device"), [c for c in _cases() if c.values[0].startswith("triton")]
                         or [pytest.param("triton", "none", marks=pytest.mark.skip(reason="triton not installed"))])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("pack", ["fused", "separate"])
def test_triton_launch_shapes_do_not_change_the_result(backend, device, splits, pack):
    """Both forward packings; unsplit reductions (plain stores) and forced splits (atomics); small blocks and
    ragged edges; the row-block kernels' column ranges split in `splits`. Run under `plans.configs`, which
    restores the committed shapes afterwards."""
    from rasa_lora.ops import plans

    changes = {name: {"splits": splits, "BM": 16} for name in ("down", "bwd_up", "ga", "up", "gx")}
    for name in ("down", "ga", "gx"):
        changes[name]["BK"] = 32
    for name in ("bwd_up", "up"):
        changes[name]["BN"] = 32
    changes["down"]["pack"] = pack
    committed = plans.CONFIGS
    dtype = torch.float32
    g = torch.Generator().manual_seed(7)
    x = torch.randn(70, 100, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(45, 100, generator=g) * 0.1).to(device, dtype)
    params = factors(100, 45, 3, 12, device, seed=8)
    with plans.configs(changes):
        out, upstream, grads = run_fused(backend, x, weight, None, params, 0.2, 77)
        # the shapes asked for are the ones that ran
        down_plans = [plan for key, plan in plans._PLANS.items() if key[0] == "down" and key[1] == 70]
        assert down_plans and all(plan.BM == 16 and plan.separate == (pack == "separate") for plan in down_plans)
    assert plans.CONFIGS is committed
    ref, ref_grads = dense_reference(x, weight, None, params, upstream, 0.2, 77)
    assert rel_err(out, ref) <= 1e-5
    for name, grad, grad_ref in zip(["x", "A_p", "B_p", "D", "A_s", "B_s"], grads, ref_grads):
        assert rel_err(grad, grad_ref) <= 1e-5, name


def test_configs_context_restores_the_committed_shapes_and_refuses_unknown_kernels():
    from rasa_lora.ops import plans

    committed = plans.CONFIGS
    before = plans.plan(("up", 64, 96, 64, torch.bfloat16), plans.up_plan)
    with plans.configs({"up": {"BM": 16}}):
        assert plans.CONFIGS["up"]["BM"] == 16 and committed["up"]["BM"] != 16
        assert plans.plan(("up", 64, 96, 64, torch.bfloat16), plans.up_plan).BM == 16
    assert plans.CONFIGS is committed
    assert plans.plan(("up", 64, 96, 64, torch.bfloat16), plans.up_plan) == before
    with pytest.raises(ValueError, match="no launch shapes named"), plans.configs({"gu": {"BM": 16}}):
        pass


@pytest.mark.parametrize(("backend", "device"), [c for c in _cases() if c.values[0] in ("triton", "torch", "cublas")])
def test_a_layers_gradients_hold_no_more_memory_than_its_parameters(backend, device):
    """Autograd keeps the returned gradients as the parameters' .grad, views included: a view of a larger
    workspace would keep that workspace (token-sized temporaries) alive until zero_grad, for every layer. The
    layer's own dA_p, dB_p and dD hold no more than their size (Triton: one allocation for the three, each part
    16-byte aligned); the pool's may share the temporaries."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 56, generator=g).to(device, dtype).requires_grad_(True)  # odd sizes: parts need padding
    weight = (torch.randn(45, 56, generator=g) * 0.1).to(device, dtype)
    params = factors(56, 45, 7, 5, device, seed=3)
    with using(backend):
        rasa_linear(x, weight, None, *params, dropout_p=0.1, seed=5).float().square().sum().backward()
    own = params[:3]
    storages = {t.grad.untyped_storage().data_ptr(): t.grad.untyped_storage().nbytes() for t in own}
    assert sum(storages.values()) <= sum(t.numel() * 4 + 12 for t in own)  # each padded to 16 bytes at most
    if backend.startswith("triton"):
        assert len(storages) == 1
        for t in params:  # every part 16-byte aligned (the launch cache's condition)
            assert t.grad.data_ptr() % 16 == 0
    for t in params:
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape and t.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cached_launches_follow_each_calls_seed_and_shape():
    """After the first launch the kernels are launched from a cache (`launch.Launcher`): later calls with
    other seeds, dropout rates and token counts must still get their own masks and shapes."""
    if not torch.cuda.is_available() or not _triton_ok():
        pytest.skip("needs CUDA and triton")
    from rasa_lora.ops import launch

    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(72, 96, generator=g) * 0.1).to("cuda")
    params = factors(96, 72, 5, 20, "cuda", seed=12)
    for rows, p, seed in [(50, 0.1, 1), (50, 0.1, 2), (50, 0.3, 2), (33, 0.1, 2), (50, 0.0, 0), (50, 0.1, 1)]:
        x = torch.randn(rows, 96, generator=g).to("cuda").requires_grad_(True)
        out, upstream, grads = run_fused("triton", x, weight, None, params, p, seed)
        ref, ref_grads = dense_reference(x, weight, None, params, upstream, p, seed)
        assert rel_err(out, ref) <= 1e-5, (rows, p, seed)
        for name, grad, grad_ref in zip(["x", "A_p", "B_p", "D", "A_s", "B_s"], grads, ref_grads):
            assert rel_err(grad, grad_ref) <= 1e-5, (name, rows, p, seed)
    if settings.FAST_LAUNCH():  # the cached path was taken
        assert launch.DOWN_PACK.compiled and launch.UP_ROWS.compiled


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cublas"])  # cublas: its mask comes from a Triton kernel
def test_triton_kernels_on_a_second_gpu_while_the_first_is_current(backend):
    """A model spread over GPUs in one process (device_map="auto"): layers on cuda:1 while cuda:0 is current."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not _triton_ok():
        pytest.skip("needs two CUDA devices and triton")
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(40, 64, generator=g).to("cuda:1").requires_grad_(True)
    weight = (torch.randn(48, 64, generator=g) * 0.1).to("cuda:1")
    params = factors(64, 48, 3, 10, "cuda:1", seed=14)
    out, upstream, grads = run_fused(backend, x, weight, None, params, 0.1, 3)
    ref, ref_grads = dense_reference(x, weight, None, params, upstream, 0.1, 3)
    assert rel_err(out, ref) <= 1e-5
    for name, grad, grad_ref in zip(["x", "A_p", "B_p", "D", "A_s", "B_s"], grads, ref_grads):
        assert rel_err(grad, grad_ref) <= 1e-5, name


def test_launch_cache_keys(monkeypatch):
    """`launch.Launcher`: a compiled kernel is reused only for arguments Triton would compile the same way
    (dtypes, alignment, integers, launch options), whatever the per-call seed; unaligned tensors never reuse."""
    from rasa_lora.ops import launch

    class Compiled:
        function, packed_metadata = 1, None

        def __init__(self):
            self.launches = []

        def run(self, *args):
            self.launches.append(args[9:])  # grid x/y/z, stream, function, metadata, launch metadata, two hooks

    class JIT:  # stands in for a @triton.jit function with arguments (x_ptr, M, seed_h, BM: constexpr)
        arg_names = ["x_ptr", "M", "seed_h", "BM"]

        def __init__(self):
            self.compiled = []

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages):
                self.compiled.append(Compiled())
                return self.compiled[-1]

            return run

    monkeypatch.setattr(settings.FAST_LAUNCH, "forced", True)
    monkeypatch.setattr(launch, "cacheable", lambda kernel, device: True)
    monkeypatch.setattr(launch, "current_stream", lambda device: 0)
    jit = JIT()
    launcher = launch.Launcher(jit)
    x = torch.zeros(64)
    launcher((2,), (x, 8, 123, 16), 4, 1)
    launcher((2,), (x, 8, 456, 16), 4, 1)  # another seed: the cached kernel, given this call's seed
    assert len(jit.compiled) == 1 and jit.compiled[0].launches == [(x, 8, 456, 16)]
    for args, warps in [((x, 9, 1, 16), 4), ((x.double(), 8, 1, 16), 4), ((x, 8, 1, 32), 4), ((x, 8, 1, 16), 8)]:
        launcher((2,), args, warps, 1)  # another integer, dtype, constexpr, launch option: compiled anew
    assert len(jit.compiled) == 5
    unaligned = torch.zeros(65)[1:]  # 4 bytes past an aligned start
    launcher((2,), (unaligned, 8, 1, 16), 4, 1)
    launcher((2,), (unaligned, 8, 1, 16), 4, 1)
    assert len(jit.compiled) == 7  # never cached, never served from the aligned tensor's entry
    monkeypatch.setattr(settings.FAST_LAUNCH, "forced", False)
    launcher((2,), (x, 8, 1, 16), 4, 1)
    assert len(jit.compiled) == 8


def test_cached_launches_call_the_c_launcher_directly_when_they_can():
    """Triton 3.x's CUDA launcher object wraps a C `launch` in a Python `__call__` that only adds scratch buffers:
    without scratch memory the cache calls `launch` itself, with the launcher's own options; otherwise `run`."""
    from rasa_lora.ops import launch

    calls = []
    run = SimpleNamespace(launch=lambda *args: calls.append(("launch", args)), global_scratch_size=0,
                          profile_scratch_size=0, launch_cooperative_grid=False, launch_pdl=True)
    kernel = SimpleNamespace(run=run, function=7, packed_metadata="meta")
    direct, function, options, metadata = launch._entry(kernel)
    direct(2, 1, 1, 0, function, *options, metadata, None, None, None, "x", 8)
    assert calls == [("launch", (2, 1, 1, 0, 7, False, True, None, None, "meta", None, None, None, "x", 8))]
    run.global_scratch_size = 64  # needs a scratch buffer: through the Python wrapper
    assert launch._entry(kernel)[0] is run and launch._entry(kernel)[2] == ()


def test_backend_choice(monkeypatch):
    import importlib

    from rasa_lora.ops import kernel_backend, kernels

    fused = importlib.import_module("rasa_lora.ops.rasa_linear")  # the module (the package exports the function)

    def triton_installed(installed):  # the choice is cached per device kind and rank count
        monkeypatch.setattr(kernels, "available", lambda: installed)
        fused._CHOSEN.clear()

    x = torch.empty(4, 8)
    assert kernel_backend(x, 39) == "torch"  # the CPU
    cuda_like = SimpleNamespace(is_cuda=True)
    triton_installed(True)
    assert kernel_backend(cuda_like, 39) == "triton"  # r=8 k=1 over 32 layers: R = 64
    assert kernel_backend(cuda_like, 78) == "triton"  # r=16 k=2: R = 128
    assert kernel_backend(cuda_like, 156) == "cublas"  # r=32 k=4: R = 256
    assert fused.backend_for(cuda_like, 39) is fused.backend_for(cuda_like, 39)  # chosen once, then looked up
    triton_installed(False)
    assert kernel_backend(cuda_like, 39) == "cublas"
    set_kernel_backend("torch")
    try:
        assert kernel_backend(cuda_like, 39) == "torch"
    finally:
        set_kernel_backend(None)
    monkeypatch.undo()
    fused._CHOSEN.clear()  # no choice made under the patched `available` outlives the test
    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_kernel_backend("cuda")
    # one mask and one scale for every backend: p as the mask has it (rounded to 2**-16)
    assert dropout_scale(0.05) == 1 / (1 - effective_p(0.05))
    rows = torch.empty(64, 64)
    assert torch.equal(dropout_mask(rows, 0.3, 5), dropout_mask(rows, 0.3, 5))
    assert not torch.equal(dropout_mask(rows, 0.3, 5), dropout_mask(rows, 0.3, 6))


def test_env_flag_reads_one_vocabulary_and_refuses_other_values(monkeypatch):
    monkeypatch.delenv("RASA_LORA_TEST_FLAG", raising=False)
    assert settings.env_flag("RASA_LORA_TEST_FLAG", True) is True
    assert settings.env_flag("RASA_LORA_TEST_FLAG", False) is False
    for value, expected in (("0", False), ("false", False), ("False", False), ("", False), ("no", False),
                            ("OFF", False), ("1", True), ("yes", True), ("True", True), (" on ", True)):
        monkeypatch.setenv("RASA_LORA_TEST_FLAG", value)
        assert settings.env_flag("RASA_LORA_TEST_FLAG", not expected) is expected, value
    monkeypatch.setenv("RASA_LORA_TEST_FLAG", "maybe")
    with pytest.raises(ValueError, match="RASA_LORA_TEST_FLAG='maybe' is not a boolean"):
        settings.env_flag("RASA_LORA_TEST_FLAG", True)


def test_accelerates_flags_are_read_by_the_one_env_flag(monkeypatch):
    """train/distributed.py once read "no" as off and "yes" as on by its own rule; now by `settings.env_flag`."""
    from rasa_lora.train import distributed

    assert distributed.env_flag is settings.env_flag
    assert not hasattr(distributed, "_env_flag")


@pytest.mark.parametrize("R", [16, 32, 64, 128, 256])
def test_float32_launch_shapes_pipeline_at_most_two_stages(R):
    """Float32 doubles every pipelined tile's shared memory, the token-sized ones too, whatever R: the committed
    4-stage shapes (tuned in bf16) must drop to two stages (docs/performance.md, record 7)."""
    from rasa_lora.ops import plans

    for name, cfg in plans.CONFIGS.items():
        if "stages" in cfg:
            assert plans.fit(name, R, 4)["stages"] <= 2, (name, R)
            assert plans.fit(name, R, 2)["stages"] == (cfg["stages"] if R <= 64 else min(cfg["stages"], 2))


def test_shape_keyed_caches_stay_bounded_as_token_counts_vary(monkeypatch):
    """Launch plans and workspace layouts are cached per shape, token count included: batches of ever new lengths
    must not grow them without bound (they empty at a cap and refill), and a refilled entry is the same plan."""
    from rasa_lora.ops import plans, triton_backend

    monkeypatch.setattr(plans, "MAX_CACHED", 3)
    plans.clear_plans()
    first = plans.plan(("up", 8, 64, 64, torch.bfloat16), plans.up_plan)
    for M in range(16, 16 + 8 * 7, 8):
        plans.plan(("up", M, 64, 64, torch.bfloat16), plans.up_plan)
        assert len(plans._PLANS) <= 3
    assert plans.plan(("up", 8, 64, 64, torch.bfloat16), plans.up_plan) == first
    plans.clear_plans()

    triton_backend._WORKSPACE_PLANS.clear()  # workspace layouts: the same bound (3 here)
    for M in range(1, 30):
        views = triton_backend.workspaces("cpu", M, 20, 12, 3, 4, 16, torch.bfloat16)
        assert len(triton_backend._WORKSPACE_PLANS) <= 3
        gu16 = views[-1]
        assert gu16.shape == (M, 16) and gu16.dtype == torch.bfloat16
        assert all(t.data_ptr() % 16 == 0 for t in views)  # every part 16-byte aligned
    triton_backend._WORKSPACE_PLANS.clear()
