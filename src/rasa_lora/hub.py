"""`rasa-lora push ADAPTER REPO_ID`: upload a RaSA adapter, and its exported LoRA, to the Hugging Face Hub with a
generated model card.

The card states the base model, the method and its numbers (r, k, alpha, dropout, the rank R = r-k+Lk each layer
uses, the target modules), the recipe and final metrics when ADAPTER is a `rasa-lora train` output folder
(`config.json`, `summary.json`), and how to load it: the RaSA adapter needs `import rasa_lora` (or a merge); the
exported LoRA (`--lora DIR`, or `--export-lora` to make it now) loads with plain PEFT, transformers and LoRA
servers, and goes to its own repository (`REPO_ID-lora` unless `--lora-repo`), since servers take a repository
per adapter.

Choices: the upload is one `HfApi.upload_folder` per repository from a staging folder holding only the adapter's
files, the tokenizer, the card (`README.md`) and the run's records (`config.json` is renamed
`rasa_lora_recipe.json`, so that nothing mistakes it for a model config); checkpoints and per-epoch adapters stay
local. `--dry-run` writes the staging folders and uploads nothing. The token is huggingface_hub's (`HF_TOKEN` or
`hf auth login`), never stored here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rasa_lora.export import VLLM_RANKS
from rasa_lora.train.config import MODEL_DIR_RECIPE_FILE, RECIPE_FILE

EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "metrics.jsonl", "loss.png")
RENAMED = {RECIPE_FILE: MODEL_DIR_RECIPE_FILE, "summary.json": "training_summary.json"}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def base_model_of(adapter_config: dict, recipe: dict | None) -> str | None:
    """The base model's name: the embedded SmolLM2's Hub name when the recipe used it (its local copy's path is
    in the adapter config), else the adapter config's, else the recipe's; None when neither says."""
    if recipe is not None and recipe.get("base_model") in (None, "smollm2"):
        return EMBEDDED_BASE
    return adapter_config.get("base_model_name_or_path") or (recipe or {}).get("base_model")


def rasa_ranks(adapter_dir: Path) -> list[int]:
    """The distinct R = r-k+L*k of the adapter's layers (the length of each D_i), read from the file's header."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        return sorted({handle.get_slice(key).get_shape()[0] for key in handle.keys() if key.endswith(".rasa_D")})


