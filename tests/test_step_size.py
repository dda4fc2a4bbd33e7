"""`rasa_lora.step_size`: the size of one LionW step on dW_i, LoRA against RaSA's eq. 6 init, and matched alphas.

Checked three ways: against the numbers of docs/replication.md, against `benchmarks/update_size.py`'s measurement on
SmolLM2 (committed JSON), and against one real LionW step on a tiny Llama with this package's layers and PEFT's LoRA.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rasa_lora.step_size import matched_alpha, step_ratio, update_scale

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_numbers():
    # docs/replication.md: SmolLM2 (L = 30), r = 8, k = 1: sqrt(7 * 0.571^2 + 30 * 0.133^2) / sqrt(8) = 0.594
    assert step_ratio(8, 1, 30) == pytest.approx(math.sqrt(7 * (8 / 14) ** 2 + 30 * (8 / 60) ** 2) / math.sqrt(8))
    assert round(step_ratio(8, 1, 30), 3) == 0.594
    # RaSA alpha 16 and LoRA alpha 9.5 take the same step (the matched runs of the study), both ways, within 1%
    assert matched_alpha("rasa", 8, 16.0, 1, 30) == pytest.approx(9.5, rel=0.01)
    assert matched_alpha("lora", 8, 9.5, 1, 30) == pytest.approx(16.0, rel=0.01)
    # "a RaSA that starts at LoRA's step size needs ... alpha ~13.5 instead of 8"
    assert matched_alpha("lora", 8, 8.0, 1, 30) == pytest.approx(13.5, abs=0.05)
    # Llama-3.1-8B, L = 32, the paper's own setting: sqrt(7 (8/14)^2 + 32 (8/64)^2) / sqrt(8) = 0.590
    assert step_ratio(8, 1, 32) == pytest.approx(math.sqrt(7 * (8 / 14) ** 2 + 32 * (8 / 64) ** 2) / math.sqrt(8))
    assert round(step_ratio(8, 1, 32), 3) == 0.590


def test_scales_are_the_rule_written_out():
    assert update_scale("lora", 8, 8.0) == pytest.approx(8 / math.sqrt(8))
    assert update_scale("lora", 32, 16.0) == pytest.approx(16 / math.sqrt(32))
    assert update_scale("rasa", 32, 8.0, 4, 30) == pytest.approx(4 * math.sqrt(1 / 28 + 1 / 120))
    # alpha cancels in the ratio, and the step is linear in alpha
    ratio = update_scale("rasa", 16, 32.0, 2, 32) / update_scale("lora", 16, 32.0)
    assert ratio == pytest.approx(step_ratio(16, 2, 32))
    assert update_scale("rasa", 8, 24.0, 1, 30) == pytest.approx(3 * update_scale("rasa", 8, 8.0, 1, 30))


def test_default_k_is_the_papers():
    from rasa_lora.adapter import default_rasa_k

    for r in (1, 4, 8, 15, 16, 32, 64):
        assert step_ratio(r, None, 30) == step_ratio(r, default_rasa_k(r), 30), r


def test_edge_cases():
    # k = 0: no pool, eq. 6's alpha/(2r) on every rank: half LoRA's step whatever L (none needed)
    assert step_ratio(8, 0) == pytest.approx(0.5)
    assert step_ratio(8, 0, 1) == step_ratio(8, 0, 1000) == step_ratio(8, 0)
    assert matched_alpha("lora", 8, 8.0, 0) == pytest.approx(16.0)
    # k = r: no private ranks, only the pool's L*r ranks at alpha/(2Lr)
    assert step_ratio(8, 8, 30) == pytest.approx(0.5 * math.sqrt(8 / (30 * 8)))
    # r = 1, k = 1, one layer: one rank at alpha/2, half LoRA's alpha/1
    assert step_ratio(1, 1, 1) == pytest.approx(0.5)
    # more layers in the pool: a smaller step, towards k = 0's ... but never below the private ranks' share
    ratios = [step_ratio(8, 1, layers) for layers in (1, 2, 8, 30, 80, 10_000)]
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[-1] > 0.5 * math.sqrt(8 / 7)
    # the matched alphas invert each other
    for r, k, layers in ((8, 1, 30), (32, 4, 80), (16, 0, 1), (4, 4, 3)):
        assert matched_alpha("rasa", r, matched_alpha("lora", r, 8.0, k, layers), k, layers) == pytest.approx(8.0)


def test_integers_of_other_types_are_accepted():
    np = pytest.importorskip("numpy")
    assert step_ratio(np.int64(8), np.int32(1), np.int64(30)) == step_ratio(8, 1, 30)


@pytest.mark.parametrize("call,match", [
    (lambda: update_scale("mora", 8, 8.0), "no update-size rule"),
    (lambda: update_scale("lora", 0, 8.0), "r=0"),
    (lambda: update_scale("lora", 8.0, 8.0), "r=8.0"),
    (lambda: update_scale("lora", 8, 0.0), "alpha=0.0"),
    (lambda: update_scale("rasa", 8, -1.0, 1, 30), "alpha=-1.0"),
    (lambda: update_scale("lora", 8, float("inf")), "alpha=inf"),
    (lambda: update_scale("lora", 8, float("nan")), "alpha=nan"),
    (lambda: update_scale("lora", True, 8.0), "r=True"),
    (lambda: update_scale("rasa", 8, 8.0, 1, 30.0), "num_layers=30.0"),
    (lambda: update_scale("lora", 8, 8.0, 1), "LoRA has none"),
    (lambda: update_scale("rasa", 8, 8.0, 9, 30), "k=9"),
    (lambda: update_scale("rasa", 8, 8.0, -1, 30), "k=-1"),
    (lambda: update_scale("rasa", 8, 8.0, 1), "num_layers=None"),
    (lambda: update_scale("rasa", 8, 8.0, 1, 0), "num_layers=0"),
    (lambda: step_ratio(8, 1), "num_layers"),
    (lambda: matched_alpha("dora", 8, 8.0, 1, 30), "no update-size rule"),
    (lambda: matched_alpha("lora", 8, 0.0, 1, 30), "alpha=0.0"),
])
def test_bad_arguments_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def measured_first_step_ratios() -> dict[str, tuple[float, list[float]]]:
    """benchmarks/update_size.py trained LoRA alpha 8, RaSA alpha 8 and RaSA alpha 16 (r = 8, k = 1) on SmolLM2
    (30 layers) with the same batches and measured ||dW|| after the first LionW step, per projection type:
    {RaSA run: (its alpha, its step over LoRA alpha 8's per projection type)} from the committed JSON."""
    measured = json.loads((REPO / "benchmarks" / "results" / "replication" / "update_size.json").read_text())
    results = measured["results"]
    lora = results["lora"]["history"][0]["delta_norm"]
    ratios = {}
    for name, alpha in (("rasa", 8.0), ("rasa-a16", 16.0)):
        step = results[name]["history"][0]["delta_norm"]
        ratios[name] = (alpha, [step[kind] / lora[kind] for kind in lora])
    return ratios


def test_the_rule_agrees_with_the_measured_update_size():
    for name, (alpha, ratios) in measured_first_step_ratios().items():
        predicted = update_scale("rasa", 8, alpha, 1, 30) / update_scale("lora", 8, 8.0)
        assert min(ratios) - 0.01 <= predicted <= max(ratios) + 0.01, (name, predicted, ratios)


def _first_step_norms(method: str, r: int, k: int | None, alpha: float, layers: int) -> dict[str, float]:
    """||dW_i|| after one decoupled-LionW step from init, mean over the layers, per projection type."""
    import torch
    from peft import LoraConfig, get_peft_model

    import rasa_lora
    from rasa_lora.models import LLAMA_PROJECTIONS, tiny_llama
    from rasa_lora.train.optim import DecoupledLionW

    model = tiny_llama(num_layers=layers, hidden_size=384, intermediate_size=448, seed=1)
    if method == "lora":
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LLAMA_PROJECTIONS))
    else:
        config = rasa_lora.RasaConfig(r=r, rasa_k=k, rasa_alpha=alpha, target_modules=list(LLAMA_PROJECTIONS))
    torch.manual_seed(2)
    model = get_peft_model(model, config)
    optimizer = DecoupledLionW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    tokens = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(3))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    norms: dict[str, list[float]] = {}
    for path, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and path.split(".")[-1] in LLAMA_PROJECTIONS:
            norms.setdefault(path.split(".")[-1], []).append(float(module.get_delta_weight("default").detach().norm()))
    return {kind: sum(values) / len(values) for kind, values in norms.items()}


@pytest.mark.parametrize("k", [0, 1, 2, 8])
def test_the_rule_predicts_one_real_lionw_step(k):
    # B starts at zero, so the first step moves B only (by +-lr per entry); the rule's rank scales set ||dW||
    layers = 6
    lora = _first_step_norms("lora", 8, None, 8.0, layers)
    rasa = _first_step_norms("rasa", 8, k, 8.0, layers)
    assert set(rasa) == set(lora) and len(lora) == 7
    for kind in lora:
        measured, rule = rasa[kind] / lora[kind], step_ratio(8, k, layers)
        if k < 8:
            assert measured == pytest.approx(rule, rel=0.03), kind
        else:  # 48 pooled ranks against an input width of 384: rows of A far from orthogonal, the step a little larger
            assert rule < measured < 1.08 * rule, kind


def test_import_stays_light():
    code = "import sys, rasa_lora.step_size; print('torch' in sys.modules or 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
