import pytest

from rasa_lora import RasaConfig


@pytest.mark.parametrize(("r", "expected_k"), [(1, 1), (4, 1), (8, 1), (16, 2), (32, 4), (64, 8)])
def test_default_k_is_max_r_over_8_and_1(r, expected_k):
    assert RasaConfig(r=r).rasa_k == expected_k


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 8, "rasa_k": 9}, "rasa_k=9 is larger than r=8"),
        ({"r": 0}, "r=0 must be a positive integer"),
        ({"r": -2}, "r=-2 must be a positive integer"),
        ({"r": 8, "rasa_k": -1}, "rasa_k=-1 must be an integer with 0 <= rasa_k <= r=8"),
        ({"r": 8, "rasa_dropout": 1.0}, "rasa_dropout=1.0 must lie in [0, 1)"),
        ({"r": 8, "bias": "some"}, "bias='some'"),
    ],
)
def test_bad_values_name_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError) as error:
        RasaConfig(**kwargs)
    assert message in str(error.value)


def test_peft_type_is_a_real_enum_member():
    from peft.utils import PeftType

    config = RasaConfig()
    assert config.peft_type is PeftType("RASA")
    assert config.peft_type.value == "RASA"
    assert "RASA" in [member.value for member in PeftType]


def test_config_round_trips_through_peft(tmp_path):
    from peft import PeftConfig

    RasaConfig(r=16, rasa_k=3, rasa_alpha=32, target_modules=["q_proj"]).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RasaConfig)
    assert (loaded.r, loaded.rasa_k, loaded.rasa_alpha) == (16, 3, 32)
