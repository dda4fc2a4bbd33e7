"""Model names a new user types: a typo or a hub name without a network fails at once in one line with what would
have worked; the embedded model is recorded under its alias, so a shared adapter names a base that loads anywhere."""

from __future__ import annotations

import json
import time

import pytest

from rasa_lora import cli, models
from rasa_lora.models import ModelNotFoundError


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub out of reach without HF_HUB_OFFLINE (as on this machine): the probe says so; nothing may retry."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)


def test_a_typo_fails_at_once_offline_with_the_alias_suggested(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as error:
        models.resolve_model("smollm3")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "did you mean 'smollm2'" in message and "HF_HUB_OFFLINE" in message and ".gguf" in message
    assert "\n" not in message


def test_a_hub_name_without_network_fails_at_once(no_hub):
    with pytest.raises(ModelNotFoundError, match="the Hub cannot be reached"):
        models.resolve_model("someone/some-model")


def test_the_probe_is_bounded_in_time(monkeypatch):
    import socket

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.perf_counter()
        assert models.hub_reachable(timeout=1.0) is False
        assert time.perf_counter() - started < 3
    finally:
        silent.close()


def _terminal(text: str) -> list[str]:
    """The non-blank lines a terminal would show for `text`: after each carriage return the line is rewritten."""
    shown = []
    for line in text.split("\n"):
        visible = ""
        for part in line.split("\r"):
            visible = part + visible[len(part):]
        if visible.strip():
            shown.append(visible.rstrip())
    return shown


@pytest.mark.parametrize("argv", [
    ["train", "--base-model", "smollm3", "--max-steps", "1"],
    ["eval", "gsm8k", "--model", "smollm3", "--limit", "1"],
    ["params", "smollm3"],
    ["params", "no-owner-model"],
])
def test_every_command_says_it_in_one_line(argv, no_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    assert cli.main(argv) == 2
    assert time.perf_counter() - started < 30  # transformers' retries took ~50 s
    err = capsys.readouterr().err
    shown = _terminal(err)  # what a terminal shows: a progress bar erased by "\r" is gone
    assert len(shown) == 1 and shown[0].startswith("rasa-lora") and "smollm2" in shown[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_params_accepts_the_smollm2_alias(capsys):
    assert cli.main(["params", "smollm2", "--ranks", "8"]) == 0
    out = capsys.readouterr().out
    # SmolLM2-135M: 30 layers; RaSA r=8 k=1 gives r-k+Lk = 7 + 30 = 37
    assert "Trainable parameters on smollm2" in out and "r-k+Lk = 37" in out


def test_params_takes_comma_lists_like_train_and_refuses_rank_0(capsys):
    assert cli.main(["params", "llama-3.1-8b", "--ranks", "8,16", "--target-modules", "q_proj,v_proj",
                     "--methods", "lora,rasa", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["method"], row["r"]) for row in rows] == [("lora", 8), ("rasa", 8), ("lora", 16), ("rasa", 16)]
    assert rows[0]["trainable"] == 8 * (4096 + 4096) * 32 + 8 * (4096 + 1024) * 32  # q: 4096->4096, v: 4096->1024
    assert cli.main(["params", "llama-3.1-8b", "--ranks", "8", "16", "--methods", "lora", "rasa",
                     "--json"]) == 0  # spaces still work
    assert len(json.loads(capsys.readouterr().out)) == 4
    with pytest.raises(SystemExit) as exit_:
        cli.main(["params", "--ranks", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "ranks are whole numbers of at least 1" in err and len(err.splitlines()) == 1


def test_an_adapter_of_the_embedded_model_records_its_alias(smollm2, tmp_path):
    import peft

    import rasa_lora

    model, _ = smollm2
    assert model.name_or_path == "smollm2"
    wrapped = peft.get_peft_model(model, rasa_lora.RasaConfig(r=2, target_modules=["q_proj"]))
    try:
        wrapped.save_pretrained(tmp_path / "adapter")
    finally:
        wrapped.unload()  # give the session's model back untouched
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2"  # was /root/.cache/rasa_lora/SmolLM2-135M-Instruct
    assert models.resolve_model(config["base_model_name_or_path"])[0] == str(models.cache_dir() /
                                                                               "SmolLM2-135M-Instruct")
