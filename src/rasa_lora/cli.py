"""The `rasa-lora` command: one table of sub-commands, each imported only when it runs.

Every sub-command is a function `main(argv: list[str]) -> int` in its own module, so that
`rasa-lora params` does not pay for importing the evaluation or training stacks, and `rasa-lora --help` imports
neither torch nor transformers.

Around every command: a mistake the user can fix (`rasa_lora.errors.UserError`) is printed as one line with exit
code 2, Ctrl-C as one line with exit code 130 (no traceback), and the number of torch CPU threads is chosen
(`--threads N` anywhere on the line, else `RASA_LORA_THREADS`, else `OMP_NUM_THREADS` if set, else the cores the
machine's 1-minute load leaves idle, at least one). OpenMP threads spin while they wait for each other, so on a
busy 2-core machine two threads were many times slower than one (`docs/first-hour.md`).
"""

from __future__ import annotations

import importlib
import os
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
# Commands that compute with torch on the CPU (the others only read files or print).
COMPUTING = ("demo", "train", "merge", "analyze", "compress", "eval", "reproduce")
THREADS_ENV = "RASA_LORA_THREADS"


def _usage() -> str:
    lines = ["usage: rasa-lora [--threads N] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`rasa-lora COMMAND --help` describes a command's arguments.",
              f"--threads N: torch CPU threads (also ${THREADS_ENV}); default: the cores the machine's load leaves "
              "idle, at least 1."]
    return "\n".join(lines)


def pop_threads(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove `--threads N` / `--threads=N` from anywhere in argv; (the rest, N or None)."""
    rest, threads, index = [], None, 0
    while index < len(argv):
        token = argv[index]
        if token == "--threads" or token.startswith("--threads="):
            text = token.partition("=")[2] if "=" in token else (argv[index + 1] if index + 1 < len(argv) else "")
            index += 1 if "=" in token else 2
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"--threads {text!r}: give a whole number of threads, at least 1 (e.g. --threads 1)")
            threads = int(text)
            continue
        rest.append(token)
        index += 1
    return rest, threads


def choose_threads(requested: int | None, environ: dict[str, str], cores: int, load: float | None,
                   gpu: bool = False) -> tuple[int | None, str]:
    """(torch CPU threads to use, or None to leave torch's choice; why). Pure, so it is tested directly."""
    if requested is not None:
        return requested, "--threads"
    text = environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{THREADS_ENV}={text!r}: give a whole number of threads, at least 1")
        return int(text), THREADS_ENV
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None, "OMP_NUM_THREADS"
    if gpu or load is None:
        return None, "torch's default"
    idle = max(1, min(cores, int(cores - load + 0.5)))
    if idle < cores:
        return idle, f"machine busy (1-minute load {load:.1f} on {cores} cores)"
    return None, "idle machine"


def _has_gpu() -> bool:
    """An NVIDIA device node exists (checked without importing torch)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def apply_threads(threads: int | None) -> None:
    """Set the number of torch CPU threads: through OMP_NUM_THREADS before torch is imported (also reaches worker
    processes), and through torch.set_num_threads if it already is."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _configure_threads(name: str, requested: int | None, quiet: bool = False) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cores = os.cpu_count() or 1
    threads, why = choose_threads(requested, dict(os.environ), cores, load, gpu=_has_gpu())
    apply_threads(threads)
    if threads is not None and name in COMPUTING and why.startswith("machine busy") and not quiet:
        print(f"rasa-lora {name}: {why}: torch uses {threads} thread{'s' if threads > 1 else ''} "
              f"(override with --threads N)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from rasa_lora.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, threads = pop_threads(argv)
    except ValueError as error:
        print(f"rasa-lora: error: {error}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rasa-lora: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        _configure_threads(name, threads, quiet=bool({"-h", "--help"} & set(rest)))
    except ValueError as error:
        print(f"rasa-lora: error: {error}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(rest) or 0)
    except UserError as error:
        print(f"rasa-lora {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nrasa-lora {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
