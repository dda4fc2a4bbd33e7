"""PriLoRA: the rank schedule, the forward and merge against dense LoRA, the statistics and the pruning, PEFT
round trips."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from rasa_lora.baselines.prilora import PriloraConfig, PriloraLayer, layer_rank, plan_ranks
from rasa_lora.baselines.prilora.layer import Linear
from rasa_lora.models import LLAMA_PROJECTIONS as ALL_PROJ
from rasa_lora.models import tiny_llama


def test_ranks_grow_linearly_with_depth_to_the_papers_budget():
    ranks = [layer_rank(i, 32, 4, 12) for i in range(32)]
    assert ranks == sorted(ranks) and ranks[0] == 4 and ranks[-1] == 12
    # Sum L r + r/2 at r = 8, 16, 32: the RaSA paper's 21.3M / 42.6M / 85.2M (tests/baselines/test_counts.py)
    assert [sum(layer_rank(i, 32, r / 2, 3 * r / 2) for i in range(32)) for r in (8, 16, 32)] == [260, 520, 1040]


def test_plan_gives_every_module_of_a_layer_that_layers_rank():
    paths = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")] + ["lm_head"]
    ranks = plan_ranks(paths, PriloraConfig(r=4))
    assert [ranks[f"model.layers.{i}.self_attn.q_proj"] for i in range(4)] == [3, 4, 5, 6]
    assert all(ranks[f"model.layers.{i}.self_attn.v_proj"] == ranks[f"model.layers.{i}.self_attn.q_proj"]
               for i in range(4))
    assert ranks["lm_head"] == 4


def _layer(in_features: int = 23, out_features: int = 17, rank: int = 3, **config) -> Linear:
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features)
    return Linear(base, "default", PriloraConfig(r=4, lora_alpha=6.0, init_weights=False, **config), rank=rank)


def test_forward_gradient_and_merge_match_dense_lora_at_the_layers_rank():
    layer = _layer()
    A, B = layer.prilora_A["default"], layer.prilora_B["default"]
    assert A.shape == (3, 23) and B.shape == (17, 3) and layer.scaling["default"] == 6.0 / 3
    x = torch.randn(2, 5, 23)
    delta = (6.0 / 3) * B.double() @ A.double()
    out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x) + (x.double() @ delta.t()).float(), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    grad_A, grad_B = torch.autograd.grad(out, (A, B), grad_out)
    flat_x, flat_g = x.reshape(-1, 23).double(), grad_out.reshape(-1, 17).double()
    torch.testing.assert_close(grad_A.double(), 2.0 * B.double().t() @ flat_g.t() @ flat_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_B.double(), 2.0 * flat_g.t() @ flat_x @ A.double().t(), rtol=1e-5, atol=1e-5)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.double(), weight.double() + delta.detach(), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_importance_is_an_average_of_abs_a_times_input_column_norms():
    layer = _layer().train()
    A = layer.prilora_A["default"]
    steps = [torch.randn(4, 6, 23) for _ in range(3)]
    expected = None
    for x in steps:
        layer(x[:2])
        layer(x[2:])  # two micro-batches make one optimizer step
        step = A.detach().abs() * x.reshape(-1, 23).pow(2).sum(0).sqrt()
        expected = step if expected is None else 0.85 * expected + 0.15 * step
        layer.update_importance("default", beta=0.85)
    torch.testing.assert_close(layer.prilora_importance["default"], expected, rtol=1e-5, atol=1e-6)
    layer.eval()
    layer(torch.randn(2, 23))  # evaluation adds no statistics
    assert layer.input_sq_norm["default"].abs().sum() == 0


def test_pruning_zeroes_the_least_important_fraction_of_each_row():
    layer = _layer(rank=4).train()
    layer(torch.randn(8, 23))
    layer.update_importance("default", beta=0.85)
    importance = layer.prilora_importance["default"].clone()
    A_before = layer.prilora_A["default"].detach().clone()
    assert layer.prune("default", ratio=0.5) == 4 * 11
    A = layer.prilora_A["default"].detach()
    for row in range(4):
        lowest = set(importance[row].argsort()[:11].tolist())
        assert {i for i in range(23) if A[row, i] == 0} == lowest
        kept = [i for i in range(23) if i not in lowest]
        assert torch.equal(A[row, kept], A_before[row, kept])


def _model(r: int = 4, **config):
    model = get_peft_model(tiny_llama(), PriloraConfig(r=r, target_modules=ALL_PROJ, init_weights=False, **config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prilora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_the_tuner_prunes_only_every_interval_steps():
    model = _model(prune_interval=2, prune_ratio=0.25).train()
    x = torch.randint(0, 128, (2, 7))
    counts = []
    for step in (1, 2, 3, 4):
        model(x)
        counts.append(model.base_model.update_and_prune(step))
    per_step = sum(int(0.25 * m.in_features) * m.r["default"] for m in model.modules()
                   if isinstance(m, PriloraLayer))
    assert counts == [0, per_step, 0, per_step]


def test_save_load_is_bitwise_keeps_the_ranks_and_merges(tmp_path):
    model = _model()
    x = torch.randint(0, 128, (2, 7))
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ranks = {name: m.r["default"] for name, m in loaded.named_modules() if isinstance(m, PriloraLayer)}
    assert sorted(set(ranks.values())) == [3, 4, 5, 6]
    saved = {k: v for k, v in model.state_dict().items() if "prilora_" in k}
    assert saved and all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())
    assert torch.equal(loaded(x).logits, expected)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_several_adapters_and_extra_statistics_per_adapter():
    model = _model()
    model.add_adapter("other", PriloraConfig(r=8, target_modules=["q_proj"]))
    # an added adapter gets its own ramp too (PeftModel.add_adapter skips the tuner's pre-injection hook)
    assert [m.r["other"] for m in model.modules() if isinstance(m, PriloraLayer) and "other" in m.r] == [6, 8, 10, 12]
    assert model.base_model.extra_numel("other") == sum(
        m.prilora_A["other"].numel() for m in model.modules() if isinstance(m, PriloraLayer) and "other" in m.r)
    x = torch.randint(0, 128, (2, 7))
    first = model(x).logits
    model.set_adapter("other")
    assert not torch.allclose(model(x).logits, first)
    model.delete_adapter("other")
    assert not any(".other" in name for name, _ in model.named_parameters())
    assert not any("other" in m.prilora_importance or "other" in m.input_sq_norm
                   for m in model.modules() if isinstance(m, PriloraLayer))


@pytest.mark.parametrize("bad, message", [({"prune_ratio": 1.0}, "prune_ratio=1.0"),
                                          ({"r_start": 8, "r_end": 4}, "r_start <= r_end")])
def test_bad_settings_say_what_is_allowed(bad, message):
    with pytest.raises(ValueError, match=message):
        PriloraConfig(**bad)


def test_training_checkpoints_keep_the_statistics(tmp_path):
    from rasa_lora.train.checkpoint import load_checkpoint, save_checkpoint

    def build():
        model = _model().train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, optimizer, scheduler = build()
    for step in (1, 2):
        model(torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(step)))
        model.base_model.update_and_prune(step)
    model(torch.randint(0, 128, (2, 7)))  # statistics of a step not yet folded in
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"step": 2}, keep=1)
    fresh, optimizer, scheduler = build()
    load_checkpoint(path, fresh, optimizer, scheduler)
    saved, restored = model.base_model.statistics_state(), fresh.base_model.statistics_state()
    assert saved.keys() == restored.keys() and len(saved) == 28
    for path, adapters in saved.items():
        importance, sq_norm, steps = adapters["default"]
        assert steps == 2 and sq_norm.abs().sum() > 0
        back = restored[path]["default"]
        assert torch.equal(back[0], importance) and torch.equal(back[1], sq_norm) and back[2] == steps
