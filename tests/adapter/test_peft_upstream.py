"""Fetching PEFT's test suite: a clear reason when the package index cannot be reached, and a cache that is used."""

import sys

import pytest

from . import peft_upstream


def test_unreachable_index_raises_with_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("RASA_LORA_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(RuntimeError, match=r"pip download peft==0\.0\.0\.dev0"):
        peft_upstream.fetch_tests("0.0.0.dev0", timeout=120)
    assert not (tmp_path / "peft-tests" / "0.0.0.dev0" / "tests").exists()  # nothing half-written is kept


def test_import_skips_the_module_with_the_reason(monkeypatch):
    def unreachable(*args, **kwargs):
        raise RuntimeError("`pip download peft==1` failed: no route")

    monkeypatch.setattr(peft_upstream, "fetch_tests", unreachable)
    with pytest.raises(pytest.skip.Exception, match="could not be fetched from the package index.*no route"):
        peft_upstream.import_upstream("a_module_never_imported")


def test_a_complete_cache_is_used_without_the_index(tmp_path, monkeypatch):
    monkeypatch.setenv("RASA_LORA_CACHE", str(tmp_path))
    folder = tmp_path / "peft-tests" / "9.9.9" / "tests"
    folder.mkdir(parents=True)
    for name in peft_upstream.NEEDED:
        (folder / name).write_text("")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert peft_upstream.fetch_tests("9.9.9") == folder


def test_a_missing_dependency_of_peft_tests_skips_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(peft_upstream, "fetch_tests", lambda *a, **k: tmp_path)
    monkeypatch.setitem(sys.modules, peft_upstream.PACKAGE, sys.modules.get(peft_upstream.PACKAGE))

    def missing(name):
        raise ModuleNotFoundError("No module named 'datasets'", name="datasets")

    monkeypatch.setattr(peft_upstream.importlib, "import_module", missing)
    with pytest.raises(pytest.skip.Exception, match="needs 'datasets'.*pip install datasets"):
        peft_upstream.import_upstream("another_module_never_imported")
