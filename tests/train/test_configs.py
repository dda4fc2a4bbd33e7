"""Every YAML under configs/ loads and trains one step on a tiny random stand-in model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rasa_lora.train.config import load_config
from rasa_lora.train.trainer import train

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# Training recipes open with the `rasa-lora train` command; configs/distributed/ holds accelerate launcher files.
CONFIGS = sorted(path for path in CONFIGS_DIR.rglob("*.yaml") if path.read_text().startswith("# rasa-lora train "))
ROWS = {
    "metamathqa": {"query": "What is 2 + 3?", "response": "2 + 3 = 5.\nThe answer is: 5"},
    "magicoder": {"instruction": "Write a function f returning 1.", "response": "def f():\n    return 1"},
    "gsm8k": {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    "math": {"problem": "What is $2 + 3$?", "solution": "It is $\\boxed{5}$."},
    "alpaca": {"instruction": "Say hi.", "input": "", "output": "hi"},
    "completion": {"prompt": "Say hi: ", "completion": "hi"},
}


def test_every_yaml_outside_distributed_is_a_recipe():
    others = [path for path in CONFIGS_DIR.rglob("*.yaml") if path not in CONFIGS]
    assert [path for path in others if path.parent.name != "distributed"] == []


def test_there_are_paper_configs_for_both_models_and_tasks():
    names = {path.stem for path in CONFIGS}
    for model in ("llama3.1-8b", "mistral-7b"):
        for task in ("math", "code"):
            expected = {f"{model}-{task}-{m}-r{r}" for m in ("lora", "rasa") for r in (8, 16, 32)}
            assert expected | {f"{model}-{task}-vera-r1024"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_opens_with_its_command_and_dry_runs_one_step(path, tiny_model_dir, tmp_path, request):
    assert path.read_text().splitlines()[0] == f"# rasa-lora train configs/{path.relative_to(CONFIGS_DIR).as_posix()}"
    recipe = yaml.safe_load(path.read_text())
    if recipe.get("base_quantization", "none") != "none":
        pytest.importorskip("bitsandbytes", reason="a 4-bit recipe needs bitsandbytes (the quant extra)")
    # a recipe adapting expert stacks runs on a tiny Mixtral (its experts are 3-D parameters), others on a tiny Llama
    model_dir = request.getfixturevalue("tiny_mixtral_dir") if recipe.get("target_parameters") else tiny_model_dir
    overrides = {"base_model": str(model_dir), "output_dir": str(tmp_path / "run"), "max_steps": 1,
                 "progress_bar": False}
    if recipe.get("dataset"):
        dataset = tmp_path / "data.jsonl"
        dataset.write_text("".join(json.dumps(ROWS[recipe["dataset_format"]]) + "\n" for _ in range(4)))
        overrides["dataset"] = str(dataset)
        if recipe.get("val_set_size"):
            overrides["val_set_size"] = 1  # of the 4 rows
    else:
        overrides["num_examples"] = 8
    config = load_config(path, overrides)
    summary = train(config)
    assert summary["steps"] == 1 and summary["method"] == recipe["method"]
    assert summary["trainable_params"] > 0


def test_figure_6_recipes_are_r4_two_epochs_math_and_name_their_multinode_launch():
    for model in ("llama3.1-70b", "mixtral-8x7b"):
        for method in ("lora", "rasa"):
            path = CONFIGS_DIR / "paper" / f"{model}-math-{method}-r4.yaml"
            recipe = yaml.safe_load(path.read_text())
            assert (recipe["method"], recipe["r"], recipe["epochs"], recipe["dataset_format"]) == \
                (method, 4, 2, "metamathqa")
            assert recipe.get("rasa_k", 1) == 1 and recipe["global_batch_size"] == 192
            assert "configs/distributed/multinode-zero3-offload.yaml" in path.read_text()
            experts = recipe.get("target_parameters", [])
            assert experts == (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if "mixtral" in model else [])


def test_the_one_gpu_70b_recipe_is_the_paper_run_on_a_4bit_base():
    paper = yaml.safe_load((CONFIGS_DIR / "paper" / "llama3.1-70b-math-rasa-r4.yaml").read_text())
    qrasa = yaml.safe_load((CONFIGS_DIR / "qrasa" / "llama3.1-70b-math-rasa-r4-nf4.yaml").read_text())
    differ = {key for key in paper.keys() | qrasa.keys() if paper.get(key) != qrasa.get(key)}
    assert differ == {"base_quantization", "output_dir", "save_steps"} and qrasa["base_quantization"] == "nf4"


def test_demo_yaml_is_the_demo_recipe():
    from rasa_lora.demo import DEMO_RECIPE

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "demo.yaml").read_text())
    assert {key: recipe[key] for key in DEMO_RECIPE} == DEMO_RECIPE
