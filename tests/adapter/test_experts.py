"""RaSA on Mixtral's experts (3-D parameters, `target_parameters`) and attention, on a tiny random Mixtral."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import rasa_lora
from rasa_lora.adapter.experts import ParamWrapper
from rasa_lora.models import tiny_mixtral
from rasa_lora.reference import dense_delta
from tests.adapter.helpers import randomize, tokens

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LAYERS, HIDDEN, INTER, NUM_EXPERTS = 3, 24, 20, 4


def mixtral_rasa(r=4, k=1, seed=0, hidden=HIDDEN, inter=INTER, **kwargs):
    base = tiny_mixtral(num_layers=LAYERS, hidden_size=hidden, intermediate_size=inter, num_experts=NUM_EXPERTS,
                        seed=seed)
    config = rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=8, target_modules=ATTENTION,
                                  target_parameters=EXPERTS, **kwargs)
    model = get_peft_model(base, config)
    randomize(model)
    return model


def wrappers(model) -> dict[str, ParamWrapper]:
    return {f"{name}:{m.parameter_name}": m for name, m in model.named_modules() if isinstance(m, ParamWrapper)}


def dense_reference(model) -> torch.nn.Module:
    """The base model with each adapted matrix replaced by W + dW, dW built per expert by `reference.dense_delta`."""
    reference = copy.deepcopy(model.get_base_model())
    from rasa_lora.adapter import RasaLayer

    with torch.no_grad():
        for name, layer in model.get_base_model().named_modules():
            if not isinstance(layer, RasaLayer) or ".base_layer" in name:  # nested wrappers: reached via the outer
                continue
            chain = layer
            while isinstance(chain, RasaLayer):  # nested wrappers: one per expert parameter
                f = chain.factors("default")
                if isinstance(chain, ParamWrapper):
                    target = reference.get_submodule(name.replace(".base_layer", ""))
                    while hasattr(target, "base_layer"):
                        target = target.base_layer
                    param = getattr(target, chain.parameter_name)
                    for e in range(chain.num_experts):
                        delta = dense_delta(*(f[key][e].double() for key in ("A_p", "B_p", "D", "A_s", "B_s")))
                        param[e] += delta.to(param.dtype)
                else:
                    target = reference.get_submodule(name).base_layer
                    target.weight += dense_delta(*(f[key].double() for key in ("A_p", "B_p", "D", "A_s", "B_s")
                                                   )).to(target.weight.dtype)
                chain = chain.base_layer
    return _unwrap(reference)


def _unwrap(model):
    """Replace every RaSA wrapper in a (deep-copied) model by its base module."""
    from rasa_lora.adapter import RasaLayer

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RasaLayer):
                setattr(module, child_name, child.get_base_layer())
    return model


def test_installed_transformers_stores_mixtral_experts_as_3d_parameters():
    """The reason for target_parameters: no per-expert nn.Linear exists to target (transformers >= 5)."""
    base = tiny_mixtral()
    experts = base.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 20, 24) and experts.down_proj.shape == (4, 24, 20)
    assert not any(isinstance(m, torch.nn.Linear) for m in experts.modules())


def test_factors_and_pools_have_one_pool_per_expert_index():
    r, k = 4, 1
    model = mixtral_rasa(r=r, k=k)
    found = wrappers(model)
    assert len(found) == 2 * LAYERS
    for key, layer in found.items():
        a, b = (HIDDEN, 2 * INTER) if key.endswith("gate_up_proj") else (INTER, HIDDEN)
        f = layer.factors("default")
        assert f["A_p"].shape == (NUM_EXPERTS, r - k, a) and f["B_p"].shape == (NUM_EXPERTS, b, r - k)
        assert f["D"].shape == (NUM_EXPERTS, r - k + LAYERS * k)
        assert f["A_s"].shape == (NUM_EXPERTS, LAYERS * k, a) and f["B_s"].shape == (NUM_EXPERTS, b, LAYERS * k)
    pools = model.base_model.rasa_shared_A["default"]
    assert set(pools) == {f"model-layers-*-self_attn-{p}" for p in ATTENTION} | {
        "model-layers-*-mlp-experts-gate_up_proj", "model-layers-*-mlp-experts-down_proj"}


def test_parameter_count_by_hand():
    r, k = 4, 1
    model = mixtral_rasa(r=r, k=k)
    kv = 2 * (HIDDEN // 4)
    attention = [(HIDDEN, HIDDEN), (HIDDEN, kv), (HIDDEN, kv), (HIDDEN, HIDDEN)]
    stacks = [(HIDDEN, 2 * INTER), (INTER, HIDDEN)]
    lora = LAYERS * (sum(r * (a + b) for a, b in attention) + NUM_EXPERTS * sum(r * (a + b) for a, b in stacks))
    d_values = LAYERS * (len(attention) + NUM_EXPERTS * len(stacks)) * (r - k + LAYERS * k)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora + d_values == 4 * 3 * (2 * 48 + 2 * 36 + 4 * (64 + 44)) + 3 * 12 * 6


def test_forward_matches_the_dense_reference():
    model = mixtral_rasa().eval()
    reference = dense_reference(model).eval()
    x = tokens(vocab=128)
    with torch.no_grad():
        out, expected, base = model(x).logits, reference(x).logits, None
        with model.disable_adapter():
            base = model(x).logits
    assert (expected - base).abs().max() > 1e-2  # the update is not zero
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_the_dense_reference():
    """d loss / d (expert pool) through the parametrization equals autograd through dense W + dW built per expert."""
    model = mixtral_rasa()
    model.train()
    x = tokens(vocab=128)
    model(x, labels=x).loss.backward()
    pool = model.base_model.rasa_shared_A["default"]["model-layers-*-mlp-experts-down_proj"]
    got = pool.grad.clone()
    assert got.abs().max() > 0

    # the same loss with each expert stack's dW formed by the reference, as a function of the pool
    layers = [m for m in wrappers(model).values() if m.parameter_name == "down_proj"]
    pool_copy = pool.detach().clone().requires_grad_(True)
    reference = _unwrap(copy.deepcopy(model.get_base_model()))
    for i, layer in enumerate(layers):
        f = {key: value.detach() for key, value in layer.factors("default").items()}
        f["A_s"] = pool_copy
        deltas = torch.stack([dense_delta(*(f[key][e].double() for key in ("A_p", "B_p", "D", "A_s", "B_s")))
                              for e in range(NUM_EXPERTS)])
        experts = reference.model.layers[i].mlp.experts
        weight = experts.down_proj.detach() + deltas.float()
        del experts.down_proj
        experts.down_proj = weight
    # the other adapted matrices keep their (detached) updates
    with torch.no_grad():
        dense = dense_reference(model)
    for i in range(LAYERS):
        for name in ATTENTION:
            dense_weight = getattr(dense.model.layers[i].self_attn, name).weight
            getattr(reference.model.layers[i].self_attn, name).weight = dense_weight
        reference.model.layers[i].mlp.experts.gate_up_proj = dense.model.layers[i].mlp.experts.gate_up_proj
    reference.train()
    reference(x, labels=x).loss.backward()
    torch.testing.assert_close(got, pool_copy.grad, rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = mixtral_rasa().eval()
    x = tokens(vocab=128)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("rasa_shared_A" in key and "experts" in key for key in saved) == 2  # each pool once
    fresh = tiny_mixtral(num_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=INTER, num_experts=NUM_EXPERTS)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)


def test_merge_unmerge_and_merge_and_unload():
    model = mixtral_rasa().eval()
    x = tokens(vocab=128)
    before = {name: p.detach().clone() for name, p in model.get_base_model().named_parameters() if "rasa_" not in name}
    with torch.no_grad():
        expected = model(x).logits
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        after = {name: p for name, p in model.get_base_model().named_parameters() if "rasa_" not in name}
        for name, value in before.items():
            torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
        assert not any("rasa_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_step_changes_only_the_adapter_and_the_pools_get_gradients():
    model = mixtral_rasa()
    model.train()
    x = tokens(vocab=128)
    model(x, labels=x).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert ".rasa_" in name or "rasa_shared" in name, name
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


def test_dropout_is_not_applied_to_experts_and_says_so():
    with pytest.warns(UserWarning, match="does not apply to the expert parameter"):
        model = mixtral_rasa(rasa_dropout=0.1)
    layer = next(iter(wrappers(model).values()))
    assert layer.rasa_dropout["default"] == 0.0  # the mask p of every path (one mask, ops.dropout)


def test_unmatched_target_parameters_is_a_clear_error():
    base = tiny_mixtral()
    config = rasa_lora.RasaConfig(r=4, target_parameters=["mlp.experts.no_such_proj"])
    with pytest.raises(ValueError, match="matched no parameter"):
        get_peft_model(base, config)


class _TransposedExperts(torch.nn.Module):
    """Experts stored (E, in, out), as `is_transposed=True` models keep them."""

    is_transposed = True

    def __init__(self, experts=3, a=5, b=7):
        super().__init__()
        self.weight_stack = torch.nn.Parameter(torch.randn(experts, a, b))

    def forward(self, x):  # x: (E, tokens, a)
        return torch.bmm(x, self.weight_stack)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"experts": _TransposedExperts()}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer["experts"](x)[..., :5]
        return x


def test_transposed_expert_stacks_get_the_transposed_update():
    torch.manual_seed(0)
    model = get_peft_model(_Block(), rasa_lora.RasaConfig(r=2, rasa_k=1, target_parameters=["experts.weight_stack"]))
    randomize(model)
    layer = next(iter(wrappers(model).values()))
    assert (layer.in_features, layer.out_features) == (5, 7)
    f = layer.factors("default")
    delta = torch.stack([dense_delta(*(f[key][e] for key in ("A_p", "B_p", "D", "A_s", "B_s"))) for e in range(3)])
    torch.testing.assert_close(layer.get_delta_weight("default"), delta.transpose(-2, -1).float())
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        out = layer(x)
        base = layer.get_base_layer().weight_stack
        torch.testing.assert_close(out, torch.bmm(x, base + delta.transpose(-2, -1)), rtol=1e-5, atol=1e-5)


def test_export_lora_refuses_expert_adapters_with_one_line(tmp_path, capsys):
    from rasa_lora.export import main

    mixtral_rasa().save_pretrained(tmp_path / "adapter")
    assert main([str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "expert parameters" in err and "rasa-lora merge" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


class _LinearExpertsBlock(torch.nn.Module):
    """Experts as per-expert nn.Linear (transformers 4.x's Mixtral layout: block_sparse_moe.experts.<e>.w1)."""

    def __init__(self, layers=3, experts=2, hidden=8):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"experts": torch.nn.ModuleList(
                torch.nn.ModuleDict({"w1": torch.nn.Linear(hidden, hidden, bias=False)}) for _ in range(experts))})
            for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = sum(expert["w1"](x) for expert in layer["experts"])
        return x


def test_per_expert_linears_are_pooled_per_expert_index_too():
    model = get_peft_model(_LinearExpertsBlock(), rasa_lora.RasaConfig(r=2, rasa_k=1, target_modules=["w1"]))
    pools = model.base_model.rasa_shared_A["default"]
    assert {key: tuple(p.shape) for key, p in pools.items()} == {
        "layers-*-experts-0-w1": (3, 8), "layers-*-experts-1-w1": (3, 8)}  # L*k = 3 ranks for each expert index


@pytest.mark.gpu
def test_mixtral_experts_on_cuda_bf16_match_the_dense_reference():
    """The same check on the GPU in bf16 (the dense reference rounds W + dW to bf16 once: a few 2^-8 roundings).
    Widths are multiples of 8: transformers runs CUDA experts through `torch._grouped_mm`, which needs 16-byte
    strides (the CPU tests' 24 x 20 experts fail there in the base model too)."""
    model = mixtral_rasa(hidden=32, inter=32).to(device="cuda", dtype=torch.bfloat16).eval()
    reference = dense_reference(model).eval()
    x = tokens(vocab=128).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits.float(), reference(x).logits.float(), rtol=2e-2, atol=2e-2)
