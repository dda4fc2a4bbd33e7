"""The recipe: YAML + overrides, unknown keys, value checks."""

from __future__ import annotations

import pytest

from rasa_lora.train.config import build_config, load_config, parse_overrides, valid_keys


def test_defaults_are_the_papers_recipe():
    config = build_config({})
    assert (config.optimizer, config.learning_rate, config.betas) == ("lionw", 5e-4, [0.9, 0.95])
    assert (config.weight_decay, config.global_batch_size, config.epochs) == (0, 192, 8)
    assert (config.warmup_ratio, config.lr_scheduler) == (0.1, "cosine")
    assert config.use_reentrant is False and config.group_by_length and config.shared_ranks == 1


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ValueError, match="unknown config key.*'learning_rat'.*valid keys: base_model"):
        build_config({"learning_rat": 1e-4})


def test_overrides_parse_types_and_lists():
    values = parse_overrides(["--r", "16", "--target-modules", "q_proj,v_proj", "--bf16", "false", "--overwrite",
                              "--learning_rate=1e-4"])
    assert values == {"r": 16, "target_modules": ["q_proj", "v_proj"], "bf16": False, "overwrite": True,
                      "learning_rate": "1e-4"}


def test_cli_overrides_win_over_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: lora\nr: 4\nalpha: 8\n")
    config = load_config(path, {"r": 16})
    assert (config.method, config.r, config.alpha) == ("lora", 16, 8)


@pytest.mark.parametrize("method", ["mora", "prilora"])
def test_the_baselines_outside_peft_are_accepted(method):
    assert build_config({"method": method}).method == method


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="method='lorra' is unknown; choose one of: rasa, lora"):
        build_config({"method": "lorra"})


def test_micro_batch_must_divide_global_batch():
    with pytest.raises(ValueError, match="micro_batch_size=5 does not divide global_batch_size=192"):
        build_config({"micro_batch_size": 5})


def test_rasa_k_larger_than_r_is_refused():
    with pytest.raises(ValueError, match="rasa_k=9 is larger than r=8"):
        build_config({"rasa_k": 9})


@pytest.mark.parametrize(("r", "rasa_k"), [(8, None), (16, None), (4, None), (32, 0), (8, 8), (8, 9), (8, -1)])
def test_the_recipe_and_the_adapter_config_share_one_rank_rule(r, rasa_k):
    """`TrainConfig` takes RaSA's default k and its checks from `RasaConfig` (one source): the same k, or the same
    error, for every setting."""
    from rasa_lora import RasaConfig

    try:
        expected = RasaConfig(r=r, rasa_k=rasa_k).rasa_k
    except ValueError as error:
        with pytest.raises(ValueError, match=str(error).split(";")[0]):
            build_config({"r": r, "rasa_k": rasa_k})
        return
    assert build_config({"r": r, "rasa_k": rasa_k}).shared_ranks == expected


def test_every_key_has_a_docstring_in_the_docs():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert [key for key in valid_keys() if f"`{key}`" not in docs] == []


def test_yaml_exponent_text_becomes_a_float(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("learning_rate: 5e-3\nbetas: [0.9, '0.95']\n")
    config = load_config(path)
    assert config.learning_rate == 0.005 and config.betas == [0.9, 0.95]


def test_wrong_type_names_the_key():
    with pytest.raises(ValueError, match="r='eight' is not a valid int"):
        build_config({"r": "eight"})


@pytest.mark.parametrize("method", ["fft", "olora", "pissa"])
def test_epoch_adapters_are_refused_where_there_is_no_plain_adapter_to_keep(method):
    with pytest.raises(ValueError, match="save_epoch_adapters"):
        build_config({"method": method, "save_epoch_adapters": True})
