"""`rasa-lora push`: the generated model cards and the upload calls, against a local stand-in for the Hub (offline)."""

from __future__ import annotations

import json
import re

import pytest

from rasa_lora import hub
from rasa_lora.export import export_lora
from rasa_lora.train.config import build_config
from rasa_lora.train.trainer import train
from tests.train.conftest import build_tiny_tokenizer, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A `rasa-lora train` output folder (adapter, config.json, summary.json, metrics.jsonl) on a tiny Llama."""
    from rasa_lora.models import tiny_llama

    root = tmp_path_factory.mktemp("hub")
    tokenizer = build_tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    train(build_config(tiny_overrides(root / "base", root / "run", max_steps=2, alpha=16)))
    return root / "run"


@pytest.fixture(scope="module")
def lora_dir(run_dir, tmp_path_factory):
    return export_lora(run_dir, tmp_path_factory.mktemp("lora") / "lora")["out"]


class StandInApi:
    """Records what `HfApi` would be asked, and keeps a copy of each uploaded folder's files."""

    instances: list[StandInApi] = []

    def __init__(self, token=None):
        self.token, self.calls, self.uploaded = token, [], {}
        StandInApi.instances.append(self)

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        from pathlib import Path

        self.calls.append(("upload_folder", repo_id, repo_type))
        self.uploaded[repo_id] = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}


def code_blocks(card: str) -> str:
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", card, flags=re.S))


def test_rasa_card_states_method_numbers_recipe_metrics_and_loading(run_dir):
    card = hub.model_card(run_dir, "me/tiny-rasa", lora_repo_id="me/tiny-rasa-lora", lora_rank=16)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: peft\n") and "- rasa\n" in card
    assert "| method | RaSA (PEFT type `RASA`) |" in card
    assert "| r (ranks per layer before sharing) | 8 |" in card and "| k (ranks each layer gives" in card
    assert "| alpha | 16.0 |" in card and "| ranks each layer uses, R = r - k + L k | 11 |" in card  # 8-1+4
    assert f"| final_loss | {summary['final_loss']} |" in card and "| `learning_rate` | 0.0005 |" in card
    assert "import rasa_lora" in code_blocks(card)
    assert "[`me/tiny-rasa-lora`]" in card and "rank 16" in card


def test_lora_card_loads_without_rasa_lora_and_names_the_vllm_rank(lora_dir):
    card = hub.lora_model_card(lora_dir, "me/tiny-rasa-lora", "me/tiny-rasa", "org/base")
    assert "rasa_lora" not in code_blocks(card)
    assert "base_model: org/base" in card and "Rank 11" in card
    assert "vllm serve org/base --enable-lora --max-lora-rank 16 --lora-modules rasa=me/tiny-rasa-lora" in card
    assert "--pad-to vllm" in card and "at least the adapter's rank (11)" in card  # 11 is not a vLLM rank


def test_the_embedded_base_is_named_by_its_hub_name():
    assert hub.base_model_of({"base_model_name_or_path": "/cache/smollm2"}, {"base_model": None}) == hub.EMBEDDED_BASE
    assert hub.base_model_of({"base_model_name_or_path": "org/x"}, {"base_model": "org/x"}) == "org/x"
    assert hub.base_model_of({}, None) is None


def test_push_uploads_both_repositories_with_cards(run_dir, lora_dir, monkeypatch):
    import huggingface_hub

    StandInApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInApi)
    repos = hub.push_to_hub(run_dir, "me/tiny-rasa", lora_dir=lora_dir, private=True, token="t0k")
    assert list(repos) == ["me/tiny-rasa", "me/tiny-rasa-lora"]
    (api,) = StandInApi.instances
    assert api.token == "t0k"
    assert api.calls == [("create_repo", "me/tiny-rasa", True, True, "model"),
                         ("upload_folder", "me/tiny-rasa", "model"),
                         ("create_repo", "me/tiny-rasa-lora", True, True, "model"),
                         ("upload_folder", "me/tiny-rasa-lora", "model")]
    rasa_files, lora_files = api.uploaded["me/tiny-rasa"], api.uploaded["me/tiny-rasa-lora"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "rasa_lora_recipe.json",
            "training_summary.json", "metrics.jsonl"} <= set(rasa_files)
    assert "config.json" not in rasa_files  # the recipe is renamed: not a model config
    assert json.loads(lora_files["adapter_config.json"])["peft_type"] == "LORA"
    assert b"import rasa_lora" not in lora_files["README.md"] and b"import rasa_lora" in rasa_files["README.md"]


def test_cli_dry_run_exports_and_stages_without_uploading(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a dry run must not reach the Hub"))
    code = hub.main([str(run_dir), "me/tiny-rasa", "--export-lora", "--pad-to", "vllm", "--dry-run", str(tmp_path)])
    assert code == 0
    assert "staged (dry run): me/tiny-rasa-lora" in capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16 and (tmp_path / "rasa" / "README.md").is_file()
    assert "--pad-to vllm" not in (tmp_path / "lora" / "README.md").read_text()  # already padded


def test_cli_refuses_wrong_adapter_kinds(run_dir, lora_dir, tmp_path, capsys):
    assert hub.main([lora_dir, "me/x", "--dry-run", str(tmp_path)]) == 2
    assert "is a LORA adapter; expected RASA" in capsys.readouterr().err
    assert hub.main([str(run_dir), "me/x", "--lora", str(run_dir), "--dry-run", str(tmp_path)]) == 2
    assert "expected LORA (make one with rasa-lora export-lora)" in capsys.readouterr().err