def _front_matter(base: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: peft"]
    if base and "/" in base and not Path(base).exists():
        lines.append(f"base_model: {base}")
    lines += ["pipeline_tag: text-generation", "tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    return "\n".join(lines)


def _recipe_lines(recipe: dict | None, summary: dict | None) -> list[str]:
    lines = []
    if recipe:
        keys = ("method", "dataset", "epochs", "max_steps", "learning_rate", "optimizer", "betas", "weight_decay",
                "lr_scheduler", "warmup_ratio", "global_batch_size", "micro_batch_size", "cutoff_len", "seed")
        lines += ["## Training recipe (`rasa-lora train`)", "", "| key | value |", "| --- | --- |"]
        shown = dict(recipe, dataset=recipe.get("dataset") or "built-in arithmetic generator")
        lines += [f"| `{key}` | {shown[key]} |" for key in keys if key in recipe]
        lines += ["", "The whole recipe is `rasa_lora_recipe.json`.", ""]
    if summary:
        keys = ("final_loss", "best_loss", "steps", "tokens", "examples", "trainable_params", "train_time_s", "device")
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {summary[key]} |" for key in keys if key in summary]
        lines += ["", "Training loss by step: `metrics.jsonl` (plot: `loss.png`).", ""]
    return lines


def model_card(adapter_dir: str | Path, repo_id: str, lora_repo_id: str | None = None,
               lora_rank: int | None = None) -> str:
    """README.md of the RaSA adapter's repository."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    recipe, summary = _read_json(adapter_dir / "config.json"), _read_json(adapter_dir / "summary.json")
    base = base_model_of(config, recipe) or "BASE_MODEL"
    ranks = ", ".join(map(str, rasa_ranks(adapter_dir)))
    targets = config.get("target_modules")
    targets = ", ".join(f"`{name}`" for name in sorted(targets)) if isinstance(targets, list) else f"`{targets}`"
    lines = [_front_matter(base, ["rasa", "rasa-lora", "lora", "peft"]), f"# {repo_id.split('/')[-1]}", "",
             f"A **RaSA** adapter (Rank-Sharing Low-Rank Adaptation, ICLR 2025) for `{base}`, made with "
             "[rasa-lora](https://pypi.org/project/rasa-lora/).", "",
             "| | |", "| --- | --- |", f"| base model | `{base}` |", "| method | RaSA (PEFT type `RASA`) |",
             f"| r (ranks per layer before sharing) | {config['r']} |",
             f"| k (ranks each layer gives to the shared pool) | {config['rasa_k']} |",
             f"| alpha | {config['rasa_alpha']} |", f"| dropout | {config.get('rasa_dropout', 0.0)} |",
             f"| ranks each layer uses, R = r - k + L k | {ranks} |", f"| target modules | {targets} |", ""]
    lines += _recipe_lines(recipe, summary)
    lines += ["## How to load", "", "This adapter needs the `rasa-lora` package imported in the loading process:",
              "", "```python", "import rasa_lora  # registers RaSA with PEFT", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", "",
              f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{repo_id}")',
              "merged = model.merge_and_unload()  # exact: a plain transformers model", "```", ""]
    if lora_repo_id:
        lines += [f"Without `rasa_lora`: [`{lora_repo_id}`](https://huggingface.co/{lora_repo_id}) holds the same "
                  f"update as a standard LoRA adapter (rank {lora_rank}, exact), for plain PEFT, transformers and LoRA "
                  "servers such as vLLM.", ""]
    return "\n".join(lines)


def lora_model_card(lora_dir: str | Path, repo_id: str, rasa_repo_id: str | None, base: str | None) -> str:
    """README.md of the exported LoRA's repository."""
    config = json.loads((Path(lora_dir) / "adapter_config.json").read_text())
    rank = config["r"]
    base = base or config.get("base_model_name_or_path") or "BASE_MODEL"
    served_rank = next((value for value in VLLM_RANKS if value >= rank), rank)
    source = f"[`{rasa_repo_id}`](https://huggingface.co/{rasa_repo_id})" if rasa_repo_id else "a RaSA adapter"
    lines = [_front_matter(base, ["lora", "peft", "rasa", "rasa-lora"]), f"# {repo_id.split('/')[-1]}", "",
             f"A standard PEFT **LoRA** adapter for `{base}`: the RaSA adapter {source} written exactly as LoRA "
             f"(`rasa-lora export-lora`). Rank {rank}, `lora_alpha` {config['lora_alpha']} (scaling 1). RaSA's "
             "update is a LoRA update of rank R = r - k + L k, so this adapter runs R ranks per layer where a LoRA "
             "of the same r would run r.", "",
             "## How to load (no `rasa_lora` needed)", "", "```python", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM", "",
             f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{repo_id}")',
             f'# or: model = AutoModelForCausalLM.from_pretrained("{base}"); model.load_adapter("{repo_id}")', "```",
             "", "Serving with vLLM (multi-LoRA):", "", "```bash",
             f"vllm serve {base} --enable-lora --max-lora-rank {served_rank} --lora-modules rasa={repo_id}", "```", ""]
    if served_rank != rank:
        lines += [f"`--max-lora-rank` takes one of {', '.join(map(str, VLLM_RANKS))} and must be at least the "
                  f"adapter's rank ({rank}). For servers or tools that want the adapter's own rank to be one of these, "
                  "export with `--pad-to vllm` (zero ranks, still exact).", ""]
    return "\n".join(lines)


def stage(adapter_dir: Path, staging: Path, card: str) -> Path:
    """Copy what a repository should hold into `staging` (created), with the card as README.md."""
    staging.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, staging / name)
    for name, renamed in RENAMED.items():
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, staging / renamed)
    (staging / "README.md").write_text(card)
    return staging


