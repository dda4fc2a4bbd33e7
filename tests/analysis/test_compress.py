"""`compress`: the saved RaSA adapter reproduces the fitted factors and loads with PeftModel.from_pretrained."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.analysis.compress import compress
from rasa_lora.analysis.sources import checkpoint_groups
from rasa_lora.models import tiny_llama


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    tiny_llama(num_layers=4, seed=0).save_pretrained(root / "base")
    tuned = tiny_llama(num_layers=4, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if parameter.ndim == 2 and ".layers." in name:
                parameter += 0.05 * torch.randn(parameter.shape, generator=generator)
    tuned.save_pretrained(root / "tuned")
    summary = compress(str(root / "base"), str(root / "tuned"), root / "adapter", r=4, k=1, iters=10)
    return root, summary


def test_saved_adapter_reproduces_the_fit(compressed):
    root, summary = compressed
    assert summary["adapter_vs_fit_max_relative_difference"] < 1e-5


def test_rasa_fit_is_no_worse_than_lora(compressed):
    _, summary = compressed
    assert summary["rasa_relative_error"] <= summary["lora_relative_error"] * (1 + 1e-6)
    for group in summary["groups"].values():
        assert group["rasa_relative_error"] <= group["lora_relative_error"] * (1 + 1e-6)


def test_loaded_adapter_delta_matches_reported_error(compressed):
    from peft import PeftModel

    import rasa_lora  # noqa: F401

    root, summary = compressed
    model = PeftModel.from_pretrained(tiny_llama(num_layers=4, seed=0), str(root / "adapter"))
    groups = {g.name: g for g in checkpoint_groups(root / "base", root / "tuned")}
    name = "model.layers.*.mlp.gate_proj"
    error = total = 0.0
    for i, module in enumerate(groups[name].modules):
        layer = model.base_model.model.get_submodule(module)
        delta = layer.get_delta_weight("default").float()
        error += float((groups[name].deltas[i] - delta).double().square().sum())
        total += float(groups[name].deltas[i].double().square().sum())
    assert error / total == pytest.approx(summary["groups"][name]["rasa_relative_error"], rel=1e-4)


def test_compress_uses_the_analysis_start_and_criterion(pair, tmp_path):
    """Issue 29: `compress` fits each group exactly as `analyze` does (same default start and criterion)."""
    import json

    from rasa_lora.analysis.cli import analyze_main
    from rasa_lora.analysis.reconstruction import DEFAULT_TOL

    base, tuned = pair
    summary = compress(str(base), str(tuned), tmp_path / "adapter", r=8, k=1, iters=25,
                       targets=["k_proj", "up_proj"])
    assert analyze_main([str(base), str(tuned), "--targets", "k_proj,up_proj", "--iters", "25", "--k-sweep", "none",
                         "--out", str(tmp_path / "analysis")]) == 0
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["groups"]
    assert summary["init"] == "auto" and summary["tol"] == DEFAULT_TOL
    assert set(summary["groups"]) == set(analysis)
    for name, group in summary["groups"].items():
        assert group["rasa_start"] == analysis[name]["rasa_start"]
        assert group["iterations"] == analysis[name]["iterations"] and group["converged"] == analysis[name]["converged"]
        assert group["rasa_relative_error"] == pytest.approx(analysis[name]["rasa_relative_error"], rel=1e-6)
        assert group["rasa_relative_error"] < group["lora_relative_error"]


def test_compress_command_takes_the_fit_options_and_prints_the_start(pair, tmp_path, capsys):
    from rasa_lora.analysis.cli import compress_main

    base, tuned = pair
    code = compress_main([str(base), str(tuned), "--rasa-k", "1", "--targets", "k_proj", "--iters", "3",
                          "--tol", "0", "--init", "stacked", "--restarts", "2", "--out", str(tmp_path / "a")])
    assert code == 0
    out = capsys.readouterr().out
    assert "model.layers.*.self_attn.k_proj" in out and "3*" in out  # 3 iterations, limit reached
    import json

    summary = json.loads((tmp_path / "a" / "compress.json").read_text())
    assert summary["init"] == "stacked" and summary["restarts"] == 2 and summary["tol"] == 0
    assert summary["groups"]["model.layers.*.self_attn.k_proj"]["rasa_start"] in ("stacked", "random")
    assert compress_main([str(base), str(tuned), "--restarts", "0", "--out", str(tmp_path / "b")]) == 2
    assert "restarts=0" in capsys.readouterr().err
