"""The `rasa-lora` command itself: lazy imports, thread choice, one-line errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rasa_lora import cli

SRC = Path(__file__).resolve().parents[1] / "src"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(SRC), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


# --- lazy imports ----------------------------------------------------------------------------------------------------
HEAVY = ("torch", "transformers", "peft")


@pytest.mark.parametrize("argv", [["--help"], [], ["train", "--help"], ["eval", "--help"], ["merge", "--help"],
                                  ["params", "--help"], ["demo", "--help"], ["reproduce", "--help"],
                                  ["compare", "--help"], ["analyze", "--help"], ["compress", "--help"],
                                  ["nosuchcommand"], ["params", "--ranks", "0"]])
def test_help_and_argument_errors_import_no_torch(argv):
    code = ("import sys, contextlib, io, json\nfrom rasa_lora.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    try: main({argv!r})\n    except SystemExit: pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_help_answers_in_well_under_a_second():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rasa_lora", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=60)
    assert result.returncode == 0 and "commands:" in result.stdout
    assert time.perf_counter() - started < 3.0  # with torch imported it took 4.6 s; bare Python start is ~0.1 s


def test_import_rasa_lora_still_registers_rasa_whatever_the_order():
    # rasa_lora first, peft later (the post-import hook), and peft first (registered at once)
    check = ("from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\nfrom peft.utils import PeftType\n"
             "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType('RASA')].__name__ == 'RasaConfig'\n")
    for order in ("import sys, rasa_lora\nassert 'torch' not in sys.modules\n", "import peft, rasa_lora\n"):
        result = _python(order + check + "import rasa_lora\nassert rasa_lora.models.DEFAULT_MODEL == 'smollm2'\n"
                                         "print(rasa_lora.RasaConfig(r=8).peft_type)")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("RASA")


# --- threads ----------------------------------------------------------------------------------------------------------
def test_thread_choice_follows_load_and_overrides():
    # the measured case: 2 cores, busy -> 1 thread; idle -> torch's default (all cores)
    assert cli.choose_threads(None, {}, cores=2, load=1.8)[0] == 1
    assert cli.choose_threads(None, {}, cores=2, load=0.8)[0] == 1
    assert cli.choose_threads(None, {}, cores=2, load=0.2)[0] is None
    assert cli.choose_threads(None, {}, cores=16, load=4.0)[0] == 12
    assert cli.choose_threads(None, {}, cores=2, load=40.0)[0] == 1
    # the user's word wins: --threads, then RASA_LORA_THREADS, then OMP_NUM_THREADS (left to torch)
    assert cli.choose_threads(2, {"RASA_LORA_THREADS": "1"}, cores=2, load=9.0) == (2, "--threads")
    assert cli.choose_threads(None, {"RASA_LORA_THREADS": "2"}, cores=2, load=9.0) == (2, "RASA_LORA_THREADS")
    assert cli.choose_threads(None, {"OMP_NUM_THREADS": "2"}, cores=2, load=9.0) == (None, "OMP_NUM_THREADS")
    assert cli.choose_threads(None, {}, cores=2, load=9.0, gpu=True)[0] is None
    with pytest.raises(ValueError, match="RASA_LORA_THREADS"):
        cli.choose_threads(None, {"RASA_LORA_THREADS": "two"}, cores=2, load=0.0)


def test_threads_option_is_taken_from_anywhere_on_the_line():
    assert cli.pop_threads(["train", "--threads", "1", "--r", "8"]) == (["train", "--r", "8"], 1)
    assert cli.pop_threads(["--threads=2", "eval", "gsm8k"]) == (["eval", "gsm8k"], 2)
    with pytest.raises(ValueError, match="at least 1"):
        cli.pop_threads(["train", "--threads", "0"])


PROBE = """
import os, sys
os.getloadavg = lambda: (LOAD, 0.0, 0.0)
from rasa_lora import cli
def probe(argv):
    import torch
    print("threads", torch.get_num_threads())
cli.COMMANDS["probe"] = ("__main__", "probe", "")
cli.COMPUTING = (*cli.COMPUTING, "probe")
cli._has_gpu = lambda: False
sys.exit(cli.main(ARGV))
"""


@pytest.mark.parametrize(("load", "argv", "threads", "note"), [
    (5.0, ["probe"], 1, True),                    # busy 2-core machine: one thread, said on stderr
    (5.0, ["probe", "--threads", "2"], 2, False),  # the user's choice wins
    (0.0, ["probe"], None, False),                 # idle: torch's default
])
def test_every_command_gets_the_chosen_threads(load, argv, threads, note):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RASA_LORA_THREADS")}
    result = subprocess.run([sys.executable, "-c", PROBE.replace("LOAD", str(load)).replace("ARGV", repr(argv))],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(SRC)}, timeout=120)
    assert result.returncode == 0, result.stderr
    got = int(result.stdout.split()[-1])
    cores = os.cpu_count() or 1
    assert got == (threads if threads is not None else got)
    if threads is None:
        assert got == cores or cores > 2  # torch's own default: the cores (on a 2-core machine, both)
    assert ("machine busy" in result.stderr) == (note and cores > 1)


def test_bad_threads_value_is_one_line(capsys):
    assert cli.main(["--threads", "x", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--threads" in err


# --- one-line errors -------------------------------------------------------------------------------------------------
def test_user_error_and_ctrl_c_are_one_line(capsys, monkeypatch):
    from rasa_lora.errors import UserError

    def fails(argv):
        raise UserError("the thing is wrong; do this instead")

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "fails", ("tests.test_cli", "_fails", ""))
    monkeypatch.setattr(sys.modules[__name__], "_fails", fails, raising=False)
    monkeypatch.setitem(cli.COMMANDS, "stop", ("tests.test_cli", "_interrupted", ""))
    monkeypatch.setattr(sys.modules[__name__], "_interrupted", interrupted, raising=False)
    assert cli.main(["fails"]) == 2
    assert capsys.readouterr().err.strip() == "rasa-lora fails: error: the thing is wrong; do this instead"
    assert cli.main(["stop"]) == 130
    assert capsys.readouterr().err.strip() == "rasa-lora stop: interrupted (Ctrl-C)"


def test_registration_survives_a_lookup_that_is_not_an_import():
    # transformers asks `importlib.util.find_spec("peft")` before anything imports PEFT (is_peft_available)
    code = ("import importlib.util, rasa_lora\nassert importlib.util.find_spec('peft') is not None\n"
            "import transformers.utils\ntransformers.utils.is_peft_available()\n"
            "from peft import PeftModel\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
            "from peft.utils import PeftType\nprint(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType('RASA')].__name__)")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RasaConfig"
