"""Held-out loss during training: the split, the schedule, the value, the recipe keys."""

from __future__ import annotations

import json

import pytest
import torch

from rasa_lora.train import data
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import tiny_overrides


def _gsm8k_file(shared_data, tmp_path, count=40):
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:count]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_held_out_split_is_disjoint_and_the_same_for_every_seed(shared_data, tmp_path):
    path = _gsm8k_file(shared_data, tmp_path)
    splits = {}
    for seed in (1, 2):
        config = build_config({"dataset": str(path), "val_set_size": 0.25, "seed": seed, "dataset_fraction": 0.5})
        splits[seed] = data.load_splits(config)
    (train_1, held_1), (train_2, held_2) = splits[1], splits[2]
    assert len(held_1) == 10 and held_1 == held_2
    assert len(train_1) == len(train_2) == 15 and train_1 != train_2  # dataset_fraction's subset follows the seed
    held_prompts = {example.prompt for example in held_1}
    assert not held_prompts & {example.prompt for example in train_1 + train_2}
    counted = data.load_splits(build_config({"dataset": str(path), "val_set_size": 7}))
    assert (len(counted[0]), len(counted[1])) == (33, 7)


def test_held_out_loss_is_logged_each_epoch_and_equals_a_direct_computation(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    values = tiny_overrides(tiny_model_dir, out, max_steps=None, epochs=2, num_examples=16, val_set_size=4,
                            eval_batch_size=3, dropout=0.1)
    summary = train(build_config(values))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [0, 3, 6]  # 12 training examples, batch 4: 3 steps an epoch
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert evals[-1]["eval_examples"] == 4 and evals[0]["eval_loss"] != evals[-1]["eval_loss"]
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["best_eval_loss"] == min(row["eval_loss"] for row in evals)

    # The same number from the saved adapter, token by token, outside the trainer.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rasa_lora  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    _, held_out = data.load_splits(build_config(values))
    total, count = 0.0, 0
    with torch.no_grad():
        for item in data.tokenize_all(held_out, tokenizer, values["cutoff_len"]):
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != data.IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert evals[-1]["eval_tokens"] == count
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_eval_steps_sets_the_schedule(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(build_config(tiny_overrides(tiny_model_dir, out, max_steps=5, val_set_size=2, eval_steps=2)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval_loss" in row] == [0, 2, 4, 5]


@pytest.mark.parametrize("values, message", [
    ({"val_set_size": 0.1, "eval_dataset": "x.jsonl"}, "give one of them"),
    ({"val_set_size": -1}, "val_set_size=-1"),
    ({"val_set_size": 2.5}, "whole count"),
    ({"eval_steps": -1}, "eval_steps=-1"),
])
def test_bad_held_out_keys_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        build_config(values)


def test_holding_out_everything_is_refused(shared_data, tmp_path):
    path = _gsm8k_file(shared_data, tmp_path, count=5)
    with pytest.raises(ValueError, match="leaves no training example"):
        data.load_splits(build_config({"dataset": str(path), "val_set_size": 5}))
