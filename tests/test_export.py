"""`rasa-lora export-lora`: the exported LoRA gives the RaSA adapter's logits in a process that never imports rasa_lora.

Every case builds a tiny base (Llama with nn.Linear, GPT-2 with Conv1D), a RaSA adapter with random factors (B and
the pools included, so the update is far from zero), exports it, and loads base + LoRA in one subprocess whose
import system refuses `rasa_lora`, through `PeftModel.from_pretrained` and through transformers' `load_adapter`.
Tolerance: 1e-5 on float32 logits, the rounding of `B * D` and of the two orders of summation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import rasa_lora
from rasa_lora.export import VLLM_RANKS, export_lora, main, pad_rank, target_rank
from rasa_lora.models import tiny_llama

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# q_proj in all four layers, v_proj in two: two groups with different R (the export pads to the larger)
MIXED_TARGETS = r"model\.layers\.\d+\.self_attn\.q_proj|model\.layers\.[01]\.self_attn\.v_proj"

# name -> (architecture, layers, r, k, target_modules, pad_to)
CASES = {
    "llama-r8-k1-L4": ("llama", 4, 8, 1, LLAMA_PROJECTIONS, None),
    "llama-r4-k2-L3-pad16": ("llama", 3, 4, 2, LLAMA_PROJECTIONS, 16),
    "llama-r8-k1-L4-vllm": ("llama", 4, 8, 1, ["q_proj", "down_proj"], "vllm"),
    "llama-r3-k3-L2-all-shared": ("llama", 2, 3, 3, LLAMA_PROJECTIONS, None),
    "llama-r4-k0-L2-no-sharing": ("llama", 2, 4, 0, ["v_proj", "up_proj"], None),
    "llama-mixed-groups": ("llama", 4, 4, 1, MIXED_TARGETS, None),
    "gpt2-conv1d-r8-k1-L3": ("gpt2", 3, 8, 1, ["c_attn", "c_proj", "c_fc"], None),
    "gpt2-conv1d-r4-k1-L3-vllm": ("gpt2", 3, 4, 1, ["c_attn", "c_fc"], "vllm"),
}

LOADER = textwrap.dedent("""
    import json, sys, torch

    class RefuseRasa:  # the loading process must not need (or import) rasa_lora
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "rasa_lora":
                raise ImportError("rasa_lora is blocked in this process")
            return None

    sys.meta_path.insert(0, RefuseRasa())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    jobs = json.loads(open(sys.argv[1]).read())
    for job in jobs:
        ids = torch.load(job["ids"])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["lora"]).eval()
        with torch.no_grad():
            peft_logits = model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(job["base"]).eval()
        plain.load_adapter(job["lora"])
        with torch.no_grad():
            transformers_logits = plain(input_ids=ids).logits
        torch.save({"peft": peft_logits, "transformers": transformers_logits}, job["logits"])
    assert not any(name.split(".")[0] == "rasa_lora" for name in sys.modules)
    print("loaded", len(jobs))
""")


def tiny_gpt2(num_layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=num_layers, n_head=4,
                        tie_word_embeddings=False)
    return GPT2LMHeadModel(config).eval()


def randomize(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rasa_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def build_case(root: Path, name: str) -> dict:
    arch, layers, r, k, targets, pad_to = CASES[name]
    base = tiny_llama(num_layers=layers) if arch == "llama" else tiny_gpt2(layers)
    base_dir = root / name / "base"
    base.save_pretrained(base_dir)
    model = get_peft_model(base, rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=8, target_modules=targets))
    randomize(model)
    model.eval()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        rasa_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    model.save_pretrained(root / name / "rasa")
    summary = export_lora(root / name / "rasa", root / name / "lora", pad_to=pad_to)
    torch.save(ids, root / name / "ids.pt")
    return {"base": str(base_dir), "lora": str(root / name / "lora"), "ids": str(root / name / "ids.pt"),
            "logits": str(root / name / "logits.pt"), "rasa_logits": rasa_logits, "base_logits": base_logits,
            "summary": summary, "model": model}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case built and exported, then loaded by one subprocess that cannot import rasa_lora."""
    root = tmp_path_factory.mktemp("export")
    torch.set_num_threads(1)
    cases = {name: build_case(root, name) for name in CASES}
    jobs = [{key: case[key] for key in ("base", "lora", "ids", "logits")} for case in cases.values()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, "-c", LOADER, str(root / "jobs.json")], capture_output=True, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(root)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return cases


@pytest.mark.parametrize("name", list(CASES))
def test_exported_lora_gives_the_rasa_logits_without_rasa_lora(exported, name):
    case = exported[name]
    loaded = torch.load(case["logits"])
    assert (case["rasa_logits"] - case["base_logits"]).abs().max() > 1e-2  # the adapter changes the output
    for loader in ("peft", "transformers"):
        torch.testing.assert_close(loaded[loader], case["rasa_logits"], atol=1e-5, rtol=1e-5, msg=loader)


@pytest.mark.parametrize("name", list(CASES))
def test_exported_config_and_rank(exported, name):
    _, layers, r, k, _, pad_to = CASES[name]
    case = exported[name]
    config = json.loads(Path(case["lora"], "adapter_config.json").read_text())
    unpadded = r - k + layers * k
    expected_rank = {None: unpadded, "vllm": next(v for v in VLLM_RANKS if v >= unpadded)}.get(pad_to, pad_to)
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == expected_rank == case["summary"]["rank"]
    assert max(case["summary"]["unpadded_ranks"]) == unpadded
    assert config["fan_in_fan_out"] == name.startswith("gpt2")