def _check_adapter(adapter_dir: Path, peft_type: str, option: str) -> None:
    config = _read_json(adapter_dir / "adapter_config.json")
    if config is None or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{option} {str(adapter_dir)!r} holds no adapter_config.json and "
                                "adapter_model.safetensors; give a saved PEFT adapter folder")
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{option} {str(adapter_dir)!r} is a {config.get('peft_type')} adapter; expected {peft_type}"
                         + (" (make one with rasa-lora export-lora)" if peft_type == "LORA" else ""))


def push_to_hub(adapter_dir: str | Path, repo_id: str, lora_dir: str | Path | None = None,
                lora_repo_id: str | None = None, private: bool = False, token: str | None = None,
                dry_run: str | Path | None = None, api: Any = None) -> dict[str, str]:
    """Upload the RaSA adapter (and the exported LoRA, if given) with generated cards; returns {repo: folder}.
    With `dry_run` set to a folder, the staged repositories are written there and nothing is uploaded."""
    adapter_dir = Path(adapter_dir)
    _check_adapter(adapter_dir, "RASA", "ADAPTER")
    if lora_dir is not None:
        _check_adapter(Path(lora_dir), "LORA", "--lora")
        lora_repo_id = lora_repo_id or f"{repo_id}-lora"
    lora_rank = json.loads((Path(lora_dir) / "adapter_config.json").read_text())["r"] if lora_dir else None
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base_model_of(config, _read_json(adapter_dir / "config.json"))
    root = Path(dry_run) if dry_run is not None else Path(tempfile.mkdtemp(prefix="rasa-lora-push-"))
    try:
        repos = {repo_id: stage(adapter_dir, root / "rasa", model_card(adapter_dir, repo_id, lora_repo_id, lora_rank))}
        if lora_dir is not None:
            card = lora_model_card(lora_dir, lora_repo_id, repo_id, base)
            repos[lora_repo_id] = stage(Path(lora_dir), root / "lora", card)
        if dry_run is None:
            if api is None:
                from huggingface_hub import HfApi

                api = HfApi(token=token)
            for repo, folder in repos.items():
                api.create_repo(repo_id=repo, private=private, exist_ok=True, repo_type="model")
                api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                  commit_message="Upload adapter with rasa-lora push")
        return {repo: str(folder) for repo, folder in repos.items()}
    finally:
        if dry_run is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rasa-lora push", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="RaSA adapter folder (e.g. the output_dir of rasa-lora train)")
    parser.add_argument("repo_id", help="Hub repository for the RaSA adapter, e.g. you/smollm2-rasa-gsm8k")
    parser.add_argument("--lora", default=None, help="an exported LoRA folder (rasa-lora export-lora) to push too")
    parser.add_argument("--export-lora", action="store_true", help="export the LoRA now and push it too")
    parser.add_argument("--pad-to", default=None, help="with --export-lora: pad its rank (an integer or 'vllm')")
    parser.add_argument("--lora-repo", default=None, help="repository of the LoRA (default: REPO_ID-lora)")
    parser.add_argument("--private", action="store_true", help="create private repositories")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`'s)")
    parser.add_argument("--dry-run", default=None, metavar="DIR",
                        help="write the staged repositories (cards included) to DIR and upload nothing")
    args = parser.parse_args(argv)
    if args.lora and args.export_lora:
        parser.error("give --lora DIR or --export-lora, not both")
    scratch = tempfile.TemporaryDirectory(prefix="rasa-lora-export-") if args.export_lora else None
    try:
        lora = args.lora
        if scratch is not None:
            from rasa_lora.export import export_lora

            lora = export_lora(args.adapter, Path(scratch.name) / "lora", pad_to=args.pad_to)["out"]
        repos = push_to_hub(args.adapter, args.repo_id, lora, args.lora_repo, args.private, args.token, args.dry_run)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"rasa-lora push: error: {error}", file=sys.stderr)
        return 2
    finally:
        if scratch is not None:
            scratch.cleanup()
    verb = "staged (dry run)" if args.dry_run else "pushed"
    for repo, folder in repos.items():
        print(f"{verb}: {repo}" + (f" -> {folder}" if args.dry_run else f" (https://huggingface.co/{repo})"))
    return 0
