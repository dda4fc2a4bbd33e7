"""PEFT's own test modules, fetched at test time from the source distribution of the installed PEFT version.

The files are never copied into this repository: `pip download` fetches the sdist from the package index the
user's pip is configured with, its `tests/` folder is extracted (atomically) into
`$RASA_LORA_CACHE/peft-tests/<version>/` (default `~/.cache/rasa_lora`) and imported as the package
`peft_upstream_tests`, so their relative imports work and the name cannot clash with this repository's `tests`.
When the index cannot be reached the calling test module is skipped, with the reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest

PACKAGE = "peft_upstream_tests"
NEEDED = ("testing_common.py", "testing_utils.py", "test_custom_models.py")


def cache_root() -> Path:
    return Path(os.environ.get("RASA_LORA_CACHE", Path.home() / ".cache" / "rasa_lora")) / "peft-tests"


def peft_version() -> str:
    return importlib.metadata.version("peft")


def fetch_tests(version: str | None = None, timeout: float = 240.0) -> Path:
    """The folder holding PEFT's `tests/` for `version` (default: the installed one), fetched on first use.

    Raises RuntimeError, naming the cause, when the sdist cannot be downloaded."""
    version = version or peft_version()
    target = cache_root() / version / "tests"
    if all((target / name).is_file() for name in NEEDED):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", f"peft=={version}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`pip download peft=={version}` did not finish in {timeout:.0f} s") from None
        archives = sorted(Path(tmp).glob(f"peft-{version}.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`pip download peft=={version}` failed: {last}")
        staged = Path(tmp) / "tests"
        prefix = f"peft-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and "/" not in m.name[len(prefix):]]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
            for member in members:
                member.name = member.name[len(prefix):]
                archive.extract(member, staged, **safe)
        if not all((staged / name).is_file() for name in NEEDED):
            raise RuntimeError(f"peft-{version}.tar.gz has no tests/{'/'.join(NEEDED)}")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staged, target)
        except OSError:  # another process put a copy there meanwhile
            if not all((target / name).is_file() for name in NEEDED):
                raise
    return target


def _diffusers_stub() -> types.ModuleType | None:
    """`testing_common` imports diffusers' StableDiffusionPipeline for tests that are not run here. When diffusers is
    not installed, a stub stands in during that import only (and is removed right after)."""
    if importlib.util.find_spec("diffusers") is not None:
        return None
    stub = types.ModuleType("diffusers")
    stub.StableDiffusionPipeline = None
    return stub


def import_upstream(module: str = "test_custom_models"):
    """Import `module` from PEFT's tests (fetching them first); skip the calling test module when that fails."""
    if f"{PACKAGE}.{module}" in sys.modules:
        return sys.modules[f"{PACKAGE}.{module}"]
    try:
        folder = fetch_tests()
    except RuntimeError as error:
        pytest.skip(f"PEFT's test suite could not be fetched from the package index ({error})",
                    allow_module_level=True)
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    stub = _diffusers_stub()
    if stub is not None:
        sys.modules["diffusers"] = stub
    try:
        return importlib.import_module(f"{PACKAGE}.{module}")
    except ModuleNotFoundError as error:  # PEFT's test helpers import packages of its own dev set (e.g. datasets)
        pytest.skip(f"PEFT's test suite needs {error.name!r}, which is not installed (pip install {error.name})",
                    allow_module_level=True)
    finally:
        if stub is not None and sys.modules.get("diffusers") is stub:
            del sys.modules["diffusers"]
