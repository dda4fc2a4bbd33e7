"""Readers, rewriting, the Alpaca prompt, response-only labels and length-grouped batches."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rasa_lora.train import data


def _config(**values):
    base = {"dataset": None, "dataset_format": "auto", "dataset_split": "train", "dataset_fraction": 1.0,
            "num_examples": 10, "seed": 0, "arithmetic_steps": 2, "arithmetic_max_value": 20}
    return SimpleNamespace(**{**base, **values})


def test_gsm8k_known_row_is_rewritten(shared_data):
    config = _config(dataset=str(shared_data / "gsm8k" / "train.jsonl"))
    first = data.load_examples(config)[0]
    assert first.response == ("Natalia sold 48/2 = 24 clips in May.\n"
                              "Natalia sold 48+24 = 72 clips altogether in April and May.\nThe answer is: 72")
    assert first.prompt.startswith("Below is an instruction that describes a task.")
    assert first.prompt.endswith("### Instruction:\nNatalia sold clips to 48 of her friends in April, and then she "
                                 "sold half as many clips in May. How many clips did Natalia sell altogether in "
                                 "April and May?\n\n### Response:\n")


def test_math_known_row_ends_with_its_boxed_answer(shared_data):
    examples = data.load_examples(_config(dataset=str(shared_data / "math" / "MATH_train.jsonl")))
    assert len(examples) == 7500
    assert examples[0].response.endswith("So $a+b=-3+3=\\boxed{0}$.\nThe answer is: 0")


def test_last_boxed_matches_nested_braces():
    assert data.last_boxed("so \\boxed{1} and then $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert data.last_boxed("$\\boxed 5$") == "5"
    assert data.last_boxed("no answer") is None


def test_prompt_tokens_carry_label_minus_100(shared_data, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = data.load_examples(_config(dataset=str(shared_data / "gsm8k" / "test.jsonl")))[0]
    item = data.tokenize(example, tokenizer, cutoff_len=4096)
    prompt_length = len(tokenizer(example.prompt)["input_ids"])
    assert set(item["labels"][:prompt_length]) == {-100}
    assert item["labels"][prompt_length:] == item["input_ids"][prompt_length:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(item["input_ids"][prompt_length:-1]).endswith("The answer is: 18")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", \n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: malformed JSON"):
        data.load_examples(_config(dataset=str(path)))


def test_missing_field_names_the_field_and_line(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "q", "answer": "x\\n#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"gsm.jsonl line 2: field\(s\) answer missing"):
        data.load_examples(_config(dataset=str(path), dataset_format="gsm8k"))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        data.load_examples(_config(dataset=str(path)))


def test_formats_are_detected_from_fields(tmp_path):
    rows = [{"query": "q", "response": "r"}, {"instruction": "i", "response": "r"},
            {"instruction": "i", "input": "x", "output": "o"}, {"prompt": "p", "completion": "c"}]
    found = []
    for index, row in enumerate(rows):
        path = tmp_path / f"{index}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        found.append(data.load_examples(_config(dataset=str(path)))[0])
    assert [example.response for example in found] == ["r", "r", "o", "c"]
    assert "### Input:\nx\n\n### Response:\n" in found[2].prompt and found[3].prompt == "p"


def test_arithmetic_answers_are_right_and_seeded():
    problems = data.arithmetic_problems(50, seed=3)
    assert problems == data.arithmetic_problems(50, seed=3) != data.arithmetic_problems(50, seed=4)
    for problem in problems:
        *steps, final = problem["output"].splitlines()
        for step in steps[1:]:
            left, right = step.split(", so ")[1].split(" = ")
            assert eval(left) == int(right.split()[0])  # noqa: S307 - our own generated "a + b" text
        assert final == f"The answer is: {problem['answer']}"


def test_fraction_keeps_a_seeded_subset():
    examples = data.load_examples(_config(num_examples=40, dataset_fraction=0.25))
    assert len(examples) == 10
    assert examples == data.load_examples(_config(num_examples=40, dataset_fraction=0.25))


def test_step_batches_cover_the_epoch_and_group_by_length():
    lengths = [5, 50, 7, 40, 9, 30, 11, 20, 13, 60]
    plan = data.step_batches(lengths, global_batch_size=4, micro_batch_size=2, seed=0, epoch=0, group_by_length=True)
    flat = [index for step in plan for micro in step for index in micro]
    assert sorted(flat) == list(range(10)) and [len(step) for step in plan] == [2, 2, 1]
    for step in plan:
        step_lengths = [lengths[index] for micro in step for index in micro]
        assert step_lengths == sorted(step_lengths, reverse=True)
    other = data.step_batches(lengths, 4, 2, seed=0, epoch=1, group_by_length=True)
    assert plan != other
