"""`rasa-lora eval` for a new user on a CPU: generations that stop where the answer ends, a default limit that fits
the task, progress while a batch generates, output written atomically, and one-line messages (data, Ctrl-C)."""

from __future__ import annotations

import json

import pytest

from rasa_lora import cli
from rasa_lora.evaluation import cli as eval_cli
from rasa_lora.evaluation.generation import ANSWER_LINE, cut_at_stop, generate_transformers


@pytest.mark.parametrize(("text", "expected"), [
    # how the paper's format and small models end a GSM8K solution
    ("She has 16 - 3 - 4 = 9 eggs.\nThe answer is: 18\nThe answer is: 18\nThe answer is: 18",
     "She has 16 - 3 - 4 = 9 eggs.\nThe answer is: 18"),
    ("9 * 2 = 18 dollars.\nThe answer is 18.\n\n### Instruction:\nWrite", "9 * 2 = 18 dollars.\nThe answer is 18."),
    ("So the final answer is $\\boxed{5}$.\nNow another", "So the final answer is $\\boxed{5}$."),
    ("The answer is:\n18\nmore", "The answer is:\n18\nmore"),  # the answer is not on that line: do not cut
    ("no answer line at all", "no answer line at all"),
])
def test_a_generation_ends_with_its_answer_line(text, expected):
    assert cut_at_stop(text, ["### Instruction"], ANSWER_LINE) == expected


def test_generation_stops_after_the_answer_line_not_at_the_limit(smollm2):
    model, tokenizer = smollm2
    prompt = "".join(f"Question {i}: what is {i} + {i}?\nThe answer is: {2 * i}\n" for i in range(1, 9))
    prompt += "Question 9: what is 9 + 9?\n"
    counts = {}
    for stop in (None, ANSWER_LINE):
        tokens = []
        text = generate_transformers(model, tokenizer, [prompt], max_new_tokens=60, stop=(), answer_stop=stop,
                                     on_tokens=tokens.append)[0][0]
        counts[stop] = (sum(tokens), text)
    unstopped, stopped = counts[None], counts[ANSWER_LINE]
    assert unstopped[0] == 60  # the model runs on, repeating the pattern, to the limit
    assert stopped[1].startswith("The answer is") and "\n" not in stopped[1]
    assert stopped[0] < 20


def test_default_token_limits_fit_the_task(capsys):
    assert eval_cli._max_new_tokens(eval_cli._parser().parse_args(["gsm8k"])) == 512
    assert eval_cli._max_new_tokens(eval_cli._parser().parse_args(["math500"])) == 2048
    assert eval_cli._max_new_tokens(eval_cli._parser().parse_args(["humaneval+"])) == 512
    assert eval_cli._max_new_tokens(eval_cli._parser().parse_args(["gsm8k", "--max-new-tokens", "64"])) == 64
    with pytest.raises(SystemExit):
        eval_cli._parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "gsm8k 512" in help_text and "The answer is" in help_text


def test_the_token_rate_shows_while_a_batch_generates():
    class Bar:
        postfix = ""

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

    bar = Bar()
    rate = eval_cli._TokenRate(bar)
    rate(16)
    assert bar.postfix.startswith("16 tokens generated") and "tok/s" in bar.postfix


def test_the_command_is_recorded_when_called_in_process(tmp_path, shared_data):
    # `rasa-lora reproduce` calls eval's main with its own arguments: the summary must say which
    argv = ["gsm8k", "--gold", "--limit", "2", "--data-dir", str(shared_data), "--output-dir", str(tmp_path / "o")]
    assert eval_cli.main(argv) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["command"] == "rasa-lora eval gsm8k --gold --limit 2 --data-dir " + \
        f"{shared_data} --output-dir {tmp_path / 'o'}"
    assert not list((tmp_path / "o").glob(".*partial*"))


