"""`rasa-lora params` reproduces the parameter column of the paper's Tables 1-2."""

import pytest

from rasa_lora.params import ALL_PROJ, count_trainable, load_config, main

# Paper, Tables 1-2 (Llama-3.1-8B and Mistral-7B-v0.3 share the projection shapes): exact counts.
EXPECTED = {("lora", 8): 20_971_520, ("lora", 16): 41_943_040, ("lora", 32): 83_886_080,
            ("rasa", 8): 20_980_256, ("rasa", 16): 41_960_512, ("rasa", 32): 83_921_024}


@pytest.mark.parametrize("architecture", ["llama-3.1-8b", "mistral-7b-v0.3"])
def test_counts_match_the_paper(architecture):
    config = load_config(architecture)
    for (method, r), expected in EXPECTED.items():
        row = count_trainable(config, method, r, None, ALL_PROJ)
        assert row.trainable == expected, (method, r)
        if method == "rasa":
            assert set(row.effective_rank.values()) == {r - r // 8 + 32 * (r // 8)}


def test_table_prints_rounded_values(capsys):
    assert main(["llama-3.1-8b", "--ranks", "8"]) == 0
    out = capsys.readouterr().out
    assert "20,971,520" in out and "20,980,256" in out and "r-k+Lk = 39" in out


def test_unknown_architecture_is_a_clear_error():
    from rasa_lora.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="Built-in names"):
        load_config("/no/such/dir")
