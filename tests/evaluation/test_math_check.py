"""Answer extraction, the Minerva normalisation, both verdicts, and the MATH500 gold check."""

from __future__ import annotations

import pytest

from rasa_lora.evaluation.math_check import (
    answer_shape,
    extract_answer,
    judge,
    judge_many,
    last_boxed_content,
    normalize_final_answer,
)


def test_last_boxed_content_keeps_nested_braces():
    assert last_boxed_content(r"so $\boxed{\frac{1}{2}}$ and then \boxed{x^{2}}.") == "x^{2}"


def test_last_boxed_content_none_without_box():
    assert last_boxed_content("no box here") is None


@pytest.mark.parametrize("generation, expected", [
    ("Step 1... The answer is: 42", "42"),
    ("The answer is: 7\nThe answer is: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("We get \\boxed{\\sqrt{2}} in the end", "\\sqrt{2}"),
    ("I do not know", None),
])
def test_extract_answer(generation, expected):
    assert extract_answer(generation) == expected


@pytest.mark.parametrize("raw, normalised", [
    ("10\\text{ inches}", "10"),
    ("\\$1,000", "1000"),
    ("\\frac12", "\\frac{1}{2}"),
    ("x = 5", "5"),
    ("90^\\circ", "90"),
])
def test_minerva_normalisation(raw, normalised):
    assert normalize_final_answer(raw) == normalised


def test_equal_values_in_different_forms_are_correct_for_both():
    assert judge("\\frac{1}{2}", "0.5") == {"math_verify": True, "minerva": True}


def test_different_values_are_wrong_for_both():
    assert judge("3", "4") == {"math_verify": False, "minerva": False}


def test_missing_prediction_is_wrong():
    assert judge("3", None) == {"math_verify": False, "minerva": False}


def test_minerva_misjudges_identical_tuples_as_lm_eval_does():
    assert judge("(1,2)", "(1,2)") == {"math_verify": True, "minerva": False}


def test_answer_shape_groups_gold_answers():
    shapes = [answer_shape(a) for a in ["\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(2,\\infty)", "(6,31,-1)", "3"]]
    assert shapes == ["matrix", "interval", "tuple or list", "other"]


def test_math500_gold_answers_pass_math_verify(shared_data):
    from rasa_lora.evaluation.tasks import load_task

    items = load_task("math500", shared_data)
    verdicts = judge_many([(item["answer"], last_boxed_content(item["solution"])) for item in items])
    share = sum(v["math_verify"] for v in verdicts) / len(items)
    assert len(items) == 500 and share >= 0.99
