"""No script or test module shadows an installed distribution's import name.

`benchmarks/` and the folders under `tests/` land first on `sys.path` when a script runs from them (or when pytest
inserts a test's root dir), so a module there named like an installed package replaces that package for every
import in the process: `benchmarks/kernels.py` once broke transformers, which imports the `kernels` package.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("benchmarks", "tests")


def _module_names(folder: Path) -> dict[str, Path]:
    """Top-level import names a folder offers when it is on `sys.path`, in it and in each folder below it."""
    names: dict[str, Path] = {}
    for path in folder.rglob("*"):
        if "__pycache__" in path.parts or any(part.startswith(".") for part in path.relative_to(REPO).parts):
            continue
        if path.is_file() and path.suffix == ".py" and path.stem != "__init__":
            names.setdefault(path.stem, path)
        elif path.is_dir() and (path / "__init__.py").is_file():
            names.setdefault(path.name, path)
    return names


def _installed_import_names() -> set[str]:
    names = set(importlib.metadata.packages_distributions())
    names.update(sys.stdlib_module_names)
    return names


def test_no_module_under_benchmarks_or_tests_shadows_an_installed_package():
    installed = _installed_import_names()
    clashes = [
        f"{path.relative_to(REPO)} (shadows the installed `{name}`)"
        for top in SCRIPT_FOLDERS
        for name, path in _module_names(REPO / top).items()
        if name in installed
    ]
    assert not clashes, "rename these modules: " + ", ".join(sorted(clashes))


def test_the_check_sees_a_clash(tmp_path, monkeypatch):
    """The walk finds a module named like an installed distribution's import name (here `yaml`, which the package
    depends on)."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "yaml.py").write_text("")
    assert "yaml" in _module_names(tmp_path / "benchmarks")
    assert "yaml" in _installed_import_names()