def test_a_failed_eval_leaves_no_folder(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RASA_LORA_THREADS", "1")  # no thread-choice line, whatever the machine's load
    out = tmp_path / "out"
    assert cli.main(["eval", "gsm8k", "--model", "smollm3", "--limit", "1", "--data-dir", str(shared_data),
                     "--output-dir", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.count("rasa-lora eval:") == 1 and "smollm3" in err and "Traceback" not in err  # one message


def _interrupt_on_call(monkeypatch, number: int):
    from rasa_lora.evaluation import math_check

    calls = []
    real = math_check.judge_many

    def judge(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(math_check, "judge_many", judge)


def test_ctrl_c_before_anything_is_scored_leaves_nothing(tmp_path, shared_data, capsys, monkeypatch):
    _interrupt_on_call(monkeypatch, 1)
    out = tmp_path / "out"
    assert cli.main(["eval", "gsm8k", "--gold", "--limit", "8", "--batch-size", "1", "--data-dir", str(shared_data),
                     "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C); nothing was scored and nothing is left behind" in err and "Traceback" not in err
    assert not out.exists()


def test_ctrl_c_later_keeps_the_scored_batches_and_the_rerun_continues(tmp_path, shared_data, capsys, monkeypatch):
    _interrupt_on_call(monkeypatch, 2)
    out = tmp_path / "out"
    argv = ["eval", "gsm8k", "--gold", "--limit", "8", "--batch-size", "1", "--data-dir", str(shared_data),
            "--output-dir", str(out)]
    assert cli.main(argv) == 130
    assert "4 scored records are kept in" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["items"] == 8


def test_a_torn_last_record_is_redone(tmp_path, shared_data):
    out = tmp_path / "out"
    argv = ["gsm8k", "--gold", "--limit", "3", "--data-dir", str(shared_data), "--output-dir", str(out)]
    assert eval_cli.main(argv) == 0
    records = out / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # killed mid-write
    assert eval_cli.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["accuracy"] == 1.0


@pytest.mark.parametrize("hub", ["unreachable", "fails"])
def test_no_local_data_says_where_data_come_from(hub, tmp_path, capsys, monkeypatch):
    from rasa_lora import models
    from rasa_lora.evaluation import tasks

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tasks, "default_data_dir", lambda: None)  # a fresh clone without ../shared/data
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: hub == "fails")

    def connection_error(*args):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(tasks, "_hub", connection_error)
    out = tmp_path / "out"
    assert cli.main(["eval", "gsm8k", "--limit", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--data-dir" in err and "gsm8k/test.jsonl" in err and "Hugging Face Hub" in err
    assert ("ConnectionError" in err) == (hub == "fails")
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_gives_one_message_and_no_traceback(tmp_path, shared_data):
    """The terminal sends SIGINT to the whole process group: the checker processes too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import rasa_lora

    out = tmp_path / "out"
    source = str(os.path.dirname(os.path.dirname(rasa_lora.__file__)))
    process = subprocess.Popen(
        # MATH's 5,000 gold items: scoring all of them takes seconds, so the interrupt lands mid-way (with MATH500's
        # 500 a fast machine had finished before the signal came, and exited 0)
        [sys.executable, "-m", "rasa_lora", "eval", "math", "--gold", "--batch-size", "2", "--workers", "2",
         "--data-dir", str(shared_data), "--output-dir", str(out)],
        env={**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: a runner that started pytest in the background has SIGINT ignored, and an ignored
        # signal is inherited (Python then never raises KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600  # a loaded 2-core machine took over 120 s to score the first chunk
    while time.monotonic() < deadline and process.poll() is None and not (out / "records.jsonl").is_file():
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()
    if not (out / "records.jsonl").is_file():
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("nothing was scored within 600 s: the machine is too loaded for this test")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130
    err = process.stderr.read()
    assert "Traceback" not in err and err.count("interrupted (Ctrl-C)") == 1, err
    assert "scored records are kept in" in err


def test_an_error_during_scoring_starts_its_own_line(tmp_path, shared_data, capsys, monkeypatch):
    """The progress bar is open when scoring fails: the one-line error must not be glued to the bar's line."""
    from rasa_lora.evaluation import math_check

    def judge(*args, **kwargs):
        raise ValueError("checker broke")

    monkeypatch.setattr(math_check, "judge_many", judge)
    monkeypatch.setenv("RASA_LORA_THREADS", "1")
    assert cli.main(["eval", "gsm8k", "--gold", "--limit", "2", "--data-dir", str(shared_data),
                     "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "checker broke" in err
    line = next(line for line in err.split("\n") if "checker broke" in line)
    assert line.rsplit("\r", 1)[-1].startswith("rasa-lora eval: error:"), repr(err)  # not glued to the bar's text
