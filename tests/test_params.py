"""`rasa-lora params`: the parameter column of the paper's Tables 1-2, and RaSA's step against LoRA's."""

import json

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


# --- RaSA's step against LoRA's (rasa_lora.step_size; docs/training.md, "RaSA's alpha against LoRA's") ----------------
def _table_row(out: str, method: str, r: int) -> list[str]:
    rows = [line.split() for line in out.splitlines() if line.split()[:2] == [method, str(r)]]
    assert len(rows) == 1, out
    return rows[0]


def test_table_gives_rasas_step_and_the_alpha_matching_lora(capsys):
    assert main(["llama-3.1-8b", "--ranks", "8,32", "--methods", "lora,rasa,mora"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header[6:8] == ["step", "match"]
    # Llama-3.1-8B, L = 32: sqrt(7 (8/14)^2 + 32 (8/64)^2) / sqrt(8) = 0.590; 8 / 0.590 = 13.6 (k = r/8 at both r)
    for r in (8, 32):
        assert _table_row(out, "rasa", r)[6:8] == ["0.590", "13.6"]
        assert _table_row(out, "lora", r)[6:8] == ["-", "-"]
        assert _table_row(out, "mora", r)[6:8] == ["-", "-"]
    assert "LoRA alpha 8 x step equals RaSA alpha 8's" in out and "LionW only" in out


def test_no_note_without_a_rasa_row(capsys):
    assert main(["llama-3.1-8b", "--ranks", "8", "--methods", "lora"]) == 0
    assert "LionW" not in capsys.readouterr().out


@pytest.fixture
def smollm2_shapes(tmp_path):
    """A local config with SmolLM2-135M's shapes (30 layers), so no GGUF needs converting."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152).save_pretrained(tmp_path)
    return str(tmp_path)


def test_json_gives_the_step_and_both_matched_alphas_for_smollm2_shapes(smollm2_shapes, capsys):
    # the study's matched pair, RaSA alpha 16 <-> LoRA alpha 9.5
    assert main([smollm2_shapes, "--ranks", "8", "--methods", "lora,rasa,prilora", "--alpha", "9.5", "--json"]) == 0
    lora, rasa, prilora = json.loads(capsys.readouterr().out)
    assert lora["alpha"] == 9.5 and lora["step_size"] is None
    assert prilora["alpha"] is None and prilora["step_size"] is None
    assert rasa["alpha"] == 9.5 and len(rasa["step_size"]) == 1
    step = rasa["step_size"][0]
    assert step["num_layers"] == 30
    assert round(step["vs_lora"], 3) == 0.594
    assert step["rasa_alpha_matching_lora"] == pytest.approx(16.0, rel=0.01)
    assert step["lora_alpha_matching_rasa"] == pytest.approx(9.5 * step["vs_lora"])


def test_k0_rows_take_half_loras_step(capsys):
    assert main(["llama-3.1-8b", "--ranks", "8", "--methods", "rasa", "--rasa-k", "0", "--alpha", "4"]) == 0
    out = capsys.readouterr().out
    assert _table_row(out, "rasa", 8)[6:8] == ["0.500", "8"] and "LoRA alpha 4 x step" in out


def test_mixtral_expert_rows_use_the_layers_of_their_pools(capsys):
    assert main(["mixtral-8x7b", "--ranks", "8", "--json"]) == 0
    rasa = [row for row in json.loads(capsys.readouterr().out) if row["method"] == "rasa"][0]
    assert [entry["num_layers"] for entry in rasa["step_size"]] == [32]


def test_pools_of_different_sizes_get_one_value_each():
    # projection types adapted on different numbers of layers (e.g. attention on every 4th layer only)
    from rasa_lora.params import ParamRow, _step_text, add_step_size
    from rasa_lora.step_size import step_ratio

    row = ParamRow(method="rasa", r=8, k=1, trainable=0,
                   effective_rank={"model.layers.*.self_attn.q_proj": 7 + 8, "model.layers.*.mlp.up_proj": 7 + 32})
    add_step_size(row, 8.0)
    assert [entry["num_layers"] for entry in row.step_size] == [8, 32]
    assert _step_text(row) == (f"{step_ratio(8, 1, 8):.3f}/{step_ratio(8, 1, 32):.3f}",
                               f"{8 / step_ratio(8, 1, 8):.3g}/{8 / step_ratio(8, 1, 32):.3g}")


@pytest.mark.parametrize("alpha", ["0", "-8", "inf", "nan"])
def test_alpha_must_be_positive(alpha, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["llama-3.1-8b", "--ranks", "8", "--alpha", alpha])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--alpha" in err and "must be positive" in err and len(err.strip().splitlines()) == 1


def test_the_example_in_docs_training_is_the_output(smollm2_shapes, capsys):
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = docs.split("## RaSA's alpha against LoRA's", 1)[1]
    block = section.split("```\n", 2)[1]
    command, *expected = block.strip().splitlines()
    argv = command.removeprefix("$ rasa-lora params ").split()
    assert argv[0] == "smollm2"
    assert main([smollm2_shapes, *argv[1:]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:1 + len(expected)] == expected
