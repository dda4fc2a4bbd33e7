"""Fixtures of the evaluation tests: HumanEval+ tasks and their canonical timings, computed once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def humanevalplus(shared_data):
    from rasa_lora.evaluation.tasks import load_task

    return {task["id"]: task for task in load_task("humaneval+", shared_data)}


@pytest.fixture(scope="session")
def truth_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("humanevalplus-truth")
