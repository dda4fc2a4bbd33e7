"""Adapters that travel: a truncated weights file is named in one line by every command that loads it, and the
merged model's folder gets ordinary permissions (mkdtemp's 0700 made it unreadable to everyone else)."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from rasa_lora import cli
from rasa_lora.models import AdapterFileError, check_adapter_files
from tests.train.test_merge import trained_adapter  # noqa: F401  (module fixture)


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def test_the_merged_folder_has_ordinary_permissions(tiny_model_dir, trained_adapter, tmp_path):  # noqa: F811
    out = tmp_path / "merged"
    assert cli.main(["merge", str(tiny_model_dir), str(trained_adapter), str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == _umask_mode() != 0o700


@pytest.fixture
def truncated_adapter(trained_adapter, tmp_path):  # noqa: F811
    copy = tmp_path / "truncated"
    shutil.copytree(trained_adapter, copy)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy


def test_a_truncated_adapter_is_named(truncated_adapter):
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is unreadable .* truncated"):
        check_adapter_files(truncated_adapter)
    (truncated_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is missing"):
        check_adapter_files(truncated_adapter)


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_every_command_names_the_truncated_file_in_one_line(command, truncated_adapter, tiny_model_dir, tmp_path,
                                                            capsys, shared_data):
    argv = {"merge": ["merge", str(tiny_model_dir), str(truncated_adapter), str(tmp_path / "out")],
            "eval": ["eval", "gsm8k", "--model", str(tiny_model_dir), "--adapter", str(truncated_adapter),
                     "--data-dir", str(shared_data), "--limit", "1", "--output-dir", str(tmp_path / "out")]}[command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(truncated_adapter / "adapter_model.safetensors") in err, err
    assert not (tmp_path / "out").exists()


def test_a_fresh_process_merges_a_rasa_adapter(tiny_model_dir, trained_adapter, tmp_path):  # noqa: F811
    # `import rasa_lora` is lazy: RaSA must still be registered when transformers, then PEFT, load in a new process
    import subprocess
    import sys

    from tests.train.test_trainer import _subprocess_env

    result = subprocess.run([sys.executable, "-m", "rasa_lora", "merge", str(tiny_model_dir), str(trained_adapter),
                             str(tmp_path / "merged")], capture_output=True, text=True, env=_subprocess_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "config.json").is_file()