def test_mixed_groups_are_padded_to_the_larger_rank(exported):
    ranks = exported["llama-mixed-groups"]["summary"]["unpadded_ranks"]
    assert ranks == [4 - 1 + 2 * 1, 4 - 1 + 4 * 1]  # v_proj in 2 layers, q_proj in 4


def test_file_size_is_the_factors(exported):
    """The exported file holds P * (a + b) float32 values per module, plus the safetensors header."""
    from safetensors import safe_open

    case = exported["llama-r8-k1-L4"]
    path = Path(case["lora"], "adapter_model.safetensors")
    with safe_open(str(path), "pt") as handle:
        values = sum(handle.get_tensor(key).numel() for key in handle.keys())
    rank, modules = case["summary"]["rank"], case["summary"]["modules"]
    assert modules == 4 * 7 and rank == 11
    # tiny_llama: q,o (32->32), k,v (32->16), gate,up (32->48), down (48->32): a + b summed over one layer = 464
    assert values == rank * 464 * 4
    assert values * 4 <= case["summary"]["bytes"] <= values * 4 + 16_000


def test_padding_is_exactly_zero(exported):
    from safetensors.torch import load_file

    state = load_file(str(Path(exported["llama-r4-k2-L3-pad16"]["lora"], "adapter_model.safetensors")))
    unpadded = 4 - 2 + 3 * 2
    for key, value in state.items():
        tail = value[unpadded:] if key.endswith("lora_A.weight") else value[:, unpadded:]
        assert value.shape[0 if key.endswith("lora_A.weight") else 1] == 16
        assert torch.count_nonzero(tail) == 0


def test_dtype_writes_the_serving_dtype(exported, tmp_path):
    from safetensors.torch import load_file

    rasa_dir = Path(exported["llama-r8-k1-L4"]["lora"]).parent / "rasa"
    summary = export_lora(rasa_dir, tmp_path / "bf16", dtype="bfloat16")
    state = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {value.dtype for value in state.values()} == {torch.bfloat16}
    assert summary["bytes"] < 0.6 * exported["llama-r8-k1-L4"]["summary"]["bytes"]


def test_peft_convert_to_lora_accepts_rasa(exported):
    """PEFT's own converter (SVD of each dW_i) works on a RaSA model; at rank R it reproduces the logits."""
    from peft import convert_to_lora, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    case = exported["llama-r8-k1-L4"]
    model = case["model"]
    lora_config, state = convert_to_lora(model, rank=11)
    lora_model = get_peft_model(AutoModelForCausalLM.from_pretrained(case["base"]), lora_config).eval()
    result = set_peft_model_state_dict(lora_model, state)
    assert not [key for key in result.missing_keys if "lora_" in key]
    with torch.no_grad():
        logits = lora_model(input_ids=torch.load(case["ids"])).logits
    torch.testing.assert_close(logits, case["rasa_logits"], atol=1e-5, rtol=1e-5)


def test_target_rank():
    assert target_rank(39, None) == 39
    assert target_rank(39, "vllm") == 64
    assert target_rank(300, "vllm") == 320
    assert target_rank(39, "48") == 48
    with pytest.raises(ValueError, match="below the adapter's rank R=39"):
        target_rank(39, 32)
    with pytest.raises(ValueError, match="serve the merged model"):
        target_rank(600, "vllm")


def test_pad_rank_keeps_the_product():
    A, B = torch.randn(5, 7), torch.randn(6, 5)
    A2, B2 = pad_rank(A, B, 8)
    assert A2.shape == (8, 7) and B2.shape == (6, 8)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=0, rtol=0)


def test_cli_prints_rank_and_size(exported, tmp_path, capsys):
    rasa_dir = Path(exported["llama-r8-k1-L4"]["lora"]).parent / "rasa"
    assert main([str(rasa_dir), str(tmp_path / "out"), "--pad-to", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert "rank 16 on 28 modules" in printed and "R = 11" in printed and " MB" in printed


def test_cli_refuses_bad_input(exported, tmp_path, capsys):
    rasa_dir = Path(exported["llama-r8-k1-L4"]["lora"]).parent / "rasa"
    lora_dir = exported["llama-r8-k1-L4"]["lora"]
    assert main([str(tmp_path), str(tmp_path / "a")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert main([lora_dir, str(tmp_path / "b")]) == 2
    assert "is a LORA adapter, not RaSA" in capsys.readouterr().err
    assert main([str(rasa_dir), lora_dir]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(rasa_dir), str(tmp_path / "c"), "--pad-to", "4"]) == 2
    assert "below the adapter's rank R=11" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _adapter_with_modules_to_save(root: Path):
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = get_peft_model(base, rasa_lora.RasaConfig(r=4, rasa_k=1, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["lm_head"]))
    randomize(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5)  # the trained copy differs from the base's lm_head
    return model.eval()


def test_modules_to_save_are_carried_into_the_export(tmp_path):
    from peft import PeftModel

    model = _adapter_with_modules_to_save(tmp_path)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "rasa")
    export_lora(tmp_path / "rasa", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_save_as_lora_round_trip(tmp_path):
    """PEFT's `save_as_lora` on a RaSA model, reloaded by PEFT: exact at rank R = 4 - 1 + 4 = 7."""
    from peft import PeftModel, save_as_lora

    model = _adapter_with_modules_to_save(tmp_path)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_as_lora(tmp_path / "svd", model, rank=7)
    lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "svd")).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_command_table_runs_export_lora(exported, tmp_path):
    from rasa_lora.cli import main as cli_main

    rasa_dir = Path(exported["gpt2-conv1d-r8-k1-L3"]["lora"]).parent / "rasa"
    assert cli_main(["export-lora", str(rasa_dir), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
