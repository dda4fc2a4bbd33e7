"""The `rasa-lora` command: one table of sub-commands, each imported only when it runs.

Every sub-command is a function `main(argv: list[str]) -> int` in its own module, so that
`rasa-lora params` does not pay for importing the evaluation or training stacks.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("rasa_lora.demo", "main", "train RaSA on the embedded SmolLM2 and show before/after accuracy"),
    "params": ("rasa_lora.params", "main", "trainable-parameter table of LoRA and RaSA for an architecture"),
    "train": ("rasa_lora.train.cli", "main", "supervised fine-tuning with RaSA, its baselines or full fine-tuning"),
    "merge": ("rasa_lora.merge", "main", "merge an adapter into its base model and save a plain transformers model"),
    "export-lora": ("rasa_lora.export", "main", "write a RaSA adapter as an exactly equal PEFT LoRA adapter (serving)"),
    "push": ("rasa_lora.hub", "main", "upload an adapter (and its exported LoRA) to the Hugging Face Hub with a card"),
    "analyze": ("rasa_lora.analysis.cli", "analyze_main", "reconstruction-error analysis (paper Sec. 3, App. A)"),
    "compress": ("rasa_lora.analysis.cli", "compress_main", "fit a RaSA adapter to a full fine-tune's weight deltas"),
    "eval": ("rasa_lora.evaluation.cli", "main", "MATH/GSM8K, HumanEval(+) and forgetting benchmarks"),
    "reproduce": ("rasa_lora.reproduce", "main", "a paper run end to end: train a recipe, then its benchmarks"),
    "compare": ("rasa_lora.reproduce", "compare_main", "reproduced runs side by side with the paper's figures"),
}


def _usage() -> str:
    lines = ["usage: rasa-lora COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`rasa-lora COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rasa-lora: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
