"""Where the matrices come from: grouping, checkpoint deltas, adapter deltas, the synthetic generator."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.analysis.sources import (
    adapter_groups,
    checkpoint_groups,
    group_names,
    split_layer_index,
    synthetic_groups,
)
from rasa_lora.models import tiny_llama


def test_split_layer_index_removes_the_first_integer_component():
    assert split_layer_index("model.layers.12.mlp.up_proj") == ("model.layers.*.mlp.up_proj", 12)
    assert split_layer_index("transformer.h.3") == ("transformer.h.*", 3)
    assert split_layer_index("lm_head") is None


def test_group_names_keeps_layer_order_numerically():
    names = [f"model.layers.{i}.mlp.up_proj" for i in (10, 2, 1)] + ["lm_head"]
    assert group_names(names) == {"model.layers.*.mlp.up_proj": [f"model.layers.{i}.mlp.up_proj" for i in (1, 2, 10)]}


def test_group_names_filters_targets():
    names = ["m.layers.0.q_proj", "m.layers.0.v_proj", "m.layers.1.q_proj"]
    assert list(group_names(names, ["q_proj"])) == ["m.layers.*.q_proj"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama and a copy with a known change to every weight."""
    root = tmp_path_factory.mktemp("ckpt")
    base = tiny_llama(num_layers=3, seed=0)
    base.save_pretrained(root / "base")
    tuned = tiny_llama(num_layers=3, seed=0)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.ndim == 2:
                parameter += 0.01 * torch.arange(parameter.numel()).reshape(parameter.shape) / parameter.numel()
    tuned.save_pretrained(root / "tuned")
    return root, base, tuned


def test_checkpoint_deltas_equal_the_weight_difference(checkpoints):
    root, base, tuned = checkpoints
    groups = {g.name: g for g in checkpoint_groups(root / "base", root / "tuned")}
    assert len(groups) == 7
    group = groups["model.layers.*.self_attn.k_proj"]
    assert group.modules == [f"model.layers.{i}.self_attn.k_proj" for i in range(3)]
    expected = tuned.model.layers[2].self_attn.k_proj.weight - base.model.layers[2].self_attn.k_proj.weight
    assert torch.allclose(group.deltas[2], expected, atol=1e-6)


def test_different_architectures_are_refused(checkpoints, tmp_path):
    root, _, _ = checkpoints
    tiny_llama(num_layers=3, hidden_size=48, seed=0).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="shape"):
        list(checkpoint_groups(root / "base", tmp_path / "wide"))


def test_different_layer_counts_are_refused(checkpoints, tmp_path):
    root, _, _ = checkpoints
    tiny_llama(num_layers=4, seed=0).save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match="different weights"):
        list(checkpoint_groups(root / "base", tmp_path / "deeper"))


def test_nan_in_a_checkpoint_is_refused_naming_the_weight(checkpoints, tmp_path):
    root, _, _ = checkpoints
    broken = tiny_llama(num_layers=3, seed=0)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*NaN"):
        list(checkpoint_groups(root / "base", tmp_path / "broken"))


def test_unmatched_targets_are_refused(checkpoints):
    root, _, _ = checkpoints
    with pytest.raises(ValueError, match="matches targets"):
        list(checkpoint_groups(root / "base", root / "tuned", targets=["c_attn"]))


def test_lora_adapter_deltas_equal_scaled_BA(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(num_layers=2, seed=1), config)
    model.save_pretrained(tmp_path / "lora")
    base = tiny_llama(num_layers=2, seed=1)
    base.save_pretrained(tmp_path / "base")
    groups = {g.name: g for g in adapter_groups(tmp_path / "lora", tmp_path / "base")}
    assert set(groups) == {"model.layers.*.self_attn.q_proj", "model.layers.*.mlp.down_proj"}
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    expected = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    assert torch.allclose(groups["model.layers.*.mlp.down_proj"].deltas[1], expected, atol=1e-6)


def test_synthetic_groups_are_seeded_and_high_rank():
    shapes = {"layers.*.a": (30, 20)}
    first = next(synthetic_groups(shapes, 4, seed=3)).deltas
    again = next(synthetic_groups(shapes, 4, seed=3)).deltas
    other = next(synthetic_groups(shapes, 4, seed=4)).deltas
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert int(torch.linalg.matrix_rank(first[0])) == 20


def test_rasa_adapter_deltas_equal_get_delta_weight(tmp_path):
    from peft import get_peft_model

    from rasa_lora import RasaConfig

    model = get_peft_model(tiny_llama(num_layers=3, seed=2),
                           RasaConfig(r=4, rasa_k=1, target_modules=["v_proj"], init_weights=False))
    model.save_pretrained(tmp_path / "rasa")
    tiny_llama(num_layers=3, seed=2).save_pretrained(tmp_path / "base")
    (group,) = adapter_groups(tmp_path / "rasa", tmp_path / "base")
    assert group.name == "model.layers.*.self_attn.v_proj" and group.deltas.shape[0] == 3
    expected = model.base_model.model.model.layers[0].self_attn.v_proj.get_delta_weight("default")
    assert torch.allclose(group.deltas[0], expected.detach(), atol=1e-6)
