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


# Llama-3.1-70B and Mixtral-8x7B (paper Fig. 6, r = 4; no counts printed there), counted by hand from the shapes.
# LoRA adds r (a + b) per adapted (b, a) matrix; RaSA the same in total (r-k private ranks per layer plus its k
# ranks in the pool) plus one D of r-k+Lk values per matrix. k = max(r/8, 1).
def _k(r):
    return max(r // 8, 1)


def _llama_70b(r):
    hidden, kv, inter, layers = 8192, 8 * 128, 28672, 80
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),  # q, k, v, o as (in, out)
              (hidden, inter), (hidden, inter), (inter, hidden)]              # gate, up, down
    lora = layers * sum(r * (a + b) for a, b in shapes)                        # 12,943,360 r
    return lora, lora + layers * len(shapes) * (r - _k(r) + layers * _k(r))


def _mixtral_8x7b(r):
    hidden, kv, inter, layers, experts = 4096, 8 * 128, 14336, 32, 8
    attention = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    stacks = [(hidden, 2 * inter), (inter, hidden)]  # fused gate_up_proj, down_proj: one (b, a) matrix per expert
    lora = layers * (sum(r * (a + b) for a, b in attention) + experts * sum(r * (a + b) for a, b in stacks))
    matrices = layers * (len(attention) + experts * len(stacks))              # each has its own D
    return lora, lora + matrices * (r - _k(r) + layers * _k(r))


BIG = {  # the hand counts written out, so a change of the formulas above shows too
    ("llama3.1-70b", 4): (51_773_440, 51_819_920), ("llama3.1-70b", 8): (103_546_880, 103_595_600),
    ("llama3.1-70b", 16): (207_093_760, 207_191_200), ("llama3.1-70b", 32): (414_187_520, 414_382_400),
    ("mixtral-8x7b", 4): (55_836_672, 55_859_072), ("mixtral-8x7b", 8): (111_673_344, 111_698_304),
    ("mixtral-8x7b", 16): (223_346_688, 223_396_608), ("mixtral-8x7b", 32): (446_693_376, 446_793_216),
}


@pytest.mark.parametrize("architecture,r", sorted(BIG), ids=lambda v: str(v))
def test_big_model_counts_match_the_hand_count(architecture, r):
    hand = {"llama3.1-70b": _llama_70b, "mixtral-8x7b": _mixtral_8x7b}[architecture](r)
    assert hand == BIG[architecture, r]
    from rasa_lora.params import default_target_parameters

    config = load_config(architecture)
    experts = default_target_parameters(config)
    targets = ALL_PROJ[:4] if experts else ALL_PROJ
    lora = count_trainable(config, "lora", r, None, targets, target_parameters=experts)
    rasa = count_trainable(config, "rasa", r, None, targets, target_parameters=experts)
    assert (lora.trainable, rasa.trainable) == hand
    layers = config.num_hidden_layers
    assert set(rasa.effective_rank.values()) == {r - _k(r) + layers * _k(r)}


def test_mixtral_table_counts_the_experts_with_lora_and_rasa_only(capsys):
    assert main(["mixtral-8x7b", "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "mlp.experts.gate_up_proj" in out and "55,836,672" in out and "55,859,072" in out
    assert "r-k+Lk = 35" in out and "mora" not in out


def test_mora_on_experts_is_a_clear_error():
    from rasa_lora.errors import UserError

    with pytest.raises(UserError, match="--methods lora,rasa"):
        main(["mixtral-8x7b", "--ranks", "4", "--methods", "mora"])
